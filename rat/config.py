"""rat's strict fastargs front end: Config objects from YAML/JSON files and flags, and the checkers every Section uses.

Values come, in increasing precedence, from each Param's default, the ``--config-file``/``-C`` YAML (or JSON) files
in the order given, and ``--section.name value`` flags. Unlike plain fastargs, rat

* rejects a key in a config file that no Section declares (fastargs silently ignores it), naming the key and the closest
  declared one;
* reports every invalid value with the rule it breaks, instead of printing a table and exiting with status 0;
* does not read parameters from environment variables (fastargs collects all of ``os.environ``, a silent source of
  surprises on shared clusters);
* uses 0/1 ints for on/off flags (fastargs' ``bool`` checker turns the string ``"0"`` into ``True``).

The Sections belong to their commands: the trainer's are the frozen dataclasses of :mod:`rat.train.spec` (each field
declares its Param through :func:`param`; :func:`declare_spec` turns them into Sections), ``python -m rat.quant``'s are
declared in :mod:`rat.quant.sections`. Each command reads its Config once, at its entry point.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import difflib
import json
import math
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from fastargs import Config, Param, Section, set_current_config
from fastargs.validation import And, Checker, InRange

from rat.cli import ArgumentParser
from rat.io import DuplicateKeyError, read_yaml
from rat.logging import progress_setting

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem the user has to fix; the message says which key and how."""


class StrictInt(Checker):
    """An integer; unlike fastargs' ``int`` it refuses 1.5 instead of truncating it to 1."""

    def check(self, value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(value)
            return int(value)
        return int(value)

    def help(self) -> str:
        return "an int"


class Flag(Checker):
    """An on/off switch written as 0 or 1."""

    def check(self, value: Any) -> int:
        if isinstance(value, bool) or str(value).strip() not in ("0", "1"):
            raise ValueError(value)
        return int(value)

    def help(self) -> str:
        return "0 or 1"


class Progress(Checker):
    """A progress setting: auto, 1 or 0 (:func:`rat.logging.progress_setting`, the one rule of every entry point)."""

    def check(self, value: Any) -> str:
        try:
            return progress_setting(value)
        except ValueError:
            raise ValueError(value) from None

    def help(self) -> str:
        return "auto, 1 or 0"


class CommaList(Checker):
    """A comma-separated list (or a single value, or a YAML list) whose items all pass ``item``; returns the string."""

    def __init__(self, item: Checker, what: str, allow_empty: bool = False):
        self.item = item
        self.what = what
        self.allow_empty = allow_empty

    def check(self, value: Any) -> str:
        items = value if isinstance(value, list) else str(value).split(",")
        items = [str(v).strip() for v in items if str(v).strip()]
        if not items and not self.allow_empty:
            raise ValueError(value)
        for item in items:
            self.item.check(item)
        return ",".join(items)

    def help(self) -> str:
        return f"comma-separated {self.what}" + (" (empty allowed)" if self.allow_empty else "")


class FiniteFloat(Checker):
    """A finite float in ``[lo, hi]`` (an end excluded with ``lo_open``/``hi_open``). Every float setting of rat is
    one: fastargs' ``float`` and ``InRange`` let NaN and infinity through, which then fail mid-run (or never)."""

    def __init__(self, lo: float = float("-inf"), hi: float = float("inf"), *, lo_open: bool = False,
                 hi_open: bool = False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open

    def check(self, value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(value)
        value = float(value)
        if not math.isfinite(value) or value < self.lo or value > self.hi or (self.lo_open and value == self.lo) \
                or (self.hi_open and value == self.hi):
            raise ValueError(value)
        return value

    def help(self) -> str:
        if self.lo_open and self.hi == float("inf"):
            return f"a finite float > {self.lo:g}"
        lo = "" if self.lo == float("-inf") else f"{self.lo:g}"
        hi = "" if self.hi == float("inf") else f"{self.hi:g}"
        if not hi:
            return f"a finite float >= {lo}" if lo else "a finite float"
        return f"a finite float in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"


class PositiveFloat(FiniteFloat):
    def __init__(self) -> None:
        super().__init__(0, lo_open=True)


def int_in(lo: float = float("-inf"), hi: float = float("inf")) -> Checker:
    """An int in ``[lo, hi]``."""
    return And(StrictInt(), InRange(lo, hi))


def float_in(lo: float = float("-inf"), hi: float = float("inf"), *, hi_open: bool = False) -> Checker:
    """A finite float in ``[lo, hi]`` (``[lo, hi)`` with ``hi_open``)."""
    return FiniteFloat(lo, hi, hi_open=hi_open)


# ---- specs: frozen dataclasses whose fields declare fastargs Params -------------------------------------------------
def param(checker: Any, desc: str, *, default: Any) -> Any:
    """A spec field that declares its fastargs Param (a fresh ``Param(checker, desc, default=default)`` per Config).

    The field itself has no dataclass default: specs are made only from a validated Config, where the Param's default
    applies."""
    return dataclasses.field(metadata={"param": (checker, desc, default)})


def section(desc: str) -> Any:
    """A field of a spec of Sections (e.g. :class:`rat.train.spec.TrainSpec`): one Section, described by ``desc``."""
    return dataclasses.field(metadata={"desc": desc})


def spec_from_config(spec: type[T], config: Config) -> T:
    """``spec`` (a dataclass of :func:`section` fields, see :func:`declare_spec`) of a validated Config: one frozen,
    typed object per Section."""
    types = typing.get_type_hints(spec)
    values = config_to_dict(config)
    return spec(**{f.name: types[f.name](**values[f.name]) for f in dataclasses.fields(spec)})


def declare_spec(spec: type) -> None:
    """Declare every Section of ``spec`` (a dataclass whose :func:`section` fields are dataclasses of :func:`param`
    fields, e.g. :class:`rat.train.spec.TrainSpec`) on the current fastargs Config."""
    types = typing.get_type_hints(spec)
    for field_ in dataclasses.fields(spec):
        params = {}
        for inner in dataclasses.fields(types[field_.name]):
            checker, desc, default = inner.metadata["param"]
            params[inner.name] = Param(checker, desc, default=default)
        Section(field_.name, field_.metadata["desc"]).params(**params)


def _leaf_keys(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every leaf key of a config file's content as a path (dotted keys split), repeats kept."""
    if not isinstance(tree, dict):
        return [prefix]
    return [leaf for key, value in tree.items() for leaf in _leaf_keys(value, prefix + tuple(str(key).split(".")))]


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        path = prefix + tuple(str(key).split("."))
        flat.update(_flatten(value, path) if isinstance(value, dict) else {path: value})
    return flat


RECORD_KEY = "run_record"


def load_config_file(config: Config, fname: str) -> dict:
    """A YAML/JSON config file's values, every key checked against ``config``'s declared Params.

    Raises:
        ConfigError: the file is missing or not a mapping, or has a key no Section declares (fastargs'
            ``collect_config_file`` would silently ignore it); the message names the key and the closest declared one.
    """
    path = Path(fname)
    if not path.is_file():
        raise ConfigError(f"config file {fname} does not exist: check the path given to --config-file")
    try:
        content = read_yaml(path) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {fname} is not a text file ({err.reason} at byte {err.start}): pass a YAML "
                          "or JSON config such as configs/demo.yaml") from err
    except DuplicateKeyError as err:
        raise ConfigError(f"config file {fname}: {err}: keep one of them") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {fname} is not valid YAML: {err}".replace("\n", " ")) from err
    if not isinstance(content, dict):
        raise ConfigError(f"config file {fname} must map sections to parameters, got {type(content).__name__}")
    content.pop(RECORD_KEY, None)  # params.json's record of the run that wrote it (dump_config), not settings
    known = [".".join(p) for p in config.entries]
    flat = _flatten(content)
    for path_key, count in collections.Counter(_leaf_keys(content)).items():
        if count > 1:  # e.g. `training: {epochs: 1}` and `training.epochs: 50`
            raise ConfigError(f"config file {fname} gives '{'.'.join(path_key)}' {count} times (nested and dotted), "
                              "and only the last would count: keep one of them")
    for path_key in flat:
        if path_key not in config.entries:
            name = ".".join(path_key)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "see `--help` for the declared parameters"
            raise ConfigError(f"unknown key '{name}' in config file {fname}: {hint}")
    return content


def _parser(config: Config, prog: str | None, description: str) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", "-C", action="append", default=[],
                        help="YAML/JSON config file; repeatable, later files win, flags win over files")
    lines = []
    for path, param in config.entries.items():
        name = ".".join(path)
        parser.add_argument(f"--{name}", dest=name, default=None, metavar="V", help=argparse.SUPPRESS)
        lines.append(f"  --{name:<32} {param.desc} [{param.checker.help()}; default {param.default!r}]")
    parser.epilog = "parameters:\n" + "\n".join(lines)
    return parser


def make_config(argv: Sequence[str] | None, *, declare: Callable[[], None],
                check: Callable[[Config], None] | None = None,
                prog: str | None = None, description: str = "") -> Config:
    """Build a fresh fastargs Config (and make it the current one) from config files and flags.

    Args:
        argv: command-line arguments without the program name; ``None`` = no arguments (defaults only).
        prog: program name for ``--help``.
        description: text for ``--help``.
        declare: declares the command's Sections (e.g. :func:`rat.train.spec.declare_train_sections`, or one of
            :func:`rat.quant.sections.declare_quant_sections`).
        check: cross-parameter rules of those Sections, run on the validated Config.

    Raises:
        ConfigError: an unknown key in a config file, or values that break their Param's rule (all of them listed).
    """
    config = Config()
    set_current_config(config)
    declare()
    args = vars(_parser(config, prog, description).parse_args(list(argv or [])))
    for fname in args.pop("config_file"):
        config.collect(load_config_file(config, fname))
    config.collect({k: v for k, v in args.items() if v is not None})
    errors = config.validate(mode="errordict")
    if errors:
        problems = "; ".join(
            f"{'.'.join(path)}={config.content.get(path)!r} is not {config.entries[path].checker.help()}"
            for path in errors)
        raise ConfigError(f"invalid configuration: {problems}")
    if check is not None:
        check(config)
    return config


def config_to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """The full resolved configuration as ``{section: {name: value}}`` (what params.json stores)."""
    result: dict[str, dict[str, Any]] = {}
    for path in config.entries:
        result.setdefault(path[0], {})[".".join(path[1:])] = config[path]
    return result


def dump_config(values: dict[str, dict[str, Any]], path: str | Path, record: dict[str, Any] | None = None) -> None:
    """Write a resolved configuration (:func:`config_to_dict`, :meth:`TrainSpec.to_dict`) as JSON: a file that
    ``--config-file`` accepts back (``params.json``). ``record``: facts of the run that are no settings (the trainer's
    ``world_size`` and ``global_batch``), stored under :data:`RECORD_KEY`, which ``--config-file`` skips."""
    content = {**values, RECORD_KEY: record} if record is not None else values
    Path(path).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
