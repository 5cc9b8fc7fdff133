"""FGSM with random start ("fast is better than free", Wong, Rice & Kolter 2020): the cheap single-step baseline.

``δ₀ ~ U[-ε, ε]`` (clipped to the box), ``δ = clip(δ₀ + α·sign(∇ℓ(x + δ₀)), -ε, ε)``, ``x_adv = clip(x + δ, 0, 1)``
with α = 1.25·ε. One forward and one input-backward pass.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .base import LpAttack
from .norms import point_projector, random_in_ball
from .registry import register_attack

_logger = logging.getLogger(__name__)


@register_attack("fgsm")
class FGSMAttack(LpAttack):
    """FGSM-RS in the Linf ball.

    Args:
        model: classifier taking [0, 1] inputs; DDP / DataParallel wrappers are removed.
        norm: ``'Linf'`` only.
        eps: radius; ``None`` → 4/255.
        n_iter: must be 1 (or ``None``): FGSM is single-step — use 'pgd' or 'apgd' for more steps.
        step_size: α; ``None`` → 1.25·ε (Wong et al.). Scaled together with ε by :meth:`set_eps_scale`.
        random_start: start from δ₀ ~ U[-ε, ε] (FGSM-RS); ``False`` gives plain FGSM.
        seed: seed of the private generator.
        loss: ``'ce'`` or ``'dlr'``.
    """

    supported_norms = ("Linf",)
    default_n_iter = 1

    def __init__(self, model: nn.Module, *, norm: str = "Linf", eps: float | None = None, n_iter: int | None = None,
                 step_size: float | None = None, random_start: bool = True, seed: int = 0, loss: str = "ce") -> None:
        if n_iter not in (None, 1):
            raise ValueError(f"FGSM is a single-step attack, got n_iter={n_iter}: use n_iter=1, or attack 'pgd' / "
                             "'apgd' for several steps")
        super().__init__(model, norm=norm, eps=eps, n_iter=1, seed=seed, loss=loss)
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        self.step_size = None if step_size is None else float(step_size)
        self.random_start = bool(random_start)

    @property
    def current_step_size(self) -> float:
        """α in use (scaled with ε during a warm-up)."""
        return 1.25 * self.current_eps if self.step_size is None else self.step_size * self.eps_scale

    def __repr__(self) -> str:
        return (f"FGSMAttack(eps={self.eps:.6g}, step_size={self.current_step_size:.6g}, "
                f"random_start={self.random_start}, seed={self.seed})")

    def _attack(self, x: Tensor, y: Tensor, generator_seed: int) -> Tensor:
        eps = self.current_eps
        if self.random_start:
            start = random_in_ball(x, "Linf", eps, self._generator(x.device, generator_seed), kind="uniform")
        else:
            start = x
        _, _, grad = self._loss_and_grad(start, y)
        return point_projector(x, "Linf", eps)(torch.add(start, grad.sign_(), alpha=self.current_step_size))
