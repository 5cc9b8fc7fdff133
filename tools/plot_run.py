"""Draw a run's curves (loss, learning rate, clean and robust accuracy) from its metrics.jsonl to a PNG; for an
``--augment.policy adversarial`` run also the controller's op/magnitude probabilities over epochs (OUT_policy.png).

    python tools/plot_run.py RUN_DIR [--out RUN_DIR/curves.png]

A last line cut short by a killed run is skipped, with a warning. Exit status: 0 written, 2 bad input (one line).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rat.cli import EXIT_BAD_INPUT, ArgumentParser  # noqa: E402
from rat.logging import MetricsError, read_metrics  # noqa: E402


def plot_run(run_dir: Path, out: Path) -> Path:
    torn: list[str] = []
    records = read_metrics(run_dir / "metrics.jsonl", torn)
    if torn:
        print(f"plot_run: warning: skipped the last line of {run_dir / 'metrics.jsonl'}, cut short (the run was "
              "killed while writing it)", file=sys.stderr)
    if not records:
        raise MetricsError(f"{run_dir / 'metrics.jsonl'} holds no metrics yet: plot after the first log_every steps")
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1)
    axes[0].set(title="training loss", xlabel="step")
    axes[1].plot([r["step"] for r in steps], [r["lr"] for r in steps], lw=1)
    axes[1].set(title="learning rate", xlabel="step")
    for key, label in (("top1", "clean"), ("robust_top1", "robust"), ("ema_top1", "EMA clean"),
                       ("ema_robust_top1", "EMA robust")):
        points = [(r["epoch"], r[key]) for r in epochs if key in r]
        if points:
            axes[2].plot(*zip(*points), marker="o", label=label)
    axes[2].set(title="val top-1 (%)", xlabel="epoch")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    if any("aaa_op_probs" in r for r in epochs):
        plot_policy(epochs, out.with_name(out.stem + "_policy.png"))
    return out


def plot_policy(epochs: list[dict], out: Path) -> Path:
    """Adversarial AutoAugment: the controller's op-type and magnitude probabilities over epochs (the paper's
    picture), and its reward (mean ± std) and entropy."""
    records = [r for r in epochs if "aaa_op_probs" in r]
    x = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    colours = plt.get_cmap("tab20")
    for i, op in enumerate(records[-1]["aaa_op_probs"]):
        axes[0].plot(x, [r["aaa_op_probs"][op] for r in records], marker=".", color=colours(i % 20), label=op)
    axes[0].set(title="controller: probability of each op type", xlabel="epoch")
    axes[0].legend(fontsize=7, ncol=2)
    for i, level in enumerate(records[-1]["aaa_magnitude_probs"]):
        axes[1].plot(x, [r["aaa_magnitude_probs"][level] for r in records], marker=".", color=colours(i % 20),
                     label=f"magnitude {level}")
    axes[1].set(title="controller: probability of each magnitude", xlabel="epoch")
    axes[1].legend(fontsize=7, ncol=2)
    mean = np.array([r["aaa_reward_mean"] for r in records])
    std = np.array([r["aaa_reward_std"] for r in records])
    axes[2].plot(x, mean, marker="o", label="reward (policy loss)")
    axes[2].fill_between(x, mean - std, mean + std, alpha=0.2)
    axes[2].plot(x, [r["aaa_entropy"] for r in records], marker="s", label="entropy per choice (nats)")
    axes[2].set(title="controller reward and entropy", xlabel="epoch")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="plot_run.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    metrics = args.run_dir / "metrics.jsonl"
    out = args.out or args.run_dir / "curves.png"
    if not metrics.is_file():
        print(f"plot_run: error: {metrics} not found: give the run directory (--logging.folder) of a training run",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    if out.is_dir() or not out.parent.is_dir() or out.suffix.lower() != ".png":
        print(f"plot_run: error: --out {out} must be a PNG file in an existing folder", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        print(plot_run(args.run_dir, out))
    except MetricsError as exc:
        print(f"plot_run: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
