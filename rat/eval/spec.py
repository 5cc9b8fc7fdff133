"""The schema of one AutoAttack evaluation: :class:`EvalSpec`, each of whose fields declares its default, its help,
its rule and its part in the evaluation's identity (:func:`setting`, as :func:`rat.config.param` does for the trainer).

Everything that lists the settings of an evaluation is generated from these fields, so that a new setting is one field
(and its test):

* the command line of ``python -m rat.eval`` (:func:`add_arguments`, :func:`spec_from_args`) and its inverse, the
  argument list a runner task starts with (:func:`spec_argv`);
* the keys of a jobs-file entry (:data:`JOB_SETTINGS`, read by :mod:`rat.eval.sweep.jobs`);
* what defines an evaluation: its identity as its result records it (:func:`evaluation_identity`,
  :data:`IDENTITY_KEYS`), the fingerprint its state file is checked against (:func:`state_fingerprint`), and the
  settings in which a finished result differs from a request (:func:`request_differences`).

A rule (:mod:`rat.eval.rules`) reads a value in both forms rat gets it in: command-line text and a typed jobs-file
value. The vocabularies come from their owners: norms from :mod:`rat.attacks`, precisions from :mod:`rat.precision`,
versions, attacks and AutoAttack's standard budget from :mod:`rat.eval.autoattack`, subsets from :mod:`rat.eval.data`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rat.attacks import NORMS
from rat.eval.autoattack import ALL_ATTACKS, STANDARD_N_ITER, STANDARD_N_QUERIES, VERSIONS
from rat.eval.data import SUBSETS
from rat.eval.rules import (
    Binary,
    Device,
    Eps,
    JsonObject,
    ListOf,
    OneOf,
    Rule,
    Shard,
    Switch,
    Text,
    WholeNumber,
    nullable,
)
from rat.precision import PRECISIONS

__all__ = [
    "DEFAULT_RESOLUTION", "IDENTITY_KEYS", "JOB_SETTINGS", "SPEC_DEFAULTS", "EvalSpec", "add_arguments",
    "evaluation_identity", "request_differences", "setting", "spec_argv", "spec_from_args", "state_fingerprint",
]

DEFAULT_RESOLUTION = 224  # the input side when neither the request nor the checkpoint gives one


# --- Settings: a field of EvalSpec with its rule, help and part in the identity. --------------------------------------

THREAT = "threat model, resolution, version or n_ex"  # request_differences reports these settings together

# The value recorded in the identity: (spec with defaults filled in, model source, resolved attacks) -> value.
Record = Callable[[Any, Any, list[str]], Any]
_SAME = object()  # stale: the result records the setting under its identity key, compared for equality


@dataclasses.dataclass(frozen=True)
class Setting:
    """What a field of :class:`EvalSpec` declares besides its default (see :func:`setting`)."""

    help: str
    rule: Rule
    group: str
    identity: bool = False
    key: str | None = None
    record: Record | None = None
    recorded: bool = True
    state: bool = True
    stale: Callable[[dict[str, Any], Any], bool] | None | object = _SAME
    label: str | None = None
    jobs: bool = True


def setting(default: Any, help: str, rule: Rule, group: str, *, identity: bool = False, key: str | None = None,
            record: Record | None = None, recorded: bool = True, state: bool = True, stale: Any = _SAME,
            label: str | None = None, jobs: bool = True) -> Any:
    """A field of :class:`EvalSpec` (``dataclasses.MISSING`` default: required).

    Args:
        default: the value when nothing is given (a dict is copied per spec).
        help: its ``python -m rat.eval --help`` text, where ``--<name>`` (underscores as dashes) reads it by ``rule``.
        rule: how it is read from the command line and a jobs file.
        group: its group in ``--help``.
        identity: it defines the evaluation: in its identity as ``key`` (default its name) with the value ``record``
            gives (default the spec's), which the default file name's fingerprint hashes.
        recorded: the result records the identity value (compared with an existing result before it is reused or
            replaced, in :data:`IDENTITY_KEYS`); False: only in the file name's fingerprint.
        state: a recorded identity value is part of the state file's fingerprint (False for a setting it holds
            otherwise, e.g. in attack_settings).
        stale: ``(result, requested value) -> bool``, whether a result was computed with another value (the runner's
            reruns); default for a recorded identity setting: ``result[key] != value``; None: not compared.
        label: the name :func:`request_differences` reports (default ``key``).
        jobs: a key of the same name in a jobs-file entry (False: the jobs file gives it its own way, or not at all).
    """
    meta = {"setting": Setting(help, rule, group, identity, key, record, recorded, state, stale, label, jobs)}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _given(key: str) -> Callable[[dict[str, Any], Any], bool]:
    """Stale when a value was asked for (not None) and the result records another."""
    return lambda result, value: value is not None and result.get(key) != value


def _shard_record(shard: tuple[int, int] | None) -> dict[str, int] | None:
    return {"index": shard[0], "count": shard[1]} if shard else None


def _settings_stale(attack: str, key: str, standard: int) -> Callable[[dict[str, Any], Any], bool]:
    """Stale when the result's AutoAttack settings hold another budget than requested (None: the standard one)."""
    return lambda result, value: result.get("attack_settings", {}).get(attack, {}).get(key) != (value or standard)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSpec:
    """What to evaluate: one AutoAttack evaluation (``python -m rat.eval --help`` shows each field's help). Fields in
    the order of the evaluation's identity; ``None`` fields take their documented defaults (``rat.eval.resolve``)."""

    arch: str | None = setting(
        None, "architecture; only for checkpoints that do not name it, or random weights", Text(), "model",
        identity=True, record=lambda spec, source, attacks: source.arch, stale=_given("arch"))
    model_kwargs: dict[str, Any] = setting(
        {}, "JSON kwargs for create_model (num_classes...)", JsonObject(), "model",
        identity=True, record=lambda spec, source, attacks: source.model_kwargs,
        stale=None)  # the result records the checkpoint's kwargs with these on top
    checkpoint: Path | str | None = setting(
        None, "rat trainer checkpoint, bare state dict or released checkpoint", Text(path=True), "model",
        identity=True, key="checkpoint_sha256", record=lambda spec, source, attacks: source.checkpoint_sha256,
        stale=None, jobs=False)  # recorded by its SHA-256, which the runner compares itself (the file may change)
    use_ema: bool = setting(False, "evaluate the EMA weights of a rat checkpoint", Switch(), "model", identity=True)
    normalize: bool | None = setting(
        None, "1: ImageNet mean/std normalization inside the model, 0: raw [0,1] inputs (default: what the checkpoint "
              "says; required for a checkpoint that does not say)", Binary(), "model",
        stale=_given("normalize"))  # recorded in model_kwargs
    norm: str = setting("Linf", "threat model", OneOf(NORMS), "threat model", identity=True, label=THREAT, jobs=False)
    eps: float | None = setting(
        None, "radius in [0,1] pixel units, e.g. 4/255 (default: Linf 4/255, L2 2, L1 75)", Eps(), "threat model",
        identity=True, label=THREAT, jobs=False,
        stale=lambda result, value: not math.isclose(result["eps"], value, rel_tol=1e-9))
    resolution: int | None = setting(
        None, "input side (default: the checkpoint's training size, or 224)", WholeNumber(1), "threat model",
        identity=True, label=THREAT, jobs=False)
    version: str = setting(
        "standard", "standard: APGD-CE, APGD-T, FAB-T, Square; fast: APGD-CE, APGD-T; custom: --attacks",
        OneOf(VERSIONS), "AutoAttack", identity=True, state=False, label=THREAT, jobs=False)  # state: the attacks
    attacks: list[str] | None = setting(
        None, "attacks of --version custom, in order", ListOf(OneOf(ALL_ATTACKS)), "AutoAttack",
        identity=True, record=lambda spec, source, attacks: attacks, label=THREAT, stale=_given("attacks"))
    n_ex: int = setting(5000, "images of the fixed val subset", WholeNumber(1), "data", identity=True, label=THREAT)
    subset: str = setting(
        "auto", "robustbench: RobustBench's 5000 ImageNet val files; seeded: a seeded sample of the val set; auto: "
                "robustbench on ImageNet-1k, else seeded", OneOf(SUBSETS), "data",
        identity=True, recorded=False,  # the result (and the state) record the subset it resolved to
        stale=lambda result, value: value != "auto" and (result.get("subset") or {}).get("name") != value)
    batch_size: int = setting(
        100, "images per batch (unit of resuming/sharding)", WholeNumber(1), "data", identity=True)
    precision: str = setting("fp32", "autocast precision; logits in fp32", OneOf(list(PRECISIONS)), "run",
                             identity=True)
    seed: int = setting(0, "AutoAttack seed", WholeNumber(0, plain_cli=True), "AutoAttack",
                        identity=True, state=False)  # state: attack_settings
    shard: tuple[int, int] | None = setting(
        None, "INDEX/COUNT: evaluate one of COUNT slices of the batches", Shard(), "data", identity=True,
        record=lambda spec, source, attacks: _shard_record(spec.shard), jobs=False,
        stale=lambda result, value: result.get("shard") != _shard_record(value))
    n_iter: int | None = setting(
        None, f"APGD/FAB iterations instead of {STANDARD_N_ITER} (smoke tests only)", WholeNumber(1), "AutoAttack",
        identity=True, state=False, stale=_settings_stale("apgd", "n_iter", STANDARD_N_ITER))
    n_queries: int | None = setting(
        None, f"Square queries instead of {STANDARD_N_QUERIES} (smoke tests only)", WholeNumber(1), "AutoAttack",
        identity=True, state=False, stale=_settings_stale("square", "n_queries", STANDARD_N_QUERIES))
    data: Path | str = setting(
        dataclasses.MISSING, "val .beton or ImageNet-style val folder", Text(path=True), "data", identity=True,
        record=lambda spec, source, attacks: str(Path(spec.data).resolve()), state=False, stale=None)
    device: str | None = setting(None, "default: cuda if available, else cpu", Device(), "run", jobs=False)
    num_workers: int = setting(4, "data loader workers (0: load in this process)", WholeNumber(0), "data")
    output: Path | str | None = setting(
        None, "JSON result (default: aa_<norm>-<eps>_r<res>_<version>_n<n_ex>_<checkpoint>_<fingerprint>.json next to "
              "the checkpoint; never replaces another evaluation's result)", Text(path=True), "run", jobs=False)
    name: str | None = setting(None, "model name in the result (default: <run folder>-<file stem>)", Text(), "model",
                               jobs=False)  # a jobs file names its entries itself (a folder name)


_FIELDS: tuple[tuple[str, Setting, Any], ...] = tuple(
    (f.name, f.metadata["setting"], f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
    for f in dataclasses.fields(EvalSpec))

# The defaults of an evaluation, shared by ``python -m rat.eval`` and the runner's jobs file.
SPEC_DEFAULTS: dict[str, Any] = {name: default for name, _, default in _FIELDS if default is not dataclasses.MISSING}


# The settings a jobs-file entry gives under their own name: name -> (check, default); a setting without a default
# (data) or with None may be null (missing: a required one is refused when the entry is expanded).
JOB_SETTINGS: dict[str, tuple[Callable[[Any], Any], Any]] = {
    name: (nullable(s.rule.check), None) if default in (None, dataclasses.MISSING) else (s.rule.check, default)
    for name, s, default in _FIELDS if s.jobs}

# The keys a result records of its identity, compared before a result is reused or replaced (in this order).
IDENTITY_KEYS: tuple[str, ...] = tuple(s.key or name for name, s, _ in _FIELDS if s.identity and s.recorded)
# What the shards of one evaluation must agree on before they merge (rat.eval.results.merge_results): every recorded
# identity key but the shard itself, the result's name, the subset it resolved to and the attacks' resolved settings.
SHARD_INVARIANT: tuple[str, ...] = (*(k for k in IDENTITY_KEYS if k != "shard"), "model", "subset", "attack_settings")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(groups: dict[str, Any]) -> None:
    """Add a ``--<name>`` argument per field of :class:`EvalSpec` to ``groups[setting.group]`` (argparse groups)."""
    for name, s, default in _FIELDS:
        kwargs = s.rule.cli()
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        elif kwargs.get("action") != "store_true":
            kwargs["default"] = default
        groups[s.group].add_argument(_flag(name), help=s.help, **kwargs)


def spec_from_args(args: argparse.Namespace) -> EvalSpec:
    """An :class:`EvalSpec` from arguments parsed by a parser with :func:`add_arguments`."""
    return EvalSpec(**{name: s.rule.from_cli(getattr(args, name)) for name, s, _ in _FIELDS})


def spec_argv(spec: EvalSpec) -> list[str]:
    """The ``python -m rat.eval`` arguments that give ``spec`` (the inverse of :func:`spec_from_args`)."""
    return [word for name, s, _ in _FIELDS for word in s.rule.argv(_flag(name), getattr(spec, name))]


def check_spec(spec: EvalSpec) -> None:
    """Every setting given through the Python API (:func:`rat.eval.run_evaluation`) checked by its rule, as a jobs
    file's values are: one vocabulary for the command line, the jobs file and the API. Paths and the shard come typed
    from Python (the command line and the jobs file check their text).

    Raises:
        ValueError: ``<name>=<value>: <what it must be>``.
    """
    for name, s, _ in _FIELDS:
        value = getattr(spec, name)
        if value is None or isinstance(value, (Path, tuple)):
            continue
        try:
            s.rule.check(value)
        except ValueError as exc:
            raise ValueError(f"{name}={value!r}: {exc}") from None


def evaluation_identity(spec: EvalSpec, source: Any, attacks: list[str]) -> dict[str, Any]:
    """Everything that defines an evaluation's numbers, as its result records it, from ``spec`` with its defaults
    filled in, its model ``source`` (``arch``, ``model_kwargs``, ``checkpoint_sha256``) and its resolved attacks."""
    identity = {s.key or name: s.record(spec, source, attacks) if s.record else getattr(spec, name)
                for name, s, _ in _FIELDS if s.identity}
    return json.loads(json.dumps(identity))  # as it reads back from JSON


def state_fingerprint(identity: dict[str, Any], attack_settings: dict[str, Any],
                      subset: dict[str, Any]) -> dict[str, Any]:
    """What a state file must match to be resumed: the identity's state settings, AutoAttack's settings (attacks'
    budgets and seed) and the subset the request resolved to."""
    state = {s.key or name: identity[s.key or name] for name, s, _ in _FIELDS if s.identity and s.recorded and s.state}
    return {**state, "attack_settings": attack_settings, "subset": subset}


def request_differences(result: dict[str, Any], spec: EvalSpec) -> list[str]:
    """The settings in which a finished result differs from what ``spec`` would compute (each named once, in the
    order of the fields); the checkpoint is not compared (its file may have changed: the runner hashes it)."""
    differs: list[str] = []
    for name, s, _ in _FIELDS:
        stale = s.stale
        if stale is _SAME:
            if not (s.identity and s.recorded):
                continue
            key = s.key or name
            stale = lambda result_, value, key=key: result_.get(key) != value  # noqa: E731
        if stale is not None and stale(result, getattr(spec, name)):
            label = s.label or s.key or name
            if label not in differs:
                differs.append(label)
    return differs
