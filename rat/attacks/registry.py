"""The attack registry: one name per attack class, one factory (:func:`create_attack`) used by the trainer."""
from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import nn

from .base import Attack, NoAttack, as_list
from .norms import canonical_norm

_logger = logging.getLogger(__name__)

ATTACKS: dict[str, type[Attack]] = {}
"""Registered attack classes by name: 'apgd', 'pgd', 'fgsm', 'none'."""

_A = TypeVar("_A", bound=type[Attack])

# MadryLab robustness spells some PGD options differently; create_attack('pgd', ...) accepts both spellings.
_ROBUSTNESS_ALIASES = {"constraint": "norm", "attack_lr": "step_size", "attack_steps": "n_iter",
                       "iterations": "n_iter"}


def register_attack(name: str) -> Callable[[_A], _A]:
    """Class decorator adding an attack to :data:`ATTACKS` under ``name``; duplicate names are an error."""

    def decorator(cls: _A) -> _A:
        if name in ATTACKS:
            raise ValueError(f"attack name {name!r} is already registered to {ATTACKS[name].__name__}; "
                             "pick another name")
        cls.name = name
        ATTACKS[name] = cls
        return cls

    return decorator


register_attack("none")(NoAttack)


def _translate_aliases(options: dict[str, Any], explicit: dict[str, Any]) -> dict[str, Any]:
    """Map robustness option names onto rat's; a value given under both names must agree."""
    for alias, canonical in _ROBUSTNESS_ALIASES.items():
        if alias not in options:
            continue
        value = options.pop(alias)
        if canonical == "norm":
            value = canonical_norm(value)
        current = explicit.get(canonical, options.get(canonical))
        if current is not None and current != value:
            raise ValueError(f"conflicting options {alias}={value!r} and {canonical}={current!r}: give only one")
        if canonical in explicit:
            explicit[canonical] = value
        else:
            options[canonical] = value
    return options


def create_attack(name: str, model: nn.Module, *, norm: str | Sequence[str] | None = None,
                  eps: float | Sequence[float | None] | None = None, n_iter: int | Sequence[int] | None = None,
                  seed: int = 0, calls_per_norm: int = 1, **options: Any) -> Attack:
    """Build an attack by name.

    Args:
        name: ``'apgd'``, ``'pgd'``, ``'fgsm'`` or ``'none'`` (see :data:`ATTACKS`).
        model: the classifier (DDP / DataParallel wrappers are removed; pass the training model as is).
        norm: ``'Linf'`` (default), ``'L2'`` or ``'L1'``; a list of norms builds a :class:`MultiNormAttack` that
            alternates them batch by batch (E-AT), e.g. ``norm=['Linf', 'L1'], eps=[4/255, 75]``.
        eps: radius, or one per norm; ``None`` → :data:`~rat.attacks.base.DEFAULT_EPS` of the norm.
        n_iter: steps, or one per norm; ``None`` → the attack's default (apgd 2, pgd 10, fgsm 1).
        seed: seed of the attack's private generator (pass ``base_seed + rank`` under DDP).
        calls_per_norm: with several norms, consecutive ``perturb`` calls per norm (the trainer's gradient
            accumulation: one norm per optimizer step).
        **options: attack-specific options, e.g. ``random_start``, ``n_restarts``, ``step_size``, ``use_best``
            (apgd); ``step_size``, ``random_start``, ``random_restarts``, ``use_best`` (pgd); ``step_size``,
            ``random_start`` (fgsm). MadryLab robustness spellings are accepted for every attack: ``constraint``
            ('inf' | '2') for ``norm``, ``attack_lr`` for ``step_size``, ``attack_steps`` for ``n_iter``.
            ``'none'`` ignores all options.

    Returns:
        An :class:`~rat.attacks.base.Attack`; ``attack.perturb(x, y)`` returns ``x_adv``.

    Raises:
        ValueError: unknown attack name, unknown option, or inconsistent per-norm lists.
    """
    from .multi import MultiNormAttack

    key = str(name).strip().lower()
    if key not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}: use one of {', '.join(sorted(ATTACKS))}")
    cls = ATTACKS[key]
    if cls is NoAttack:
        if options:
            _logger.debug("attack 'none' ignores options %s", sorted(options))
        return NoAttack(model)

    explicit: dict[str, Any] = {"norm": norm, "n_iter": n_iter}
    options = _translate_aliases(dict(options), explicit)
    norm, n_iter = explicit["norm"], explicit["n_iter"]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "model"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"attack {key!r} has no option(s) {', '.join(unknown)}; "
                         f"its options are {', '.join(sorted(accepted))}")

    if norm is None:
        norm = "Linf"
    if isinstance(norm, str):
        return cls(model, norm=norm, eps=eps, n_iter=n_iter, seed=seed, **options)
    norms = list(norm)
    if not norms:
        raise ValueError("norm is an empty list: give at least one norm")
    if eps is not None and not isinstance(eps, Sequence) and len(norms) > 1:
        raise ValueError(f"one eps ({eps}) for {len(norms)} norms {norms} is ambiguous: give one eps per norm")
    eps_list = as_list(eps, len(norms), "eps")
    iter_list = as_list(n_iter, len(norms), "n_iter")
    attacks = [cls(model, norm=nm, eps=e, n_iter=k, seed=seed + 7919 * i, **options)
               for i, (nm, e, k) in enumerate(zip(norms, eps_list, iter_list))]
    return attacks[0] if len(attacks) == 1 else MultiNormAttack(attacks, calls_per_norm)
