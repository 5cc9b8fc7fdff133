"""The jobs file of ``runner_aa_eval.py``: one typed schema, checked in full before any job starts, and its expansion
into jobs (checkpoints × threat models × resolutions × versions) and tasks (a job, or one shard of it).

Every key's type and range is checked up front, with one line naming the entry, the key, the value and what it must
be. Booleans must be real YAML booleans (``use_ema: true``, not ``"false"``, which Python would read as true). The
defaults of the evaluation settings are those of :class:`rat.eval.evaluate.EvalSpec`, the same ones ``python -m
rat.eval`` uses. See docs/eval.md for the file format.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from rat.attacks import DEFAULT_EPS, NORMS, check_eps
from rat.eval.autoattack import ALL_ATTACKS, VERSIONS, resolve_attacks
from rat.eval.data import SUBSETS
from rat.eval.evaluate import DEFAULT_RESOLUTION, PRECISIONS, SPEC_DEFAULTS, default_model_name
from rat.eval.results import eps_tag, format_eps, parse_eps
from rat.io import read_yaml

__all__ = ["FIELDS", "Job", "JobsError", "Task", "expand_jobs", "load_jobs_file", "parse_threat", "task_command",
           "tasks_for"]

_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_TOP_KEYS = ("output_dir", "defaults", "jobs")
MIN_RESOLUTION = 8


class JobsError(ValueError):
    """A problem in the jobs file or flags; the message names the entry and key."""


# --- The schema: a checker per key (value -> normalized value, or ValueError saying what the value must be).

def _int(lo: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be a whole number >= {lo}")
        if value < lo:
            raise ValueError(f"must be >= {lo}")
        return value
    return check


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false (an unquoted YAML boolean)")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value


def _name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME_OK.match(value):
        raise ValueError("must be letters, digits and ._+- (it names a folder)")
    return value


def _one_of(choices: Sequence[str]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value
    return check


def _mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError("must be a mapping such as {num_classes: 10}")
    return dict(value)


def _threat(value: Any) -> tuple[str, float]:
    try:
        return parse_threat(value)
    except JobsError as exc:
        raise ValueError(str(exc)) from exc


def _list_of(item: Callable[[Any], Any]) -> Callable[[Any], list]:
    """A list of items, or a single item (a list of one)."""
    def check(value: Any) -> list:
        values = value if isinstance(value, list) else [value]
        if not values:
            raise ValueError("must not be empty")
        out = []
        for v in values:
            try:
                out.append(item(v))
            except ValueError as exc:
                raise ValueError(f"item {v!r} {exc}") from exc
        return out
    return check


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else check(value)


@dataclasses.dataclass(frozen=True)
class Field:
    """One key of a jobs entry: its checker and default (``EvalSpec``'s for the evaluation settings)."""

    check: Callable[[Any], Any]
    default: Any = None
    per_entry: bool = False  # not allowed in ``defaults``


FIELDS: dict[str, Field] = {
    "checkpoint": Field(_optional(_text), per_entry=True),
    "checkpoints": Field(_optional(_list_of(_text)), per_entry=True),
    "name": Field(_optional(_name), per_entry=True),
    "arch": Field(_optional(_text)),
    "model_kwargs": Field(_optional(_mapping)),
    "use_ema": Field(_bool, SPEC_DEFAULTS["use_ema"]),
    "data": Field(_optional(_text)),
    "threats": Field(_list_of(_threat), [SPEC_DEFAULTS["norm"]]),
    "resolutions": Field(_list_of(_int(MIN_RESOLUTION)), [DEFAULT_RESOLUTION]),
    "versions": Field(_list_of(_one_of(VERSIONS)), [SPEC_DEFAULTS["version"]]),
    "attacks": Field(_optional(_list_of(_one_of(ALL_ATTACKS)))),
    "n_ex": Field(_int(1), SPEC_DEFAULTS["n_ex"]),
    "batch_size": Field(_int(1), SPEC_DEFAULTS["batch_size"]),
    "precision": Field(_one_of(list(PRECISIONS)), SPEC_DEFAULTS["precision"]),
    "num_workers": Field(_int(1), SPEC_DEFAULTS["num_workers"]),
    "seed": Field(_int(0), SPEC_DEFAULTS["seed"]),
    "n_iter": Field(_optional(_int(1)), SPEC_DEFAULTS["n_iter"]),
    "n_queries": Field(_optional(_int(1)), SPEC_DEFAULTS["n_queries"]),
    "shards": Field(_int(1), 1),
    "normalize": Field(_optional(_bool), SPEC_DEFAULTS["normalize"]),
    "subset": Field(_one_of(SUBSETS), SPEC_DEFAULTS["subset"]),
}


def _checked(raw: dict[str, Any], where: str, *, in_defaults: bool = False) -> dict[str, Any]:
    """``raw`` with every key checked against ``FIELDS``.

    Raises:
        JobsError: an unknown key, or a value of the wrong type or range (the first one found).
    """
    allowed = [k for k, f in FIELDS.items() if not (in_defaults and f.per_entry)]
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        what = "unknown or per-entry" if in_defaults else "unknown"
        raise JobsError(f"{where}: {what} key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    out = {}
    for key, value in raw.items():
        try:
            out[key] = FIELDS[key].check(value)
        except ValueError as exc:
            raise JobsError(f"{where}: {key}: {value!r} {exc}") from exc
    return out


# --- Jobs and tasks.

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
    subset: str = SPEC_DEFAULTS["subset"]

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
    def failed_mark(self) -> Path:
        """Written when the task's evaluation fails (its exit status and time), removed when it starts again."""
        return self.output.with_name(f".{self.output.name}.failed")

    @property
    def lock(self) -> Path:
        """The file a runner holds (flock) while the task is its own."""
        return self.output.with_name(f".{self.output.name}.lock")

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
    elif isinstance(text, str):
        norm, _, eps = text.partition(":")
        eps = eps or None
    else:
        raise JobsError(f"threat model {text!r}: write NORM or NORM:EPS such as Linf:4/255")
    if norm not in NORMS:
        raise JobsError(f"threat model {text!r}: norm must be one of {', '.join(NORMS)} (write e.g. Linf:4/255)")
    try:
        return norm, parse_eps(eps) if eps is not None else DEFAULT_EPS[norm]
    except ValueError as exc:
        raise JobsError(f"threat model {text!r}: {exc}") from exc


def expand_jobs(entries: Sequence[Any], output_dir: str | Path, defaults: Any = None) -> list[Job]:
    """Check every entry against the schema, then expand each into its checkpoints × threats × resolutions ×
    versions.

    Raises:
        JobsError: unknown keys, wrong types or ranges, missing data or checkpoint, or two jobs writing one result.
    """
    if defaults is None:
        defaults = {}
    if not isinstance(defaults, dict):
        raise JobsError(f"defaults must be a mapping of keys such as data, n_ex, precision; got a "
                        f"{type(defaults).__name__}")
    base = {**{k: f.check(f.default) for k, f in FIELDS.items()},
            **_checked(defaults, "defaults", in_defaults=True)}
    entries_checked = []
    for number, raw in enumerate(entries, 1):
        where = f"jobs entry {number}"
        if not isinstance(raw, dict):
            raise JobsError(f"{where}: expected a mapping of keys such as checkpoint, threats, resolutions")
        entries_checked.append((where, {**base, **_checked(raw, where)}))
    jobs: list[Job] = []
    for where, entry in entries_checked:
        jobs += _expand_entry(where, entry, Path(output_dir))
    seen: dict[Path, Job] = {}
    for job in jobs:
        other = seen.setdefault(job.output, job)
        if other is not job:
            raise JobsError(f"two jobs write {job.output} ({other.checkpoint} and {job.checkpoint}): give the "
                            "entries distinct names")
    return jobs


def _expand_entry(where: str, entry: dict[str, Any], output_dir: Path) -> list[Job]:
    if entry["checkpoint"] is not None and entry["checkpoints"] is not None:
        raise JobsError(f"{where}: give checkpoint or checkpoints, not both")
    checkpoints = entry["checkpoints"] if entry["checkpoints"] is not None else [entry["checkpoint"]]
    if checkpoints == [None] and entry["arch"] is None:
        raise JobsError(f"{where}: needs checkpoint (or arch, for random weights)")
    if entry["name"] is not None and len(checkpoints) > 1:
        raise JobsError(f"{where}: name goes with a single checkpoint; use one entry per named checkpoint")
    if entry["data"] is None:
        raise JobsError(f"{where}: needs data (a val .beton or ImageNet-style val folder), here or in defaults")
    model_kwargs = json.dumps(entry["model_kwargs"], sort_keys=True) if entry["model_kwargs"] else None
    jobs = []
    for checkpoint in checkpoints:
        name = entry["name"] or default_model_name(checkpoint, f"{entry['arch']}-random")
        if not _NAME_OK.match(name):
            raise JobsError(f"{where}: name {name!r} must be letters, digits and ._+- (it names a folder)")
        for norm, eps in entry["threats"]:
            for resolution in entry["resolutions"]:
                try:
                    check_eps(norm, eps, resolution)  # each evaluation logs the warning of an implausible one
                except ValueError as exc:
                    raise JobsError(f"{where}: threat model {norm}: {exc}") from exc
                for version in entry["versions"]:
                    try:
                        attacks = resolve_attacks(version, entry["attacks"] if version == "custom" else None)
                    except ValueError as exc:
                        raise JobsError(f"{where}: {exc}") from exc
                    stem = f"{norm}-{eps_tag(norm, eps)}_r{resolution}_{version}_n{entry['n_ex']}"
                    if entry["subset"] != SPEC_DEFAULTS["subset"]:
                        stem += f"_{entry['subset']}"
                    output = output_dir / name / f"{stem}.json"
                    jobs.append(Job(
                        name=name, checkpoint=checkpoint, arch=entry["arch"], model_kwargs=model_kwargs,
                        use_ema=entry["use_ema"], data=entry["data"], norm=norm, eps=eps, resolution=resolution,
                        version=version, attacks=tuple(attacks) if version == "custom" else None, n_ex=entry["n_ex"],
                        batch_size=entry["batch_size"], precision=entry["precision"],
                        num_workers=entry["num_workers"], seed=entry["seed"], n_iter=entry["n_iter"],
                        n_queries=entry["n_queries"], shards=entry["shards"], output=output,
                        normalize=entry["normalize"], subset=entry["subset"]))
    return jobs


def load_jobs_file(path: str | Path, output_dir: str | Path | None = None) -> tuple[list[Job], Path]:
    """Read a YAML jobs file (see docs/eval.md) into jobs and the output folder (``output_dir`` overrides the file's).

    Raises:
        JobsError: unreadable file, unknown top-level keys, or a bad entry.
    """
    path = Path(path)
    try:
        config = read_yaml(path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise JobsError(f"cannot read jobs file {path}: {' '.join(str(exc).split())}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("jobs"), list) or not config["jobs"]:
        raise JobsError(f"jobs file {path} needs a non-empty 'jobs:' list")
    unknown = sorted(str(k) for k in set(config) - set(_TOP_KEYS))
    if unknown:
        raise JobsError(f"jobs file {path}: unknown top-level key(s) {', '.join(unknown)}; allowed: "
                        f"{', '.join(sorted(_TOP_KEYS))}")
    out = output_dir or config.get("output_dir")
    if out is None:
        raise JobsError(f"jobs file {path} has no output_dir: add 'output_dir: runs/aa_eval' or pass --output-dir")
    if not isinstance(out, (str, Path)):
        raise JobsError(f"jobs file {path}: output_dir must be a path, got {out!r}")
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
           "--n-ex", str(job.n_ex), "--subset", job.subset, "--batch-size", str(job.batch_size),
           "--precision", job.precision,
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
