"""Bulk AutoAttack evaluations (``runner_aa_eval.py``): checkpoints × threat models × resolutions × versions.

Every evaluation runs as its own ``python -m rat.eval`` subprocess, started with an argument list (no shell), on a
free GPU (found with GPUtil; ``CUDA_VISIBLE_DEVICES`` set per job) or, when the machine has no GPU, in one of
``--cpu-slots`` CPU slots. The jobs file is checked against one schema before anything starts
(``rat.eval.sweep.jobs``); the scheduling, the claims that let several runners share one jobs file, and signal
forwarding are in ``rat.eval.sweep.scheduler``, the slots in ``rat.eval.sweep.slots``. A failing job is reported
with its log and does not stop the others; jobs whose result JSON already exists and is valid are skipped, so
rerunning the same command finishes what is missing (interrupted evaluations resume from their state files). A job
with ``shards: K`` runs as K subprocesses, each on a slice of the images, merged exactly into one result. At the end
the runner writes ``summary.csv``, ``summary.md`` and a plot of robust accuracy versus resolution or eps into the
output folder. See docs/eval.md for the jobs file.

Exit status: 0 every job finished, 1 some job failed, 2 bad input (one line), 128 + N when stopped by signal N.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import signal
from collections.abc import Sequence
from pathlib import Path

from rat.cli import EXIT_BAD_INPUT, ArgumentParser
from rat.eval.spec import DEFAULT_RESOLUTION, SPEC_DEFAULTS
from rat.eval.sweep.aggregate import choose_axis, plot_rows, result_row, write_csv, write_markdown
from rat.eval.sweep.jobs import Job, JobsError, Task, expand_jobs, load_jobs_file, task_command, tasks_for
from rat.eval.sweep.scheduler import is_finished, run_tasks, valid_result
from rat.eval.sweep.slots import Slots, SubmititSlots, cpu_count, has_gpus
from rat.io import OutputError, check_writable
from rat.logging import PROGRESS_HELP, PROGRESS_SETTINGS, logging_scope, setup_logging
from rat.precision import PRECISIONS

__all__ = ["aggregate", "build_parser", "main"]

_logger = logging.getLogger(__name__)


def aggregate(jobs: Sequence[Job], output_dir: str | Path, plot_x: str = "auto") -> list[Path]:
    """Write summary.csv, summary.md and robust_vs_<x>.png for the jobs with a valid result; returns the paths."""
    rows = []
    for job in jobs:
        result = valid_result(job.output, job)
        if result is not None:
            rows.append(result_row(result, job.output))
    if not rows:
        _logger.warning("no finished results to aggregate")
        return []
    output_dir = Path(output_dir)
    paths = [write_csv(rows, output_dir / "summary.csv"), write_markdown(rows, output_dir / "summary.md")]
    axis = choose_axis(rows) if plot_x == "auto" else plot_x
    paths.append(plot_rows(rows, output_dir / f"robust_vs_{axis}.png", axis))
    return paths


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``runner_aa_eval.py``."""
    parser = ArgumentParser(
        prog="runner_aa_eval.py",
        description="Bulk AutoAttack evaluations (checkpoints × threat models × resolutions × versions) on free GPUs "
                    "or CPU slots; see docs/eval.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--jobs", type=Path, help="YAML jobs file (see docs/eval.md); or describe one sweep by flags")
    parser.add_argument("--output-dir", type=Path, help="results folder (overrides the jobs file's output_dir)")
    sweep = parser.add_argument_group("sweep by flags (without --jobs)")
    sweep.add_argument("--checkpoints", nargs="+", help="checkpoint files")
    sweep.add_argument("--arch", help="architecture for checkpoints that do not name it")
    sweep.add_argument("--data", help="val .beton or ImageNet-style val folder")
    sweep.add_argument("--threats", nargs="+", default=[SPEC_DEFAULTS["norm"]],
                       help="NORM or NORM:EPS, e.g. Linf:4/255 L2:2 L1:75")
    sweep.add_argument("--resolutions", nargs="+", type=int, default=[DEFAULT_RESOLUTION])
    sweep.add_argument("--versions", nargs="+", default=[SPEC_DEFAULTS["version"]], help="standard, fast or custom")
    sweep.add_argument("--attacks", nargs="+", help="attacks of version custom")
    sweep.add_argument("--n-ex", type=int, default=SPEC_DEFAULTS["n_ex"])
    sweep.add_argument("--batch-size", type=int, default=SPEC_DEFAULTS["batch_size"])
    sweep.add_argument("--precision", default=SPEC_DEFAULTS["precision"], choices=list(PRECISIONS))
    sweep.add_argument("--num-workers", type=int, default=SPEC_DEFAULTS["num_workers"])
    sweep.add_argument("--use-ema", action="store_true")
    sweep.add_argument("--shards", type=int, default=1, help="split each evaluation over this many GPUs/slots")
    sweep.add_argument("--n-iter", type=int, help="APGD/FAB iterations (smoke tests only)")
    sweep.add_argument("--n-queries", type=int, help="Square queries (smoke tests only)")
    sched = parser.add_argument_group("scheduling")
    sched.add_argument("--max-load", type=float, default=0.1, help="GPUtil maxLoad: a GPU busier than this is skipped")
    sched.add_argument("--max-memory", type=float, default=0.1, help="GPUtil maxMemory: fraction of memory in use")
    sched.add_argument("--exclude-gpus", type=int, nargs="+", default=[], help="GPU ids (nvidia-smi) never to use")
    sched.add_argument("--cpu-slots", type=int, default=1, help="parallel CPU jobs when there is no GPU")
    sched.add_argument("--cpu", action="store_true", help="use CPU slots even if there are GPUs")
    sched.add_argument("--poll-interval", type=float, default=10.0, help="seconds between checks")
    sched.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    sched.add_argument("--plot-x", choices=["auto", "resolution", "eps"], default="auto")
    sched.add_argument("--progress", choices=PROGRESS_SETTINGS, default="auto", help=PROGRESS_HELP)
    slurm = parser.add_argument_group("SLURM (through submitit; pip install rat[slurm])")
    slurm.add_argument("--launcher", choices=["local", "slurm", "submitit-local"], default="local",
                       help="local: subprocesses on this machine's GPUs/CPU slots; slurm: one SLURM job per task; "
                            "submitit-local: the same jobs through submitit's local executor (tests, dry runs)")
    slurm.add_argument("--slurm-partition", help="partition of the jobs")
    slurm.add_argument("--slurm-gpus", type=int, default=1, help="GPUs per job (0: CPU jobs)")
    slurm.add_argument("--slurm-cpus", type=int, default=8, help="CPUs per job (the threads of a CPU job)")
    slurm.add_argument("--slurm-timeout-min", type=int, default=240, help="time limit per job, minutes")
    slurm.add_argument("--slurm-mem-gb", type=float, help="memory per job, GB")
    slurm.add_argument("--slurm-parallel", type=int, default=64, help="at most this many jobs queued or running")
    slurm.add_argument("--slurm-option", action="append", default=[], metavar="KEY=VALUE",
                       help="further #SBATCH option, e.g. account=abc or qos=high (repeatable)")
    slurm.add_argument("--submitit-folder", type=Path,
                       help="submitit's job scripts and logs (default: <output_dir>/.submitit)")
    return parser


def _jobs_from_args(args: argparse.Namespace) -> tuple[list[Job], Path]:
    if args.jobs is not None:
        return load_jobs_file(args.jobs, args.output_dir)
    if not args.checkpoints and not args.arch:
        raise JobsError("give --jobs FILE, or --checkpoints (and --data, --threats, ...) to describe a sweep")
    if args.output_dir is None:
        raise JobsError("pass --output-dir for the results")
    entry = {"checkpoints": args.checkpoints, "arch": args.arch, "data": args.data, "threats": args.threats,
             "resolutions": args.resolutions, "versions": args.versions, "attacks": args.attacks, "n_ex": args.n_ex,
             "batch_size": args.batch_size, "precision": args.precision, "num_workers": args.num_workers,
             "use_ema": args.use_ema, "shards": args.shards, "n_iter": args.n_iter, "n_queries": args.n_queries}
    return expand_jobs([entry], args.output_dir), Path(args.output_dir)


def missing_inputs(tasks: Sequence[Task]) -> list[str]:
    """``job NAME: checkpoint|data PATH does not exist`` for each input of a task still to run that is not there
    (paths as the evaluations will see them: relative to the current folder), each once, in task order; and a data
    folder that rat.eval would refuse (listed by real path: a link back into it, one file reached twice)."""
    from rat.data import list_image_folder

    missing: dict[str, None] = {}
    listed: set[str] = set()
    for task in tasks:
        if is_finished(task):
            continue
        for kind, path in (("checkpoint", task.job.spec.checkpoint), ("data", task.job.spec.data)):
            if path and not Path(path).exists():
                missing[f"job {task.job.name!r}: {kind} {path} does not exist"] = None
            elif kind == "data" and path and Path(path).is_dir() and str(path) not in listed:
                listed.add(str(path))
                try:
                    list_image_folder(path)
                except (ValueError, FileNotFoundError) as exc:
                    missing[f"job {task.job.name!r}: data {path}: {exc}"] = None
    return list(missing)


def _submitit_slots(args: argparse.Namespace, output_dir: Path) -> SubmititSlots:
    """The SLURM (or submitit-local) slots the flags describe.

    Raises:
        ValueError: a bad flag or submitit missing; the message names the fix.
    """
    try:
        import submitit  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"--launcher {args.launcher} needs submitit: pip install submitit (or rat[slurm])") from exc
    extra = {}
    for option in args.slurm_option:
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--slurm-option {option!r}: use KEY=VALUE, e.g. account=abc")
        extra[key.strip()] = value
    for flag, value, low in (("--slurm-gpus", args.slurm_gpus, 0), ("--slurm-cpus", args.slurm_cpus, 1),
                             ("--slurm-timeout-min", args.slurm_timeout_min, 1),
                             ("--slurm-parallel", args.slurm_parallel, 1)):
        if value < low:
            raise ValueError(f"{flag} must be at least {low}, got {value}")
    return SubmititSlots(folder=args.submitit_folder or output_dir / ".submitit",
                         cluster="local" if args.launcher == "submitit-local" else "slurm",
                         parallel=args.slurm_parallel, gpus=args.slurm_gpus, cpus_per_task=args.slurm_cpus,
                         timeout_min=args.slurm_timeout_min, mem_gb=args.slurm_mem_gb,
                         partition=args.slurm_partition, extra=extra)


@logging_scope()
def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep; returns 0 when every job finished, 1 when some failed, 2 on bad input."""
    args = build_parser().parse_args(argv)
    setup_logging(0)
    try:
        jobs, output_dir = _jobs_from_args(args)
    except JobsError as exc:
        _logger.error("%s", exc)
        return EXIT_BAD_INPUT
    tasks = tasks_for(jobs)
    use_gpus = not args.cpu and has_gpus()
    if args.cpu_slots < 1:
        _logger.error("--cpu-slots must be at least 1")
        return EXIT_BAD_INPUT
    missing = missing_inputs(tasks)
    if args.dry_run:
        slots_threads = None if use_gpus else max(1, cpu_count() // args.cpu_slots)
        for task in tasks:
            mark = "skip" if is_finished(task) else "run "
            cmd = task_command(task, "cuda" if use_gpus else "cpu", slots_threads)
            print(f"{mark} {task.label}\n     {shlex.join(cmd)}")
        print(f"{sum(not is_finished(t) for t in tasks)} of {len(tasks)} tasks would run on "
              f"{'GPUs' if use_gpus else f'{args.cpu_slots} CPU slot(s)'}")
        for line in missing:
            print(f"warning: {line}: a run would refuse to start")
        return 0
    if missing:  # before anything starts: a mistyped path is one line now, not a failed task per resolution later
        more = f" (and {len(missing) - 1} more missing input(s))" if len(missing) > 1 else ""
        _logger.error("%s%s: fix the path in the jobs file, or remove the job", missing[0], more)
        return EXIT_BAD_INPUT
    try:
        check_writable(output_dir, "output_dir")
    except OutputError as exc:
        _logger.error("%s", exc)
        return EXIT_BAD_INPUT
    if args.launcher != "local":
        try:
            slots = _submitit_slots(args, output_dir)
        except ValueError as exc:
            _logger.error("%s", exc)
            return EXIT_BAD_INPUT
        where = (f"{args.launcher} jobs ({args.slurm_gpus} GPU(s) or {args.slurm_cpus} CPUs each, at most "
                 f"{args.slurm_parallel} at a time)")
    else:
        slots = Slots(gpus=use_gpus, cpu_slots=args.cpu_slots, max_load=args.max_load, max_memory=args.max_memory,
                      exclude=args.exclude_gpus)
        if use_gpus and set(range(slots.n_gpus)) <= set(args.exclude_gpus):
            _logger.error("--exclude-gpus %s leaves none of the %d GPUs: exclude fewer, or pass --cpu",
                          " ".join(map(str, args.exclude_gpus)), slots.n_gpus)
            return EXIT_BAD_INPUT
        where = f"{slots.n_gpus} GPU(s)" if use_gpus else f"{args.cpu_slots} CPU slot(s)"
    _logger.info("%d jobs, %d tasks, on %s", len(jobs), len(tasks), where)
    status, stopped_by = run_tasks(tasks, slots, poll_interval=args.poll_interval, progress_setting=args.progress)
    if stopped_by is not None:
        stopped = sum(s == "stopped" for s in status.values())
        _logger.warning("stopped by %s: %d running evaluation(s) stopped; rerun the same command to resume",
                        signal.Signals(stopped_by).name, stopped)
        return 128 + stopped_by
    for path in aggregate(jobs, output_dir, args.plot_x):
        _logger.info("wrote %s", path)
    failed = [t for t, s in status.items() if s == "failed"]
    counts = {s: sum(v == s for v in status.values()) for s in ("done", "skipped", "failed")}
    _logger.info("finished: %d done, %d skipped (already finished), %d failed", counts["done"], counts["skipped"],
                 counts["failed"])
    for task in failed:
        _logger.error("failed: %s; log: %s", task.label, task.log)
    return 1 if failed else 0


