"""Up-front model checks for the CLIs: the architecture exists, and it takes the resolution (on the meta device: no
memory, no compute)."""
from __future__ import annotations

import difflib
from typing import Any

import torch

__all__ = ["InputSizeError", "UnknownArchError", "check_arch", "check_input_size"]

_SEARCH = range(8, 1025, 8)


class InputSizeError(ValueError):
    """A resolution the model cannot take; the message names the smallest one it can."""


class UnknownArchError(ValueError):
    """A model name that timm does not know; the message names the closest registered ones."""


def check_arch(arch: str) -> None:
    """Check that ``arch`` is a registered timm model (rat's ``*_cvst`` models included).

    Raises:
        UnknownArchError: it is not; the message lists the closest registered names.
    """
    import timm

    import rat.models  # noqa: F401  (registers the *_cvst models)

    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    hint = f"closest registered: {', '.join(close)}" if close else "rat's models are timm.list_models('*_cvst')"
    raise UnknownArchError(f"{arch!r} is not a registered model ({hint})")


def _fits(arch: str, resolution: int, kwargs: dict[str, Any]) -> str | None:
    """None if ``arch`` runs on ``resolution``² inputs, else the model's complaint."""
    from rat.models import create_model
    from rat.models.factory import ModelKwargsError

    try:
        with torch.device("meta"), torch.no_grad():
            model = create_model(arch, img_size=resolution, **kwargs).eval()
            model(torch.zeros(1, 3, resolution, resolution))
    except ModelKwargsError:
        raise  # a bad keyword is its own error, whatever the resolution
    except (RuntimeError, AssertionError, ValueError) as exc:  # what torch and timm raise for a too-small input
        return " ".join(str(exc).split())[:160]
    return None


def check_input_size(arch: str, resolution: int, **kwargs: Any) -> None:
    """Check that ``arch`` (built with ``kwargs``, e.g. ``num_classes``) runs at ``resolution`` by a forward pass on
    the meta device, which checks every shape but allocates and computes nothing.

    Raises:
        ModelKwargsError: the model does not take one of ``kwargs`` (a ``ValueError``).
        InputSizeError: it does not; the message gives the model's complaint and the smallest resolution that works.
    """
    problem = _fits(arch, resolution, kwargs)
    if problem is None:
        return
    smallest = next((r for r in _SEARCH if r > resolution and _fits(arch, r, kwargs) is None), None)
    fix = f"use at least {smallest}" if smallest is not None else "use a larger one"
    raise InputSizeError(f"resolution {resolution} is too small for {arch} ({problem}): {fix}")
