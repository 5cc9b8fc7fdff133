"""The jobs file of ``runner_aa_eval.py``: one typed schema, checked in full before any job starts, and its expansion
into jobs (checkpoints × threat models × resolutions × versions) and tasks (a job, or one shard of it).

An entry's keys are the settings of :class:`rat.eval.spec.EvalSpec` that a jobs file gives by name
(:data:`rat.eval.spec.JOB_SETTINGS`: their rules and defaults, the same ones ``python -m rat.eval`` uses) plus the
sweep's own: ``checkpoint``/``checkpoints`` and ``name`` (per entry), the axes ``threats``, ``resolutions`` and
``versions``, and ``shards``. Every key's type and range is checked up front, with one line naming the entry, the key,
the value and what it must be. Booleans must be real YAML booleans (``use_ema: true``, not ``"false"``, which Python
would read as true). See docs/eval.md for the file format.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from rat.attacks import DEFAULT_EPS, NORMS, check_eps
from rat.eval.autoattack import VERSIONS, resolve_attacks
from rat.eval.evaluate import default_model_name
from rat.eval.results import eps_tag, format_eps
from rat.eval.rules import ListOf, OneOf, Text, WholeNumber, nullable, parse_eps
from rat.eval.spec import DEFAULT_RESOLUTION, JOB_SETTINGS, SPEC_DEFAULTS, EvalSpec, spec_argv
from rat.io import read_yaml

__all__ = ["FIELDS", "Job", "JobsError", "Task", "expand_jobs", "load_jobs_file", "parse_threat", "task_command",
           "tasks_for"]

_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_TOP_KEYS = ("output_dir", "defaults", "jobs")
MIN_RESOLUTION = 8


class JobsError(ValueError):
    """A problem in the jobs file or flags; the message names the entry and key."""


# --- The schema: a checker per key (value -> normalized value, or ValueError saying what the value must be).

def _name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME_OK.match(value):
        raise ValueError("must be letters, digits and ._+- (it names a folder)")
    return value


def _threat(value: Any) -> tuple[str, float]:
    try:
        return parse_threat(value)
    except JobsError as exc:
        raise ValueError(str(exc)) from exc


@dataclasses.dataclass(frozen=True)
class Field:
    """One key of a jobs entry: its checker and default (``EvalSpec``'s for the evaluation settings)."""

    check: Callable[[Any], Any]
    default: Any = None
    per_entry: bool = False  # not allowed in ``defaults``


FIELDS: dict[str, Field] = {
    "checkpoint": Field(nullable(Text().check), per_entry=True),
    "checkpoints": Field(nullable(ListOf(Text()).check), per_entry=True),
    "name": Field(nullable(_name), per_entry=True),
    "threats": Field(ListOf(_threat).check, [SPEC_DEFAULTS["norm"]]),
    "resolutions": Field(ListOf(WholeNumber(MIN_RESOLUTION)).check, [DEFAULT_RESOLUTION]),
    "versions": Field(ListOf(OneOf(VERSIONS)).check, [SPEC_DEFAULTS["version"]]),
    "shards": Field(WholeNumber(1).check, 1),
    **{key: Field(check, default) for key, (check, default) in JOB_SETTINGS.items()},  # the evaluation's settings
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
    """One evaluation of the sweep (before sharding): its spec (without shard, device or output), shards and result."""

    spec: EvalSpec
    shards: int
    output: Path

    def __hash__(self) -> int:  # a sweep's jobs write distinct results (expand_jobs); the spec holds lists and dicts
        return hash(self.output)

    @property
    def name(self) -> str:
        """The model's name in the sweep (its results folder)."""
        return str(self.spec.name)

    @property
    def label(self) -> str:
        """Short description for logs."""
        spec = self.spec
        return (f"{self.name} {spec.norm} eps={format_eps(spec.norm, spec.eps)} r{spec.resolution} {spec.version}"
                f" n{spec.n_ex}")


@dataclasses.dataclass(frozen=True)
class Task:
    """One subprocess: a job, or one shard of it."""

    job: Job
    shard: int | None = None

    @property
    def spec(self) -> EvalSpec:
        """The evaluation of this task: the job's, with the task's shard and result file."""
        shard = None if self.shard is None else (self.shard, self.job.shards)
        return dataclasses.replace(self.job.spec, shard=shard, output=self.output)

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
            raise JobsError(f"two jobs write {job.output} ({other.spec.checkpoint} and {job.spec.checkpoint}): give "
                            "the entries distinct names")
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
    settings = {key: entry[key] for key in JOB_SETTINGS}
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
                        resolve_attacks(version, entry["attacks"] if version == "custom" else None)
                    except ValueError as exc:
                        raise JobsError(f"{where}: {exc}") from exc
                    stem = f"{norm}-{eps_tag(norm, eps)}_r{resolution}_{version}_n{entry['n_ex']}"
                    if entry["subset"] != SPEC_DEFAULTS["subset"]:
                        stem += f"_{entry['subset']}"
                    spec = EvalSpec(**{**settings, "attacks": entry["attacks"] if version == "custom" else None},
                                    checkpoint=checkpoint, name=name, norm=norm, eps=eps, resolution=resolution,
                                    version=version)
                    jobs.append(Job(spec, entry["shards"], output_dir / name / f"{stem}.json"))
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
    """The ``python -m rat.eval`` argument list of a task (its log goes to the runner: ``--log -``)."""
    spec = dataclasses.replace(task.spec, device=device)
    return [sys.executable, "-m", "rat.eval", *spec_argv(spec), "--log", "-",
            *([] if threads is None else ["--threads", str(threads)])]
