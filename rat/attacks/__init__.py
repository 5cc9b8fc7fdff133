"""Adversarial attacks for training and quick robust evaluation: APGD (Linf / L2 / L1), PGD, FGSM-RS, none.

Use :func:`create_attack` (one registry, :data:`ATTACKS`); every attack has ``perturb(x, y) -> x_adv`` with the
contract stated in :mod:`rat.attacks.base`. Building blocks (projections, the attack base classes' helpers) stay in
their submodules, e.g. :mod:`rat.attacks.norms`.
"""
from .apgd import APGDAttack
from .base import DEFAULT_EPS, Attack, NoAttack, check_eps, per_sample_loss
from .fgsm import FGSMAttack
from .multi import MultiNormAttack
from .norms import NORMS, lp_norm, project
from .pgd import PGDAttack
from .registry import ATTACKS, create_attack, register_attack
from .training import AdversarialLoss, adversarial_loss, eps_warmup_factor

__all__ = [
    "ATTACKS",
    "DEFAULT_EPS",
    "NORMS",
    "APGDAttack",
    "AdversarialLoss",
    "Attack",
    "FGSMAttack",
    "MultiNormAttack",
    "NoAttack",
    "PGDAttack",
    "adversarial_loss",
    "check_eps",
    "create_attack",
    "eps_warmup_factor",
    "lp_norm",
    "per_sample_loss",
    "project",
    "register_attack",
]
