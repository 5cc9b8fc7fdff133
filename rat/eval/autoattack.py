"""The one place rat touches AutoAttack: ``pyautoattack==0.2.0``, the PyPI packaging of fra31/auto-attack.

rat runs the real AutoAttack code; this module only configures it and runs it one attack at a time, so that the
evaluation loop (``rat.eval.evaluate``) can save per-example robust flags after every attack of every batch and resume
an interrupted run. AutoAttack's own ``state_path`` cannot do that: the state it writes stores the set of attacks as a
string and cannot be read back (``ValueError: The state was created with a different set of attacks``).

Running the attacks one after the other, each on the points still robust after the previous one, with AutoAttack's
fixed seed, is exactly what ``AutoAttack.run_standard_evaluation`` does inside one call when its batch size covers the
batch; the tests check that the flags agree with a single call of it.

Versions:

* ``standard``: APGD-CE, APGD-T, FAB-T, Square with AutoAttack's standard settings (as RobustBench).
* ``fast``: APGD-CE and APGD-T only, with the same settings as in ``standard``.
* ``custom``: the attacks listed by the user, with the same settings as in ``standard``.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from pyautoattack import AutoAttack
from pyautoattack import __version__ as AUTOATTACK_VERSION  # noqa: N812
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from pyautoattack.checks import check_square_sr

__all__ = [
    "ALL_ATTACKS", "AUTOATTACK_VERSION", "STANDARD_N_ITER", "STANDARD_N_QUERIES", "VERSIONS", "attack_settings",
    "build_autoattack", "check_square", "resolve_attacks", "robust_after_attack",
]

_logger = logging.getLogger(__name__)

VERSIONS = ("standard", "fast", "custom")
ALL_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
# AutoAttack's standard budget, as pyautoattack's ``AutoAttack(version="standard")`` sets it (tested against it): the
# iterations of APGD, APGD-T and FAB-T, and the queries of Square. ``n_iter``/``n_queries`` replace them.
STANDARD_N_ITER = 100
STANDARD_N_QUERIES = 5000
_VERSION_ATTACKS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "fast": ("apgd-ce", "apgd-t"),
}


def resolve_attacks(version: str, attacks: Sequence[str] | None = None) -> list[str]:
    """The attacks a version runs, in order.

    Args:
        version: ``standard``, ``fast`` or ``custom``.
        attacks: the attacks for ``custom`` (any of ``ALL_ATTACKS``); must be empty for the other versions.

    Raises:
        ValueError: unknown version or attack, attacks given for a fixed version, or none given for ``custom``.
    """
    if version not in VERSIONS:
        raise ValueError(f"unknown AutoAttack version {version!r}: use one of {', '.join(VERSIONS)}")
    if version != "custom":
        if attacks:
            raise ValueError(f"--attacks only goes with --version custom (version {version!r} runs "
                             f"{', '.join(_VERSION_ATTACKS[version])})")
        return list(_VERSION_ATTACKS[version])
    if not attacks:
        raise ValueError(f"--version custom needs --attacks, a list of some of {', '.join(ALL_ATTACKS)}")
    unknown = [a for a in attacks if a not in ALL_ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {', '.join(unknown)}: use some of {', '.join(ALL_ATTACKS)}")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"attack listed twice in {', '.join(attacks)}")
    return list(attacks)


def _rebuild_apgd(attack: APGDAttack, n_iter: int) -> APGDAttack:
    """A copy of an APGD attack with another iteration budget (APGD derives its step schedule from n_iter at init)."""
    common = dict(n_iter=n_iter, norm=attack.norm, n_restarts=attack.n_restarts, eps=attack.eps_orig, seed=attack.seed,
                  eot_iter=attack.eot_iter, rho=attack.thr_decr, topk=attack.topk, verbose=attack.verbose,
                  device=attack.device, use_largereps=attack.use_largereps, logger=attack.logger)
    if isinstance(attack, APGDAttack_targeted):
        return APGDAttack_targeted(attack.model, n_target_classes=attack.n_target_classes, **common)
    return APGDAttack(attack.model, loss=attack.loss, **common)


def build_autoattack(
        model: torch.nn.Module,
        *,
        norm: str,
        eps: float,
        attacks: Sequence[str],
        device: torch.device | str,
        seed: int = 0,
        n_iter: int | None = None,
        n_queries: int | None = None,
) -> AutoAttack:
    """An ``AutoAttack`` with the standard settings for ``norm``, set to run ``attacks``.

    Args:
        model: maps [0,1] NCHW images to logits; in eval mode.
        norm: ``Linf``, ``L2`` or ``L1``.
        eps: radius in pixel units of [0,1] images.
        attacks: the attacks to run, in order (see ``resolve_attacks``).
        device: where the attacks run.
        seed: AutoAttack's seed; every attack call reseeds with it, so a batch's result does not depend on the
            batches before it.
        n_iter: iterations of APGD and FAB instead of AutoAttack's ``STANDARD_N_ITER``. Only for smoke tests: the
            result is then not a standard AutoAttack number, and the JSON result says so.
        n_queries: queries of Square instead of ``STANDARD_N_QUERIES``; same caveat.
    """
    adversary = AutoAttack(model, norm=norm, eps=eps, version="standard", seed=seed, device=device)
    adversary.attacks_to_run = list(attacks)
    if n_iter is not None:
        if n_iter < 1:
            raise ValueError(f"n_iter must be at least 1, got {n_iter}")
        adversary.apgd = _rebuild_apgd(adversary.apgd, n_iter)
        adversary.apgd_targeted = _rebuild_apgd(adversary.apgd_targeted, n_iter)
        adversary.fab.n_iter = n_iter
    if n_queries is not None:
        if n_queries < 1:
            raise ValueError(f"n_queries must be at least 1, got {n_queries}")
        adversary.square.n_queries = n_queries
    return adversary


def attack_settings(adversary: AutoAttack) -> dict[str, Any]:
    """The hyperparameters of the configured attacks, for the JSON result."""
    apgd, apgd_t, fab, square = adversary.apgd, adversary.apgd_targeted, adversary.fab, adversary.square
    return {
        "apgd": {"n_iter": apgd.n_iter_orig, "n_restarts": apgd.n_restarts, "use_largereps": apgd.use_largereps,
                 "rho": apgd.thr_decr, "eot_iter": apgd.eot_iter},
        "apgd-t": {"n_iter": apgd_t.n_iter_orig, "n_restarts": apgd_t.n_restarts,
                   "n_target_classes": apgd_t.n_target_classes, "use_largereps": apgd_t.use_largereps},
        "fab": {"n_iter": fab.n_iter, "n_restarts": fab.n_restarts, "n_target_classes": fab.n_target_classes},
        "square": {"n_queries": square.n_queries, "p_init": square.p_init, "n_restarts": square.n_restarts},
        "seed": adversary.seed,
    }


def robust_after_attack(adversary: AutoAttack, attack: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Run one attack of AutoAttack on a batch and return which points it did not break.

    This is one call of ``AutoAttack.run_standard_evaluation`` restricted to ``attack``, with a batch size covering
    the whole batch; a point counts as robust when the model still predicts its label on the returned example (points
    the model already misclassifies come back unchanged and count as not robust).

    Args:
        adversary: from ``build_autoattack``.
        attack: one of ``ALL_ATTACKS``.
        x: images in [0,1], NCHW, at least one.
        y: int64 labels.

    Returns:
        Bool tensor (len(x),) on the CPU.
    """
    saved = adversary.attacks_to_run
    adversary.attacks_to_run = [attack]
    try:
        _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=x.shape[0])
    finally:
        adversary.attacks_to_run = saved
    return y_adv.eq(y).cpu()


def check_square(robust_accuracy: dict[str, float]) -> None:
    """AutoAttack's own sanity check: warn when Square (black-box) beat the white-box attacks."""
    check_square_sr(robust_accuracy, logger=_logger)
