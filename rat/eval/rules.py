"""The rules of rat.eval's settings (:mod:`rat.eval.spec`): one per kind of value, each read in both forms rat gets it
in: command-line text (``cli()``: argparse's ``type``, ``choices`` or ``action``, one line on a bad value) and a typed
jobs-file value (``check``: a ValueError saying what the value must be); ``argv`` writes a value back as command-line
words (the runner's task commands).
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

__all__ = ["Binary", "Device", "Eps", "JsonObject", "ListOf", "OneOf", "Rule", "Shard", "Switch", "Text", "WholeNumber",
           "nullable", "parse_eps"]


def nullable(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``check``, letting None (YAML null: not given) through."""
    return lambda value: None if value is None else check(value)


def parse_eps(text: str | float | int) -> float:
    """Parse an epsilon such as ``4/255``, ``0.0156``, ``2`` or ``75``.

    Raises:
        ValueError: not a positive number or fraction.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        try:
            value = float(Fraction(str(text).strip()))
        except (ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"cannot read eps {text!r}: write a number or a fraction such as 4/255") from exc
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"eps must be a positive number, got {text!r}")
    return value


class Rule:
    """How a setting's value is read and written back: ``cli()`` the argparse keyword arguments that read it from
    command-line text, ``check(value)`` a jobs-file value (ValueError: what it must be), ``from_cli(value)`` what
    argparse gives → the spec's value, ``argv(flag, value)`` the command-line words that give it (none when unset)."""

    def cli(self) -> dict[str, Any]:
        return {}

    def check(self, value: Any) -> Any:
        return value

    def from_cli(self, value: Any) -> Any:
        return value

    def argv(self, flag: str, value: Any) -> list[str]:
        return [] if value is None else [flag, str(value)]


class Text(Rule):
    """A non-empty string (a ``Path`` on the command line with ``path``)."""

    def __init__(self, path: bool = False):
        self.path = path

    def cli(self) -> dict[str, Any]:
        return {"type": Path} if self.path else {}

    def check(self, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ValueError("must be a non-empty string")
        return value


class WholeNumber(Rule):
    """An int >= ``lo`` (on the command line plain ``int`` with ``plain_cli``: any int, argparse's message)."""

    def __init__(self, lo: int, plain_cli: bool = False):
        self.lo = lo
        self.plain_cli = plain_cli

    def cli(self) -> dict[str, Any]:
        return {"type": int if self.plain_cli else self.parse}

    def parse(self, text: str) -> int:
        try:
            value = int(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from exc
        if value < self.lo:
            raise argparse.ArgumentTypeError(f"{text} must be at least {self.lo}")
        return value

    def check(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be a whole number >= {self.lo}")
        if value < self.lo:
            raise ValueError(f"must be >= {self.lo}")
        return value


class OneOf(Rule):
    """One of ``choices``."""

    def __init__(self, choices: Sequence[str]):
        self.choices = list(choices)

    def cli(self) -> dict[str, Any]:
        return {"choices": self.choices}

    def check(self, value: Any) -> str:
        if value not in self.choices:
            raise ValueError(f"must be one of {', '.join(self.choices)}")
        return value


class ListOf(Rule):
    """A list of items passing ``item``, a rule or a check (in a jobs file also a single item: a list of one)."""

    def __init__(self, item: Rule | Callable[[Any], Any]):
        self.item = item
        self.check_item = item.check if isinstance(item, Rule) else item

    def cli(self) -> dict[str, Any]:
        return {"nargs": "+", **(self.item.cli() if isinstance(self.item, Rule) else {})}

    def check(self, value: Any) -> list:
        values = value if isinstance(value, list) else [value]
        if not values:
            raise ValueError("must not be empty")
        out = []
        for v in values:
            try:
                out.append(self.check_item(v))
            except ValueError as exc:
                raise ValueError(f"item {v!r} {exc}") from exc
        return out

    def argv(self, flag: str, value: Any) -> list[str]:
        return [flag, *map(str, value)] if value else []


class Switch(Rule):
    """On or off: a bare flag on the command line, a real YAML boolean in a jobs file."""

    def cli(self) -> dict[str, Any]:
        return {"action": "store_true"}

    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError("must be true or false (an unquoted YAML boolean)")
        return value

    def argv(self, flag: str, value: Any) -> list[str]:
        return [flag] if value else []


class Binary(Switch):
    """True or false, written 1 or 0 on the command line; unset (None) means "not asked for"."""

    def cli(self) -> dict[str, Any]:
        return {"type": int, "choices": (0, 1)}

    def from_cli(self, value: Any) -> bool | None:
        return None if value is None else bool(value)

    def argv(self, flag: str, value: Any) -> list[str]:
        return [] if value is None else [flag, str(int(value))]


class JsonObject(Rule):
    """A mapping: JSON text on the command line, a YAML mapping (or null: none) in a jobs file."""

    def cli(self) -> dict[str, Any]:
        return {"type": self.parse}

    @staticmethod
    def parse(text: str) -> dict:
        example = "a JSON object such as '{\"num_classes\": 10}'"
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"--model-kwargs takes {example}: {exc}") from exc
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"--model-kwargs takes {example}")
        return value

    def check(self, value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValueError("must be a mapping such as {num_classes: 10}")
        return dict(value)

    def argv(self, flag: str, value: Any) -> list[str]:
        return [flag, json.dumps(value, sort_keys=True)] if value else []


class Eps(Rule):
    """A radius: a positive number or fraction such as 4/255 (:func:`parse_eps`)."""

    def cli(self) -> dict[str, Any]:
        return {"type": self.parse}

    @staticmethod
    def parse(text: str) -> float:
        try:
            return parse_eps(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    def check(self, value: Any) -> float:
        return parse_eps(value)

    def argv(self, flag: str, value: Any) -> list[str]:
        return [] if value is None else [flag, repr(float(value))]


class Shard(Rule):
    """``INDEX/COUNT`` → ``(index, count)``."""

    def cli(self) -> dict[str, Any]:
        return {"type": self.parse}

    @staticmethod
    def parse(text: str) -> tuple[int, int]:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"--shard takes INDEX/COUNT such as 0/4, got {text!r}") from exc
        if not 0 <= index < count:
            raise argparse.ArgumentTypeError(f"--shard {text}: INDEX must be in 0..COUNT-1")
        return index, count

    def argv(self, flag: str, value: Any) -> list[str]:
        return [] if value is None else [flag, f"{value[0]}/{value[1]}"]


class Device(Rule):
    """``cpu``, ``cuda`` or ``cuda:N``."""

    def cli(self) -> dict[str, Any]:
        return {"type": self.parse}

    @staticmethod
    def parse(text: str) -> str:
        try:
            device = torch.device(text)
        except RuntimeError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a torch device: use cpu, cuda or cuda:N") from exc
        if device.type not in ("cpu", "cuda"):
            raise argparse.ArgumentTypeError(f"{text!r}: rat.eval runs on cpu or cuda[:N]")
        return text
