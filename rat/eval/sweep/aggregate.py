"""Aggregate evaluation results: a table (CSV + Markdown) and a plot of robust accuracy versus resolution or eps."""
from __future__ import annotations

import csv
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rat.eval.results import format_eps

__all__ = ["choose_axis", "plot_rows", "pyplot", "result_row", "save_figure", "write_csv", "write_markdown"]

_logger = logging.getLogger(__name__)

COLUMNS = ("model", "arch", "norm", "eps", "eps_text", "resolution", "version", "n_ex", "clean_acc", "robust_acc",
           "standard_settings", "result")


def result_row(result: dict[str, Any], path: str | Path | None = None) -> dict[str, Any]:
    """One table row from a result (accuracies as fractions)."""
    return {
        "model": result["model"], "arch": result.get("arch"), "norm": result["norm"], "eps": result["eps"],
        "eps_text": format_eps(result["norm"], result["eps"]), "resolution": result["resolution"],
        "version": result["version"], "n_ex": result["n_ex"], "clean_acc": result["clean_accuracy"],
        "robust_acc": result["robust_accuracy"], "standard_settings": result.get("standard_settings", True),
        "result": str(path) if path is not None else result.get("output"),
    }


def _sorted(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (r["model"], r["norm"], r["eps"], r["resolution"], r["version"]))


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """All rows as CSV (accuracies as fractions)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
        writer.writeheader()
        for row in _sorted(rows):
            writer.writerow({k: row[k] for k in COLUMNS})
    return path


def write_markdown(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """A Markdown table: model × threat model × resolution → clean / robust accuracy in %."""
    path = Path(path)
    lines = ["| model | threat model | resolution | AutoAttack | n | clean (%) | robust (%) |",
             "|---|---|---:|---|---:|---:|---:|"]
    for row in _sorted(rows):
        version = row["version"] if row["standard_settings"] else f"{row['version']} (non-standard settings)"
        lines.append(f"| {row['model']} | {row['norm']} ε={row['eps_text']} | {row['resolution']} | {version} | "
                     f"{row['n_ex']} | {100 * row['clean_acc']:.1f} | {100 * row['robust_acc']:.1f} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def choose_axis(rows: Sequence[dict[str, Any]]) -> str:
    """``resolution`` when some model/threat model has several resolutions, ``eps`` when some model/norm/resolution
    has several radii, else ``resolution``."""
    resolutions: dict[tuple, set] = defaultdict(set)
    radii: dict[tuple, set] = defaultdict(set)
    for r in rows:
        resolutions[(r["model"], r["norm"], r["eps"], r["version"])].add(r["resolution"])
        radii[(r["model"], r["norm"], r["resolution"], r["version"])].add(r["eps"])
    most_res = max((len(v) for v in resolutions.values()), default=0)
    most_eps = max((len(v) for v in radii.values()), default=0)
    return "eps" if most_eps > 1 and most_eps > most_res else "resolution"


def plot_rows(rows: Sequence[dict[str, Any]], path: str | Path, x: str = "auto") -> Path:
    """Plot robust accuracy (and clean accuracy, dashed) versus resolution or eps, one line per model and threat model.

    Args:
        rows: from ``result_row``.
        path: the PNG to write.
        x: ``resolution``, ``eps`` (one panel per norm) or ``auto`` (see ``choose_axis``).
    """
    plt = pyplot()
    if x == "auto":
        x = choose_axis(rows)
    if x not in ("resolution", "eps"):
        raise ValueError(f"plot axis must be resolution, eps or auto, got {x!r}")
    norms = sorted({r["norm"] for r in rows}) if x == "eps" else ["all"]
    fig, axes = plt.subplots(1, len(norms), figsize=(9 * len(norms), 4.5), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        lines: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            if x == "eps" and r["norm"] != norm:
                continue
            key = (f"{r['model']} {r['norm']} ε={r['eps_text']} {r['version']}" if x == "resolution"
                   else f"{r['model']} {r['resolution']}px {r['version']}")
            lines[key].append(r)
        scale = 255.0 if x == "eps" and norm == "Linf" else 1.0  # Linf radii read best in units of 1/255
        for label, points in sorted(lines.items()):
            points.sort(key=lambda r: r[x])
            xs = [p[x] * scale for p in points]
            (line,) = ax.plot(xs, [100 * p["robust_acc"] for p in points], marker="o", label=label)
            ax.plot(xs, [100 * p["clean_acc"] for p in points], marker=".", linestyle="--", color=line.get_color(),
                    alpha=0.6)
        unit = ", in units of 1/255" if scale > 1 else ""
        ax.set_xlabel("resolution (px)" if x == "resolution" else f"ε ({norm}{unit})")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        if x == "eps":
            ax.set_title(norm)
    fig.suptitle(f"AutoAttack robust (solid) and clean (dashed) accuracy versus {'ε' if x == 'eps' else x}")
    return save_figure(fig, path)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported on first use: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lay out ``fig``, write it as a PNG at 120 dpi (creating the folder) and close it."""
    plt = pyplot()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
