"""Accuracy loss as a function of weight similarity, fitted across sweeps: R² per model and overall, and a plot.

The curve is a logistic in ``log10(js)``: ``loss = L / (1 + exp(-k (log10 js - x0)))``. Accuracy loss is ~0 while
the quantized weights are close to the full-precision ones and saturates (at chance level) once they are far; the
logistic has exactly that shape (scipy's ``curve_fit`` does the least squares). ``R² = 1 - SS_res / SS_tot`` of each
fit on its own points. Left out of every fit: the full-precision rows of a sweep (js = 0) and the formats whose grid
equals an earlier format's in the same sweep (``same_grid_as``: FLOAT<b>_E1 = INT<b>, FLOAT<b>_E<b-1>M0 = POT<b>;
they would count one model twice). A fit needs more points than its 3 parameters (:data:`MIN_POINTS`); the summary
holds no NaN (a fit that cannot be made has ``r2`` null).
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
from scipy.special import expit

from rat.quant.similarity import SIMILARITIES
from rat.quant.sweep import FP_NAME, HIST_PREFIX

__all__ = ["FIT_SIMILARITIES", "MIN_POINTS", "TARGETS", "FitError", "fit_curve", "fit_sweeps", "fit_table",
           "load_records", "plot_fits"]

_logger = logging.getLogger(__name__)

TARGETS = {"clean": "acc_loss", "robust": "robust_loss"}
# the seed's measure (js_*) and rat's histogram (hist_js_*), each weighted four ways
FIT_SIMILARITIES = (*SIMILARITIES, *(HIST_PREFIX + s for s in SIMILARITIES))
MIN_POINTS = 4  # more points than the logistic's 3 parameters
_JS_FLOOR = 1e-12  # log10 of a divergence that rounds to 0
_NEEDED = ("model", "format", "acc_loss", "robust_loss")


class FitError(ValueError):
    """Sweep files that cannot be fitted (not a sweep JSONL, a torn line, too few points); the message says why."""


def _curve(log_js: np.ndarray, top: float, slope: float, mid: float) -> np.ndarray:
    return top * expit(slope * (log_js - mid))  # top / (1 + exp(-slope (x - mid))), without overflow


def fit_curve(js: Sequence[float], loss: Sequence[float]) -> dict[str, Any]:
    """Least-squares logistic fit; ``{'params': [L, k, x0], 'r2': ..., 'n': ...}`` (``params`` and ``r2`` None if it
    cannot fit: fewer than :data:`MIN_POINTS` points, a constant loss, no convergence)."""
    x = np.log10(np.maximum(np.asarray(js, dtype=float), _JS_FLOOR))
    y = np.asarray(loss, dtype=float)
    if len(x) < MIN_POINTS or np.ptp(y) == 0:
        return {"params": None, "r2": None, "n": int(len(x))}
    # the midpoint within two decades of the data (the similarities' scales differ by orders of magnitude)
    low, high = float(x.min()) - 2.0, float(x.max()) + 2.0
    p0 = (min(max(float(y.max()), 1e-3), 2.0), 2.0, float(np.median(x)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            params, _ = curve_fit(_curve, x, y, p0=p0, bounds=([0.0, 0.0, low], [2.0, 100.0, high]), maxfev=20000)
    except RuntimeError as err:  # no convergence
        _logger.warning("fit did not converge on %d points: %s", len(x), err)
        return {"params": None, "r2": None, "n": int(len(x))}
    residual = float(np.sum((y - _curve(x, *params)) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    return {"params": [float(p) for p in params], "r2": 1.0 - residual / total, "n": int(len(x))}


def load_records(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Every quantized record of the sweep JSONL files: full-precision rows and ``same_grid_as`` duplicates excluded.

    Raises:
        FitError: a file that is not a sweep JSONL (e.g. the sweep.csv) or has a line that is not a sweep record
            (a truncated file).
    """
    records = []
    for path in paths:
        path = Path(path)
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise FitError(f"fit.sweeps: {path} line {number} is not JSON (a sweep.csv, or a torn sweep.jsonl): "
                               "give the sweep.jsonl of python -m rat.quant sweep, or drop its last line if the "
                               "sweep was cut short") from None
            if not isinstance(record, dict) or any(key not in record for key in _NEEDED):
                raise FitError(f"fit.sweeps: {path} line {number} is not a sweep record (needs "
                               f"{', '.join(_NEEDED)}): give the sweep.jsonl of python -m rat.quant sweep")
            if record["format"] != FP_NAME and "same_grid_as" not in record:
                records.append(record)
    return records


def fit_sweeps(records: Sequence[dict[str, Any]], similarity: str = "js_flops") -> dict[str, Any]:
    """Fits per model and overall, for clean and robust accuracy loss.

    Raises:
        FitError: a model with fewer than :data:`MIN_POINTS` points, or records without ``similarity``.

    Returns:
        ``{'similarity': ..., 'clean': {'overall': fit, 'models': {name: fit}}, 'robust': {...}}``.
    """
    models = sorted({r["model"] for r in records})
    missing = sorted({r["model"] for r in records if similarity not in r})
    if missing:
        raise FitError(f"fit.similarity={similarity}: the sweeps of {', '.join(missing)} do not record it (written "
                       "by an older rat.quant): sweep them again")
    for model in models:
        n = sum(r["model"] == model for r in records)
        if n < MIN_POINTS:
            raise FitError(f"fit.sweeps: {model} has {n} distinct quantized point(s); a fit of 3 parameters needs at "
                           f"least {MIN_POINTS}: sweep more formats")
    summary: dict[str, Any] = {"similarity": similarity, "models": models}
    for target, key in TARGETS.items():
        per_model = {m: fit_curve([r[similarity] for r in records if r["model"] == m],
                                  [r[key] for r in records if r["model"] == m]) for m in models}
        summary[target] = {"overall": fit_curve([r[similarity] for r in records], [r[key] for r in records]),
                           "models": per_model}
    return summary


def fit_table(summaries: Sequence[dict[str, Any]], target: str = "clean") -> str:
    """The seed's table: one column per model and one for all, a row of R² per summary (similarity)."""
    models = summaries[0]["models"]

    def cell(fit: dict[str, Any]) -> str:
        return "–" if fit["r2"] is None else f"{fit['r2']:.4f}"

    lines = ["| similarity | " + " | ".join(models) + " | all |", "|---" * (len(models) + 2) + "|"]
    for summary in summaries:
        fits = summary[target]
        lines.append(f"| {summary['similarity']} | " + " | ".join(cell(fits["models"][m]) for m in models)
                     + f" | {cell(fits['overall'])} |")
    return "\n".join(lines)


def plot_fits(records: Sequence[dict[str, Any]], summary: dict[str, Any], path: str | Path) -> Path:
    """Scatter of loss vs similarity per model with each model's curve (dashed) and the overall one (black)."""
    from rat.eval.sweep.aggregate import pyplot, save_figure

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
                       label=f"{model} (R²={'–' if fit['r2'] is None else format(fit['r2'], '.3f')})")
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
