"""Adversarial attacks for training and quick robust evaluation: APGD (Linf / L2 / L1), PGD, FGSM-RS, none.

Use :func:`create_attack` (one registry, :data:`ATTACKS`); every attack has ``perturb(x, y) -> x_adv`` with the
contract stated in :mod:`rat.attacks.base`.
"""
from .apgd import APGDAttack, APGDResult
from .base import DEFAULT_EPS, LOSSES, Attack, LpAttack, NoAttack, attack_mode, per_sample_loss, unwrap_model
from .fgsm import FGSMAttack
from .multi import MultiNormAttack
from .norms import NORMS, canonical_norm, lp_norm, project, project_l1, project_l2, project_linf
from .pgd import PGDAttack
from .registry import ATTACKS, create_attack, register_attack
from .training import AdversarialLoss, adversarial_loss, eps_at_epoch, eps_warmup_factor

__all__ = [
    "ATTACKS",
    "DEFAULT_EPS",
    "LOSSES",
    "NORMS",
    "APGDAttack",
    "APGDResult",
    "AdversarialLoss",
    "Attack",
    "FGSMAttack",
    "LpAttack",
    "MultiNormAttack",
    "NoAttack",
    "PGDAttack",
    "adversarial_loss",
    "attack_mode",
    "canonical_norm",
    "create_attack",
    "eps_at_epoch",
    "eps_warmup_factor",
    "lp_norm",
    "per_sample_loss",
    "project",
    "project_l1",
    "project_l2",
    "project_linf",
    "register_attack",
    "unwrap_model",
]
