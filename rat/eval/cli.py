"""The command line of ``python -m rat.eval`` (one AutoAttack evaluation of a checkpoint): its parser, generated from
:class:`rat.eval.spec.EvalSpec` plus the flags of the run itself (threads, log, progress), and ``main``, which the
entry point and a runner's SLURM job (:mod:`rat.eval.sweep.slots`) call.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from rat.cli import EXIT_BAD_INPUT, EXIT_FAILED, ArgumentParser
from rat.eval.data import select_subset
from rat.eval.evaluate import resolve, run_evaluation
from rat.eval.results import summary_line
from rat.eval.rules import WholeNumber
from rat.eval.spec import add_arguments, spec_from_args
from rat.io import OutputError, check_writable
from rat.logging import PROGRESS_HELP, PROGRESS_SETTINGS, logging_scope, setup_logging

__all__ = ["build_parser", "main"]

_logger = logging.getLogger("rat.eval")

GROUPS = ("model", "threat model", "AutoAttack", "data", "run")  # the --help groups of the settings, in this order


def _device_problem(text: str | None) -> str | None:
    """Why ``--device`` cannot be used on this machine, or None."""
    if text is None or torch.device(text).type != "cuda":
        return None
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = torch.device(text).index or 0
    if index >= visible:
        return f"--device {text}: {visible} CUDA device(s) visible here; use --device cpu or a visible GPU"
    return None


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m rat.eval``: a flag per :class:`~rat.eval.spec.EvalSpec` field, and
    the run's own flags."""
    parser = ArgumentParser(
        prog="python -m rat.eval",
        description="One AutoAttack evaluation of a checkpoint: writes a JSON result and a log, prints a one-line "
                    "summary. Run the same command again to resume an interrupted evaluation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = {title: parser.add_argument_group(title) for title in GROUPS}
    add_arguments(groups)
    run = groups["run"]
    run.add_argument("--threads", type=WholeNumber(1).parse, help="torch CPU threads")
    run.add_argument("--log", help="log file (default: the result path with .log; '-' for none)")
    run.add_argument("--progress", choices=PROGRESS_SETTINGS, default="auto", help=PROGRESS_HELP)
    return parser


@logging_scope()
def main(argv: Sequence[str] | None = None) -> int:
    """Run one evaluation; returns the exit status (0 done, 1 failed, 2 bad input), each error one line on stderr."""
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
    except (ValueError, FileNotFoundError, OutputError) as exc:  # CheckpointError is a ValueError
        _logger.error("%s", exc)
        return EXIT_BAD_INPUT
    if args.log != "-":
        log_file = Path(args.log) if args.log else output.with_suffix(".log")
        log_file.parent.mkdir(parents=True, exist_ok=True)
        setup_logging(0, log_file)
    try:
        result = run_evaluation(resolved, progress_setting=args.progress)
    except (ValueError, FileNotFoundError) as exc:
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
