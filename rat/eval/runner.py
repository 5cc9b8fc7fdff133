"""Bulk AutoAttack evaluations (``runner_aa_eval.py``): checkpoints × threat models × resolutions × versions.

Every evaluation runs as its own ``python -m rat.eval`` subprocess, started with an argument list (no shell), on a
free GPU (found with GPUtil; ``CUDA_VISIBLE_DEVICES`` set per job) or, when the machine has no GPU, in one of
``--cpu-slots`` CPU slots. A failing job is reported with its log and does not stop the others; jobs whose result
JSON already exists and is valid are skipped, so rerunning the same command finishes what is missing (interrupted
evaluations resume from their state files). A job with ``shards: K`` runs as K subprocesses, each on a slice of the
images, merged exactly into one result. At the end the runner writes ``summary.csv``, ``summary.md`` and a plot of
robust accuracy versus resolution or eps into the output folder. See docs/eval.md for the jobs file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import yaml

from rat.config import DEFAULT_EPS, NORMS
from rat.eval.aggregate import choose_axis, plot_rows, result_row, write_csv, write_markdown
from rat.eval.autoattack import resolve_attacks
from rat.eval.evaluate import PRECISIONS, default_model_name, file_sha256
from rat.eval.results import (
    ResultError,
    eps_tag,
    format_eps,
    load_result,
    merge_results,
    parse_eps,
    result_matches,
)
from rat.eval.state import atomic_write_json

__all__ = ["Job", "JobsError", "Slots", "Task", "expand_jobs", "load_jobs_file", "main", "run_tasks", "task_command"]

_logger = logging.getLogger(__name__)

# Keys of a jobs-file entry (and of its ``defaults``), with their defaults.
ENTRY_DEFAULTS: dict[str, Any] = {
    "checkpoint": None, "checkpoints": None, "name": None, "arch": None, "model_kwargs": None, "use_ema": False,
    "data": None, "threats": ["Linf"], "resolutions": [224], "versions": ["standard"], "attacks": None, "n_ex": 5000,
    "batch_size": 100, "precision": "fp32", "num_workers": 4, "seed": 0, "n_iter": None, "n_queries": None,
    "shards": 1, "normalize": None,
}
_TOP_KEYS = {"output_dir", "defaults", "jobs"}
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class JobsError(ValueError):
    """A problem in the jobs file or flags; the message names the entry and key."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One evaluation of the sweep (before sharding)."""

    name: str
    checkpoint: str | None
    arch: str | None
    model_kwargs: str | None  # JSON text, so the job stays hashable
    use_ema: bool
    data: str
    norm: str
    eps: float
    resolution: int
    version: str
    attacks: tuple[str, ...] | None
    n_ex: int
    batch_size: int
    precision: str
    num_workers: int
    seed: int
    n_iter: int | None
    n_queries: int | None
    shards: int
    output: Path
    normalize: bool | None = None  # input normalization; None: what the checkpoint says (rat.eval --normalize)

    @property
    def label(self) -> str:
        """Short description for logs."""
        return (f"{self.name} {self.norm} eps={format_eps(self.norm, self.eps)} r{self.resolution} {self.version}"
                f" n{self.n_ex}")


@dataclasses.dataclass(frozen=True)
class Task:
    """One subprocess: a job, or one shard of it."""

    job: Job
    shard: int | None = None

    @property
    def output(self) -> Path:
        """The task's result JSON."""
        if self.shard is None:
            return self.job.output
        return self.job.output.with_name(f"{self.job.output.stem}.shard{self.shard}of{self.job.shards}.json")

    @property
    def log(self) -> Path:
        """The task's log (stdout and stderr of its subprocess)."""
        return self.output.with_suffix(".log")

    @property
    def label(self) -> str:
        """Short description for logs."""
        return self.job.label + (f" shard {self.shard}/{self.job.shards}" if self.shard is not None else "")


def parse_threat(text: str | dict) -> tuple[str, float]:
    """``Linf``, ``Linf:4/255``, ``L2:2`` or ``{norm: L2, eps: 2}`` → (norm, eps); eps defaults per norm.

    Raises:
        JobsError: unknown norm or unreadable eps.
    """
    if isinstance(text, dict):
        norm, eps = text.get("norm"), text.get("eps")
    else:
        norm, _, eps = str(text).partition(":")
        eps = eps or None
    if norm not in NORMS:
        raise JobsError(f"threat model {text!r}: norm must be one of {', '.join(NORMS)} (write e.g. Linf:4/255)")
    try:
        return norm, parse_eps(eps) if eps is not None else DEFAULT_EPS[norm]
    except ValueError as exc:
        raise JobsError(f"threat model {text!r}: {exc}") from exc


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def expand_jobs(entries: Sequence[dict[str, Any]], output_dir: str | Path,
                defaults: dict[str, Any] | None = None) -> list[Job]:
    """Expand jobs-file entries into jobs: each entry's checkpoints × threats × resolutions × versions.

    Raises:
        JobsError: unknown keys, missing data or checkpoint, bad values, or two jobs writing the same result.
    """
    defaults = dict(defaults or {})
    for key in defaults:
        if key not in ENTRY_DEFAULTS or key in ("checkpoint", "checkpoints", "name"):
            raise JobsError(f"defaults: unknown or per-entry key {key!r}; allowed: "
                            f"{', '.join(k for k in ENTRY_DEFAULTS if k not in ('checkpoint', 'checkpoints', 'name'))}")
    jobs: list[Job] = []
    for number, raw in enumerate(entries, 1):
        where = f"jobs entry {number}"
        if not isinstance(raw, dict):
            raise JobsError(f"{where}: expected a mapping of keys such as checkpoint, threats, resolutions")
        unknown = sorted(set(raw) - set(ENTRY_DEFAULTS))
        if unknown:
            raise JobsError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(ENTRY_DEFAULTS)}")
        entry = {**ENTRY_DEFAULTS, **defaults, **raw}
        if entry["checkpoint"] is not None and entry["checkpoints"] is not None:
            raise JobsError(f"{where}: give checkpoint or checkpoints, not both")
        checkpoints = _as_list(entry["checkpoints"] if entry["checkpoints"] is not None else entry["checkpoint"])
        if checkpoints == [None] and entry["arch"] is None:
            raise JobsError(f"{where}: needs checkpoint (or arch, for random weights)")
        if entry["name"] is not None and len(checkpoints) > 1:
            raise JobsError(f"{where}: name goes with a single checkpoint; use one entry per named checkpoint")
        if entry["data"] is None:
            raise JobsError(f"{where}: needs data (a val .beton or ImageNet-style val folder), here or in defaults")
        if entry["precision"] not in PRECISIONS:
            raise JobsError(f"{where}: precision must be one of {', '.join(PRECISIONS)}")
        shards = int(entry["shards"])
        if shards < 1:
            raise JobsError(f"{where}: shards must be at least 1")
        model_kwargs = json.dumps(entry["model_kwargs"], sort_keys=True) if entry["model_kwargs"] else None
        for checkpoint in checkpoints:
            name = entry["name"] or default_model_name(checkpoint, f"{entry['arch']}-random")
            if not _NAME_OK.match(name):
                raise JobsError(f"{where}: name {name!r} must be letters, digits and ._+- (it names a folder)")
            for threat in _as_list(entry["threats"]):
                norm, eps = parse_threat(threat)
                for resolution in _as_list(entry["resolutions"]):
                    for version in _as_list(entry["versions"]):
                        try:
                            attacks = resolve_attacks(version, entry["attacks"] if version == "custom" else None)
                        except ValueError as exc:
                            raise JobsError(f"{where}: {exc}") from exc
                        output = (Path(output_dir) / name /
                                  f"{norm}-{eps_tag(norm, eps)}_r{int(resolution)}_{version}_n{entry['n_ex']}.json")
                        jobs.append(Job(
                            name=name, checkpoint=str(checkpoint) if checkpoint is not None else None,
                            arch=entry["arch"], model_kwargs=model_kwargs, use_ema=bool(entry["use_ema"]),
                            data=str(entry["data"]), norm=norm, eps=eps, resolution=int(resolution), version=version,
                            attacks=tuple(attacks) if version == "custom" else None, n_ex=int(entry["n_ex"]),
                            batch_size=int(entry["batch_size"]), precision=entry["precision"],
                            num_workers=int(entry["num_workers"]), seed=int(entry["seed"]), n_iter=entry["n_iter"],
                            n_queries=entry["n_queries"], shards=shards, output=output,
                            normalize=None if entry["normalize"] is None else bool(entry["normalize"])))
    seen: dict[Path, Job] = {}
    for job in jobs:
        other = seen.setdefault(job.output, job)
        if other is not job:
            raise JobsError(f"two jobs write {job.output} ({other.checkpoint} and {job.checkpoint}): give the "
                            "entries distinct names")
    return jobs


def load_jobs_file(path: str | Path, output_dir: str | Path | None = None) -> tuple[list[Job], Path]:
    """Read a YAML jobs file (see docs/eval.md) into jobs and the output folder (``output_dir`` overrides the file's).

    Raises:
        JobsError: unreadable file, unknown top-level keys, or a bad entry.
    """
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise JobsError(f"cannot read jobs file {path}: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("jobs"), list) or not config["jobs"]:
        raise JobsError(f"jobs file {path} needs a non-empty 'jobs:' list")
    unknown = sorted(set(config) - _TOP_KEYS)
    if unknown:
        raise JobsError(f"jobs file {path}: unknown top-level key(s) {', '.join(unknown)}; allowed: "
                        f"{', '.join(sorted(_TOP_KEYS))}")
    out = output_dir or config.get("output_dir")
    if out is None:
        raise JobsError(f"jobs file {path} has no output_dir: add 'output_dir: runs/aa_eval' or pass --output-dir")
    return expand_jobs(config["jobs"], out, config.get("defaults")), Path(out)


def tasks_for(jobs: Sequence[Job]) -> list[Task]:
    """One task per job, or one per shard."""
    return [Task(job, shard) for job in jobs
            for shard in ([None] if job.shards == 1 else range(job.shards))]


def task_command(task: Task, device: str, threads: int | None = None) -> list[str]:
    """The ``python -m rat.eval`` argument list of a task."""
    job = task.job
    cmd = [sys.executable, "-m", "rat.eval", "--data", job.data, "--name", job.name, "--norm", job.norm,
           "--eps", repr(job.eps), "--resolution", str(job.resolution), "--version", job.version,
           "--n-ex", str(job.n_ex), "--batch-size", str(job.batch_size), "--precision", job.precision,
           "--num-workers", str(job.num_workers), "--seed", str(job.seed), "--device", device,
           "--output", str(task.output), "--log", "-"]
    if job.checkpoint is not None:
        cmd += ["--checkpoint", job.checkpoint]
    if job.arch is not None:
        cmd += ["--arch", job.arch]
    if job.model_kwargs is not None:
        cmd += ["--model-kwargs", job.model_kwargs]
    if job.use_ema:
        cmd.append("--use-ema")
    if job.normalize is not None:
        cmd += ["--normalize", str(int(job.normalize))]
    if job.attacks:
        cmd += ["--attacks", *job.attacks]
    if job.n_iter is not None:
        cmd += ["--n-iter", str(job.n_iter)]
    if job.n_queries is not None:
        cmd += ["--n-queries", str(job.n_queries)]
    if task.shard is not None:
        cmd += ["--shard", f"{task.shard}/{job.shards}"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    return cmd


_HASHES: dict[tuple[str, int, int], str] = {}


def _checkpoint_sha256(path: str) -> str | None:
    """SHA-256 of a checkpoint, computed once per file version (path, mtime, size); None if it does not exist."""
    try:
        info = Path(path).stat()
    except FileNotFoundError:
        return None
    key = (str(Path(path).resolve()), info.st_mtime_ns, info.st_size)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


def result_differences(result: dict[str, Any], job: Job, shard: int | None = None) -> list[str]:
    """The settings in which a result differs from what ``job`` (or one of its shards) would compute."""
    differs = []
    if not result_matches(result, norm=job.norm, eps=job.eps, resolution=job.resolution, version=job.version,
                          n_ex=job.n_ex, attacks=job.attacks):
        differs.append("threat model, resolution, version or n_ex")
    expected_shard = None if shard is None else {"index": shard, "count": job.shards}
    if result.get("shard") != expected_shard:
        differs.append("shard")
    for key, value in (("use_ema", job.use_ema), ("precision", job.precision), ("seed", job.seed),
                       ("batch_size", job.batch_size)):
        if result.get(key) != value:
            differs.append(key)
    if job.arch is not None and result.get("arch") != job.arch:
        differs.append("arch")
    if job.normalize is not None and result.get("normalize") != job.normalize:
        differs.append("normalize")
    settings = result.get("attack_settings", {})
    if settings.get("apgd", {}).get("n_iter") != (job.n_iter or 100):
        differs.append("n_iter")
    if settings.get("square", {}).get("n_queries") != (job.n_queries or 5000):
        differs.append("n_queries")
    if job.checkpoint is not None and result.get("checkpoint_sha256") != _checkpoint_sha256(job.checkpoint):
        differs.append("checkpoint (file changed since)")
    return differs


def _valid_result(path: Path, job: Job, shard: int | None = None, *, explain: bool = False) -> dict[str, Any] | None:
    """The result at ``path`` if it is a complete result of ``job`` (or of its shard), else None."""
    try:
        result = load_result(path)
    except ResultError as exc:
        if explain and path.exists():
            _logger.warning("%s; the job runs again", exc)
        return None
    differs = result_differences(result, job, shard)
    if differs:
        if explain:
            _logger.warning("stale result %s (differs in %s); the job runs again", path, ", ".join(differs))
        return None
    return result


def is_finished(task: Task, explain: bool = False) -> bool:
    """Whether a task's result (or, for a shard, the merged job result) exists, is valid and fits the job: same
    settings and the same checkpoint file (SHA-256). With ``explain``, log why an existing result does not count."""
    if _valid_result(task.job.output, task.job, explain=explain and task.shard is None) is not None:
        return True
    return task.shard is not None and _valid_result(task.output, task.job, task.shard, explain=explain) is not None


def merge_job(job: Job) -> bool:
    """Merge a sharded job's shard results into its result, once all are there; returns whether it did."""
    results = [_valid_result(Task(job, s).output, job, s) for s in range(job.shards)]
    if any(r is None for r in results):
        return False
    merged = merge_results(results)
    merged["output"] = str(job.output)
    atomic_write_json(job.output, merged)
    _logger.info("merged %d shards into %s", job.shards, job.output)
    return True


@dataclasses.dataclass
class _Running:
    task: Task
    process: subprocess.Popen
    slot: int
    log: IO[str]
    started: float


class Slots:
    """GPU slots (GPUtil) or CPU slots."""

    def __init__(self, *, gpus: bool, cpu_slots: int, max_load: float, max_memory: float, exclude: Sequence[int]):
        self.gpus = gpus
        self.cpu_slots = cpu_slots
        self.max_load = max_load
        self.max_memory = max_memory
        self.exclude = list(exclude)
        self.n_gpus = 0
        if gpus:
            import GPUtil

            self.n_gpus = len(GPUtil.getGPUs())

    def free(self, busy: Sequence[int]) -> list[int]:
        """Slots that can take a job now."""
        if not self.gpus:
            return [s for s in range(self.cpu_slots) if s not in busy]
        import GPUtil

        return list(GPUtil.getAvailable(order="first", limit=self.n_gpus, maxLoad=self.max_load,
                                        maxMemory=self.max_memory, excludeID=self.exclude + list(busy)))

    def env(self, slot: int) -> dict[str, str]:
        """The environment of a job in ``slot``."""
        env = dict(os.environ)
        if self.gpus:
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # nvidia-smi's (GPUtil's) numbering
            env["CUDA_VISIBLE_DEVICES"] = str(slot)
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["OMP_NUM_THREADS"] = str(self.threads())
        return env

    def threads(self) -> int:
        """CPU threads per CPU slot."""
        return max(1, _cpu_count() // self.cpu_slots)

    def describe(self, slot: int) -> str:
        """``GPU 3`` or ``CPU slot 1``."""
        return f"GPU {slot}" if self.gpus else f"CPU slot {slot}"


def run_tasks(tasks: Sequence[Task], slots: Slots, *, poll_interval: float = 10.0) -> dict[Task, str]:
    """Run tasks in free slots until all are done; returns each task's status (``done``, ``skipped``, ``failed``)."""
    status: dict[Task, str] = {}
    pending: list[Task] = []
    for task in tasks:
        if is_finished(task, explain=True):
            status[task] = "skipped"
            _logger.info("skip (finished): %s -> %s", task.label, task.output)
        else:
            pending.append(task)
    for job in {t.job for t in tasks if t.shard is not None and status.get(t) == "skipped"}:
        if _valid_result(job.output, job) is None:
            merge_job(job)
    running: list[_Running] = []
    last_wait_note = time.time()
    try:
        while pending or running:
            for run in list(running):
                code = run.process.poll()
                if code is None:
                    continue
                run.log.close()
                running.remove(run)
                took = time.time() - run.started
                if code == 0 and is_finished(run.task):
                    status[run.task] = "done"
                    _logger.info("done in %.0fs: %s -> %s", took, run.task.label, run.task.output)
                    if run.task.shard is not None:
                        merge_job(run.task.job)
                else:
                    status[run.task] = "failed"
                    _logger.error("FAILED (exit %s) after %.0fs: %s; log: %s", code, took, run.task.label,
                                  run.task.log)
            free = slots.free([r.slot for r in running]) if pending else []
            while pending and free:
                task, slot = pending.pop(0), free.pop(0)
                running.append(_launch(task, slot, slots))
            if pending and not running and time.time() - last_wait_note > 300:
                _logger.info("waiting for a free GPU (maxLoad %.2f, maxMemory %.2f)", slots.max_load,
                             slots.max_memory)
                last_wait_note = time.time()
            if pending or running:
                time.sleep(poll_interval)
    except KeyboardInterrupt:
        for run in running:
            _logger.warning("interrupted: stopping %s (pid %d); rerun to resume it", run.task.label, run.process.pid)
            run.process.terminate()
        for run in running:
            run.process.wait()
            run.log.close()
        raise
    return status


def _launch(task: Task, slot: int, slots: Slots) -> _Running:
    device = "cuda" if slots.gpus else "cpu"
    cmd = task_command(task, device, None if slots.gpus else slots.threads())
    task.log.parent.mkdir(parents=True, exist_ok=True)
    log = task.log.open("a")
    log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} on {slots.describe(slot)}: {shlex.join(cmd)}\n")
    log.flush()
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=slots.env(slot))
    _logger.info("start on %s (pid %d): %s", slots.describe(slot), process.pid, task.label)
    return _Running(task, process, slot, log, time.time())


def aggregate(jobs: Sequence[Job], output_dir: str | Path, plot_x: str = "auto") -> list[Path]:
    """Write summary.csv, summary.md and robust_vs_<x>.png for the jobs with a valid result; returns the paths."""
    rows = []
    for job in jobs:
        result = _valid_result(job.output, job)
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
    parser = argparse.ArgumentParser(
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
    sweep.add_argument("--threats", nargs="+", default=["Linf"], help="NORM or NORM:EPS, e.g. Linf:4/255 L2:2 L1:75")
    sweep.add_argument("--resolutions", nargs="+", type=int, default=[224])
    sweep.add_argument("--versions", nargs="+", default=["standard"], help="standard, fast or custom")
    sweep.add_argument("--attacks", nargs="+", help="attacks of version custom")
    sweep.add_argument("--n-ex", type=int, default=5000)
    sweep.add_argument("--batch-size", type=int, default=100)
    sweep.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    sweep.add_argument("--num-workers", type=int, default=4)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep; returns 0 when every job finished, 1 when some failed, 2 on bad input."""
    from rat.logging import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(0)
    try:
        jobs, output_dir = _jobs_from_args(args)
    except JobsError as exc:
        _logger.error("%s", exc)
        return 2
    tasks = tasks_for(jobs)
    use_gpus = not args.cpu and _has_gpus()
    if args.cpu_slots < 1:
        _logger.error("--cpu-slots must be at least 1")
        return 2
    if args.dry_run:
        slots_threads = None if use_gpus else max(1, _cpu_count() // args.cpu_slots)
        for task in tasks:
            mark = "skip" if is_finished(task) else "run "
            cmd = task_command(task, "cuda" if use_gpus else "cpu", slots_threads)
            print(f"{mark} {task.label}\n     {shlex.join(cmd)}")
        print(f"{sum(not is_finished(t) for t in tasks)} of {len(tasks)} tasks would run on "
              f"{'GPUs' if use_gpus else f'{args.cpu_slots} CPU slot(s)'}")
        return 0
    slots = Slots(gpus=use_gpus, cpu_slots=args.cpu_slots, max_load=args.max_load, max_memory=args.max_memory,
                  exclude=args.exclude_gpus)
    if use_gpus and set(range(slots.n_gpus)) <= set(args.exclude_gpus):
        _logger.error("--exclude-gpus %s leaves none of the %d GPUs: exclude fewer, or pass --cpu",
                      " ".join(map(str, args.exclude_gpus)), slots.n_gpus)
        return 2
    _logger.info("%d jobs, %d tasks, on %s", len(jobs), len(tasks),
                 f"{slots.n_gpus} GPU(s)" if use_gpus else f"{args.cpu_slots} CPU slot(s)")
    status = run_tasks(tasks, slots, poll_interval=args.poll_interval)
    for path in aggregate(jobs, output_dir, args.plot_x):
        _logger.info("wrote %s", path)
    failed = [t for t, s in status.items() if s == "failed"]
    counts = {s: sum(v == s for v in status.values()) for s in ("done", "skipped", "failed")}
    _logger.info("finished: %d done, %d skipped (already finished), %d failed", counts["done"], counts["skipped"],
                 counts["failed"])
    for task in failed:
        _logger.error("failed: %s; log: %s", task.label, task.log)
    return 1 if failed else 0


def _cpu_count() -> int:
    """CPUs this process may use (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _has_gpus() -> bool:
    import GPUtil

    return len(GPUtil.getGPUs()) > 0

