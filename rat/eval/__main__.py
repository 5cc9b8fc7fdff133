"""``python -m rat.eval``: one AutoAttack evaluation of a checkpoint; writes a JSON result and a log, prints one line.

Example::

    python -m rat.eval --checkpoint runs/convnext_b/checkpoint.pth --data /data/imagenet/val.beton \\
        --norm Linf --eps 4/255 --resolution 224 --version standard --n-ex 5000 --batch-size 100 --precision bf16

Run the same command again after an interruption to resume; see docs/eval.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from rat.attacks import NORMS
from rat.cli import EXIT_BAD_INPUT, EXIT_FAILED, ArgumentParser
from rat.eval.autoattack import ALL_ATTACKS, VERSIONS
from rat.eval.data import SUBSETS, select_subset
from rat.eval.evaluate import SPEC_DEFAULTS, EvalSpec, resolve, run_evaluation
from rat.eval.results import parse_eps, summary_line
from rat.io import OutputError, check_writable
from rat.logging import PROGRESS_HELP, PROGRESS_SETTINGS, logging_scope, setup_logging
from rat.precision import PRECISIONS

_logger = logging.getLogger("rat.eval")


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--shard takes INDEX/COUNT such as 0/4, got {text!r}") from exc
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text}: INDEX must be in 0..COUNT-1")
    return index, count


def _eps(text: str) -> float:
    try:
        return parse_eps(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device: use cpu, cuda or cuda:N") from exc
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: rat.eval runs on cpu or cuda[:N]")
    return text


def _device_problem(text: str | None) -> str | None:
    """Why ``--device`` cannot be used on this machine, or None."""
    if text is None or torch.device(text).type != "cuda":
        return None
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = torch.device(text).index or 0
    if index >= visible:
        return f"--device {text}: {visible} CUDA device(s) visible here; use --device cpu or a visible GPU"
    return None


def _kwargs(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--model-kwargs takes a JSON object such as '{{\"num_classes\": 10}}': "
                                         f"{exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--model-kwargs takes a JSON object such as '{\"num_classes\": 10}'")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m rat.eval``."""
    parser = ArgumentParser(
        prog="python -m rat.eval",
        description="One AutoAttack evaluation of a checkpoint: writes a JSON result and a log, prints a one-line "
                    "summary. Run the same command again to resume an interrupted evaluation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--checkpoint", type=Path, help="rat trainer checkpoint, bare state dict or released checkpoint")
    model.add_argument("--arch", help="architecture; only for checkpoints that do not name it, or random weights")
    model.add_argument("--model-kwargs", type=_kwargs, default={}, help="JSON kwargs for create_model (num_classes...)")
    model.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights of a rat checkpoint")
    model.add_argument("--normalize", type=int, choices=(0, 1),
                       help="1: ImageNet mean/std normalization inside the model, 0: raw [0,1] inputs (default: what "
                            "the checkpoint says; required for a checkpoint that does not say)")
    model.add_argument("--name", help="model name in the result (default: <run folder>-<file stem>)")
    threat = parser.add_argument_group("threat model")
    threat.add_argument("--norm", choices=NORMS, default=SPEC_DEFAULTS["norm"])
    threat.add_argument("--eps", type=_eps, help="radius in [0,1] pixel units, e.g. 4/255 (default: Linf 4/255, "
                                                 "L2 2, L1 75)")
    threat.add_argument("--resolution", type=_positive_int,
                        help="input side (default: the checkpoint's training size, or 224)")
    attack = parser.add_argument_group("AutoAttack")
    attack.add_argument("--version", choices=VERSIONS, default=SPEC_DEFAULTS["version"],
                        help="standard: APGD-CE, APGD-T, FAB-T, Square; fast: APGD-CE, APGD-T; custom: --attacks")
    attack.add_argument("--attacks", nargs="+", choices=ALL_ATTACKS, help="attacks of --version custom, in order")
    attack.add_argument("--seed", type=int, default=SPEC_DEFAULTS["seed"], help="AutoAttack seed")
    attack.add_argument("--n-iter", type=_positive_int, help="APGD/FAB iterations instead of 100 (smoke tests only)")
    attack.add_argument("--n-queries", type=_positive_int, help="Square queries instead of 5000 (smoke tests only)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, required=True, help="val .beton or ImageNet-style val folder")
    data.add_argument("--n-ex", type=_positive_int, default=SPEC_DEFAULTS["n_ex"],
                      help="images of the fixed val subset")
    data.add_argument("--subset", choices=SUBSETS, default=SPEC_DEFAULTS["subset"],
                      help="robustbench: RobustBench's 5000 ImageNet val files; seeded: a seeded sample of the val "
                           "set; auto: robustbench on ImageNet-1k, else seeded")
    data.add_argument("--batch-size", type=_positive_int, default=SPEC_DEFAULTS["batch_size"],
                      help="images per batch (unit of resuming/sharding)")
    data.add_argument("--num-workers", type=_positive_int, default=SPEC_DEFAULTS["num_workers"])
    data.add_argument("--shard", type=_shard, help="INDEX/COUNT: evaluate one of COUNT slices of the batches")
    run = parser.add_argument_group("run")
    run.add_argument("--precision", choices=list(PRECISIONS), default=SPEC_DEFAULTS["precision"])
    run.add_argument("--device", type=_device, help="default: cuda if available, else cpu")
    run.add_argument("--threads", type=_positive_int, help="torch CPU threads")
    run.add_argument("--output", type=Path,
                     help="JSON result (default: aa_<norm>-<eps>_r<res>_<version>_n<n_ex>_<checkpoint>_<fingerprint>"
                          ".json next to the checkpoint; never replaces another evaluation's result)")
    run.add_argument("--log", help="log file (default: the result path with .log; '-' for none)")
    run.add_argument("--progress", choices=PROGRESS_SETTINGS, default="auto", help=PROGRESS_HELP)
    return parser


def spec_from_args(args: argparse.Namespace) -> EvalSpec:
    """An ``EvalSpec`` from parsed arguments."""
    return EvalSpec(data=args.data, checkpoint=args.checkpoint, arch=args.arch, model_kwargs=args.model_kwargs,
                    use_ema=args.use_ema, normalize=None if args.normalize is None else bool(args.normalize),
                    norm=args.norm, eps=args.eps, resolution=args.resolution, version=args.version,
                    attacks=args.attacks, n_ex=args.n_ex, subset=args.subset, batch_size=args.batch_size,
                    precision=args.precision, device=args.device, num_workers=args.num_workers, seed=args.seed,
                    shard=args.shard, n_iter=args.n_iter, n_queries=args.n_queries, output=args.output,
                    name=args.name)


@logging_scope()
def main(argv: Sequence[str] | None = None) -> int:
    """Run one evaluation; returns the exit status (0 done, 1 failed, 2 bad input), each error one line on stderr."""
    from rat.models import CheckpointError as UnreadableCheckpoint

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.checkpoint is None and args.arch is None:
        parser.error("pass --checkpoint PATH (or --arch NAME for random weights)")
    problem = _device_problem(args.device)
    if problem:
        parser.error(problem)
    setup_logging(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        resolved = resolve(spec_from_args(args))
        select_subset(resolved.spec.data, resolved.spec.n_ex, resolved.spec.subset)  # readable, large enough
        output = Path(resolved.spec.output)
        check_writable(output.parent, "output folder")
    except (ValueError, FileNotFoundError, UnreadableCheckpoint, OutputError) as exc:
        _logger.error("%s", exc)
        return EXIT_BAD_INPUT
    if args.log != "-":
        log_file = Path(args.log) if args.log else output.with_suffix(".log")
        log_file.parent.mkdir(parents=True, exist_ok=True)
        setup_logging(0, log_file)
    try:
        result = run_evaluation(resolved, progress_setting=args.progress)
    except (ValueError, FileNotFoundError, UnreadableCheckpoint) as exc:
        _logger.error("%s", exc)
        return EXIT_BAD_INPUT
    except OSError as exc:
        _logger.error("evaluation stopped: %s; finished batches are kept in its state file, run the same command "
                      "again to resume", exc)
        return EXIT_FAILED
    except Exception:
        _logger.exception("evaluation failed")
        return EXIT_FAILED
    print(summary_line(result))  # the one-line summary on stdout, for people and scripts
    return 0


if __name__ == "__main__":
    sys.exit(main())
