"""PGD (Madry et al. 2018) with the options of MadryLab's ``robustness`` library.

robustness → rat: ``constraint`` ('inf' | '2') → ``norm``, ``eps`` → ``eps``, ``attack_lr`` → ``step_size``,
``attack_steps`` → ``n_iter``, ``random_start``, ``random_restarts``, ``use_best`` keep their names
(``create_attack('pgd', ...)`` accepts either spelling). Semantics follow robustness:

* step: ``x + step_size·sign(∇)`` (Linf) or ``x + step_size·∇/‖∇‖₂`` (L2), then projection onto the ε-ball ∩ box
  (rat's projection is the exact one; robustness renormalizes then clips, which is feasible but not nearest);
* ``random_start``: Linf uniform in [-ε, ε]; L2 a random direction scaled to ‖δ‖₂ = ε; clipped to the box;
* ``use_best``: return the highest-loss iterate, the last one included (costs one extra forward pass);
* ``random_restarts = R > 0``: R runs from random starts; a sample takes the result of a later run whenever that
  run misclassifies it.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .base import LpAttack
from .norms import lp_norm, point_projector, random_in_ball, select
from .registry import register_attack

_logger = logging.getLogger(__name__)


@register_attack("pgd")
class PGDAttack(LpAttack):
    """Projected gradient ascent on the loss in an Linf or L2 ball (see the module docstring).

    Args:
        model: classifier taking [0, 1] inputs; DDP / DataParallel wrappers are removed.
        norm: ``'Linf'`` or ``'L2'`` (robustness ``constraint`` 'inf' / '2').
        eps: radius; ``None`` → ImageNet default of the norm.
        n_iter: steps (robustness ``attack_steps``).
        step_size: step length (robustness ``attack_lr``); ``None`` → 2.5·ε/n_iter (Madry et al.). Scaled together
            with ε by :meth:`set_eps_scale`.
        random_start: start from a random point of the ball.
        random_restarts: number of random-start runs (0 = a single run; > 0 implies random starts).
        use_best: return the highest-loss iterate instead of the last one.
        seed: seed of the private generator.
        loss: ``'ce'`` or ``'dlr'``.
    """

    supported_norms = ("Linf", "L2")
    default_n_iter = 10

    def __init__(self, model: nn.Module, *, norm: str = "Linf", eps: float | None = None, n_iter: int | None = None,
                 step_size: float | None = None, random_start: bool = False, random_restarts: int = 0,
                 use_best: bool = True, seed: int = 0, loss: str = "ce") -> None:
        super().__init__(model, norm=norm, eps=eps, n_iter=n_iter, seed=seed, loss=loss)
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        if not isinstance(random_restarts, int) or random_restarts < 0:
            raise ValueError(f"random_restarts must be an int >= 0, got {random_restarts!r}")
        self.step_size = None if step_size is None else float(step_size)
        self.random_start = bool(random_start)
        self.random_restarts = random_restarts
        self.use_best = bool(use_best)

    @property
    def current_step_size(self) -> float:
        """Step length in use (scaled with ε during a warm-up)."""
        if self.step_size is None:
            return 2.5 * self.current_eps / max(self.n_iter, 1)
        return self.step_size * self.eps_scale

    def __repr__(self) -> str:
        return (f"PGDAttack(norm={self.norm!r}, eps={self.eps:.6g}, n_iter={self.n_iter}, "
                f"step_size={self.current_step_size:.6g}, random_start={self.random_start}, "
                f"random_restarts={self.random_restarts}, use_best={self.use_best}, seed={self.seed})")

    def _attack(self, x: Tensor, y: Tensor, generator_seed: int) -> Tensor:
        runs = max(1, self.random_restarts)
        randomized = self.random_start or self.random_restarts > 0
        generator = self._generator(x.device, generator_seed) if randomized else None
        result = None
        for _ in range(runs):
            start = self._random_start(x, generator) if randomized else x
            x_adv, misclassified = self._single_run(x, y, start, need_misclassified=runs > 1)
            if result is None:
                result = x_adv
            else:
                result = select(misclassified, x_adv, result)
        return result

    def _random_start(self, x: Tensor, generator: torch.Generator) -> Tensor:
        kind = "uniform" if self.norm == "Linf" else "surface"
        return random_in_ball(x, self.norm, self.current_eps, generator, kind=kind)

    def _single_run(self, x: Tensor, y: Tensor, start: Tensor,
                    need_misclassified: bool) -> tuple[Tensor, Tensor | None]:
        eps, step_size = self.current_eps, self.current_step_size
        project = point_projector(x, self.norm, eps)
        x_adv = start
        best_x = best_loss = best_wrong = None
        bshape = (-1,) + (1,) * (x.dim() - 1)
        for _ in range(self.n_iter):
            loss, logits, grad = self._loss_and_grad(x_adv, y)
            if self.use_best:
                wrong = self._misclassified(logits, y)
                if best_x is None:
                    best_x, best_loss, best_wrong = x_adv, loss, wrong
                else:
                    better = loss > best_loss
                    best_x = select(better, x_adv, best_x)
                    best_loss = torch.where(better, loss, best_loss)
                    best_wrong = torch.where(better, wrong, best_wrong)
            direction = grad.sign_() if self.norm == "Linf" else grad.div_(lp_norm(grad, "L2").view(bshape).add_(1e-12))
            x_adv = project(torch.add(x_adv, direction, alpha=step_size))
        if not (self.use_best or need_misclassified):
            return x_adv, None
        loss, logits, _ = self._loss_and_grad(x_adv, y, need_grad=False)
        wrong = self._misclassified(logits, y)
        if not self.use_best or best_x is None:
            return x_adv, wrong
        better = loss > best_loss
        return select(better, x_adv, best_x), torch.where(better, wrong, best_wrong)
