"""Accuracy loss as a function of weight similarity, fitted across sweeps: R² per model and overall, and a plot.

The curve is a logistic in ``log10(js)``: ``loss = L / (1 + exp(-k (log10 js - x0)))``. Accuracy loss is ~0 while
the quantized weights are close to the full-precision ones and saturates (at chance level) once they are far; the
logistic has exactly that shape (scipy's ``curve_fit`` does the least squares). ``R² = 1 - SS_res / SS_tot`` of each
fit on its own points. The full-precision rows of a sweep (js = 0) are left out.
"""
from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

from rat.quant.sweep import FP_NAME

__all__ = ["TARGETS", "fit_curve", "fit_sweeps", "load_records", "plot_fits"]

_logger = logging.getLogger(__name__)

TARGETS = {"clean": "acc_loss", "robust": "robust_loss"}
_JS_FLOOR = 1e-12  # log10 of a divergence that rounds to 0


def _curve(log_js: np.ndarray, top: float, slope: float, mid: float) -> np.ndarray:
    return top / (1.0 + np.exp(-slope * (log_js - mid)))


def fit_curve(js: Sequence[float], loss: Sequence[float]) -> dict[str, Any]:
    """Least-squares logistic fit; ``{'params': [L, k, x0], 'r2': ..., 'n': ...}`` (r2 NaN if it cannot fit)."""
    x = np.log10(np.maximum(np.asarray(js, dtype=float), _JS_FLOOR))
    y = np.asarray(loss, dtype=float)
    if len(x) < 4 or np.ptp(y) == 0:
        return {"params": None, "r2": float("nan"), "n": int(len(x))}
    p0 = (max(float(y.max()), 1e-3), 2.0, float(np.median(x)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            params, _ = curve_fit(_curve, x, y, p0=p0, bounds=([0.0, 0.0, -13.0], [2.0, 100.0, 1.0]), maxfev=20000)
    except RuntimeError as err:  # no convergence
        _logger.warning("fit did not converge on %d points: %s", len(x), err)
        return {"params": None, "r2": float("nan"), "n": int(len(x))}
    residual = float(np.sum((y - _curve(x, *params)) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    return {"params": [float(p) for p in params], "r2": 1.0 - residual / total, "n": int(len(x))}


def load_records(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Every record of the sweep JSONL files, full-precision rows excluded."""
    records = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if record["format"] != FP_NAME:
                    records.append(record)
    return records


def fit_sweeps(records: Sequence[dict[str, Any]], similarity: str = "js_flops") -> dict[str, Any]:
    """Fits per model and overall, for clean and robust accuracy loss.

    Returns:
        ``{'similarity': ..., 'clean': {'overall': fit, 'models': {name: fit}}, 'robust': {...}}``.
    """
    models = sorted({r["model"] for r in records})
    summary: dict[str, Any] = {"similarity": similarity, "models": models}
    for target, key in TARGETS.items():
        per_model = {m: fit_curve([r[similarity] for r in records if r["model"] == m],
                                  [r[key] for r in records if r["model"] == m]) for m in models}
        summary[target] = {"overall": fit_curve([r[similarity] for r in records], [r[key] for r in records]),
                           "models": per_model}
    return summary


def plot_fits(records: Sequence[dict[str, Any]], summary: dict[str, Any], path: str | Path) -> Path:
    """Scatter of loss vs similarity per model with each model's curve (dashed) and the overall one (black)."""
    from rat.eval.aggregate import pyplot, save_figure

    plt = pyplot()
    similarity = summary["similarity"]
    fig, axes = plt.subplots(1, len(TARGETS), figsize=(6 * len(TARGETS), 4.5))
    grid = np.linspace(np.log10(max(min(r[similarity] for r in records), _JS_FLOOR)),
                       np.log10(max(r[similarity] for r in records)), 200)
    for ax, (target, key) in zip(np.atleast_1d(axes), TARGETS.items()):
        for i, model in enumerate(summary["models"]):
            pts = [r for r in records if r["model"] == model]
            fit = summary[target]["models"][model]
            color = f"C{i}"
            ax.scatter([max(r[similarity], _JS_FLOOR) for r in pts], [r[key] for r in pts], s=14, color=color,
                       label=f"{model} (R²={fit['r2']:.3f})")
            if fit["params"] is not None:
                ax.plot(10 ** grid, _curve(grid, *fit["params"]), "--", color=color, lw=1)
        overall = summary[target]["overall"]
        if overall["params"] is not None:
            ax.plot(10 ** grid, _curve(grid, *overall["params"]), "k-", lw=2, label=f"all (R²={overall['r2']:.3f})")
        ax.set_xscale("log")
        ax.set_xlabel(similarity)
        ax.set_ylabel(f"{target} accuracy loss (fp - q) / fp")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)
