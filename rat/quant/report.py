"""What the seed reports for the data-free estimate: relative accuracies (generated set vs test set, clean and under
attack) and a PCA view of the model's features on the test set and on the generator's images before and after the
adjustment.

*Relative accuracy* of a quantized variant is its accuracy divided by the full-precision model's on the same set
(the seed's "相对精度"): it removes the offset between the generated and the real set, so the question becomes
whether the generated set ranks and scales the variants as the real one does. The agreement is the R² of the
least-squares line of real on generated relative accuracy (``scipy.stats.linregress``), over the variants that are
not collapsed on the real set (``rat.quant.sweep.collapse_threshold``).

Features are the input of the model's last Conv/Linear layer (the classifier: the pooled, pre-logit features of any
rat model), projected on the first two principal components of the *test set's* features (scikit-learn's ``PCA``),
so that the three panels share one frame.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rat.quant.ptq import quantizable_layers

__all__ = ["classifier_features", "plot_pca", "plot_relative", "relative_accuracy"]

KEYS = {"clean": "clean_acc", "robust": "robust_acc"}


def relative_accuracy(rows: Sequence[Mapping[str, Any]], collapsed_below: float) -> dict[str, Any]:
    """Relative accuracies of estimate rows (the first is FP) and their agreement, per clean / robust.

    Returns:
        ``{'clean': {'real': [...], 'generated': [...], 'formats': [...], 'r2': ..., 'slope': ...}, 'robust': ...}``
        over the quantized rows whose real clean accuracy is above ``collapsed_below`` (r2 None below 3 rows).
    """
    from scipy.stats import linregress

    fp = rows[0]
    kept = [r for r in rows[1:] if r["real_clean_acc"] > collapsed_below]
    out: dict[str, Any] = {"collapsed": [r["format"] for r in rows[1:] if r not in kept]}
    for name, key in KEYS.items():
        real = [r[f"real_{key}"] / fp[f"real_{key}"] if fp[f"real_{key}"] > 0 else 0.0 for r in kept]
        gen = [r[f"est_{key}"] / fp[f"est_{key}"] if fp[f"est_{key}"] > 0 else 0.0 for r in kept]
        fit = linregress(gen, real) if len(kept) >= 3 and np.ptp(gen) > 0 and np.ptp(real) > 0 else None
        out[name] = {"formats": [r["format"] for r in kept], "real": real, "generated": gen,
                     "r2": None if fit is None else float(fit.rvalue ** 2),
                     "slope": None if fit is None else float(fit.slope)}
    return out


@torch.no_grad()
def classifier_features(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The input of the model's last Conv/Linear layer for every image of ``x`` (flattened, on the CPU)."""
    last = list(quantizable_layers(model).values())[-1]
    seen: list[torch.Tensor] = []
    handle = last.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().flatten(1).cpu()))
    model.eval()
    try:
        for start in range(0, len(x), batch_size):
            model(x[start:start + batch_size])
    finally:
        handle.remove()
    return torch.cat(seen)


def plot_relative(relative: Mapping[str, Any], path: str | Path) -> Path:
    """Generated-set vs test-set relative accuracy, clean (left) and under attack (right), with the diagonal."""
    from rat.eval.sweep.aggregate import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, name in zip(axes, KEYS):
        data = relative[name]
        ax.scatter(data["real"], data["generated"], s=18)
        for fmt, rx, gy in zip(data["formats"], data["real"], data["generated"]):
            ax.annotate(fmt, (rx, gy), fontsize=6)
        top = max([1.0, *data["real"], *data["generated"]])
        ax.plot([0, top], [0, top], "k--", lw=1)
        r2 = "–" if data["r2"] is None else f"{data['r2']:.3f}"
        ax.set_title(f"{name}: R² {r2}")
        ax.set_xlabel(f"test-set relative {name} accuracy (q / fp)")
        ax.set_ylabel(f"generated-set relative {name} accuracy (q / fp)")
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_pca(features: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor], reference: str,
             path: str | Path) -> Path:
    """One panel per feature set, projected on the first two principal components of ``features[reference]``,
    points coloured by label."""
    from sklearn.decomposition import PCA

    from rat.eval.sweep.aggregate import pyplot, save_figure

    pca = PCA(n_components=2).fit(features[reference].double().numpy())
    plt = pyplot()
    fig, axes = plt.subplots(1, len(features), figsize=(4.5 * len(features), 4.2), sharex=True, sharey=True)
    for ax, (name, feats) in zip(np.atleast_1d(axes), features.items()):
        points = pca.transform(feats.double().numpy())
        ax.scatter(points[:, 0], points[:, 1], c=labels[name].numpy(), cmap="tab10", s=4, vmin=0, vmax=9)
        ax.set_title(name)
        ax.set_xlabel("PC 1 (test set)")
    np.atleast_1d(axes)[0].set_ylabel("PC 2 (test set)")
    return save_figure(fig, path)
