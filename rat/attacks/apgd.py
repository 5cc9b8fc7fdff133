"""APGD (Croce & Hein, ICML 2020) in the training variant used by "Revisiting Adversarial Training for ImageNet".

Linf / L2 (APGD, Croce & Hein 2020, Alg. 1):
    step size η = 2ε, first step plain, later steps with momentum α = 0.75:
    ``z = P(x_k + η·d(∇)); x_{k+1} = P(x_k + α(z − x_k) + (1 − α)(x_k − x_{k−1}))`` with ``d = sign`` (Linf) or
    ``∇/‖∇‖₂`` (L2). ``P`` is, as in the paper's ``apgd_train`` and AutoAttack, a clip for Linf and for L2 the
    rescaling onto the ε-ball followed by a clip to [0, 1] (``projection='paper'``, the default);
    ``projection='exact'`` uses the exact Euclidean projection onto the ε-ball ∩ box (:mod:`rat.attacks.norms`),
    which is the nearest feasible point and gives a slightly stronger attack.
    Checkpoints: the first after ``max(⌊0.22 N⌋, 1)`` iterations, then every ``max(w − ⌊0.03 N⌋, ⌊0.06 N⌋)``
    (each term at least 1). At a checkpoint a sample's step size is halved and its iterate restarted from its best
    point when (1) the loss increased in at most ρ = 0.75 of the steps since the last checkpoint, or (2) its step size
    was not halved at the last checkpoint and its best loss has not improved since. The first step's loss is compared
    with 0, not with the loss at the starting point, exactly as ``apgd_train`` and AutoAttack do (their oscillation
    check reads the not yet written, zero-initialised ``loss_steps[-1]``): for cross-entropy the first step always
    counts as an increase. ``first_step_vs_start=True`` compares it with the starting loss instead.
L1 (l1-APGD, Croce & Hein, ICML 2021):
    step size η = ε; the step moves along the signs of the ``topk`` fraction of largest gradient entries
    (``η·sign(∇_S)/|S|``), followed by the exact projection onto the L1 ball ∩ box. No momentum. Every
    ``max(⌊0.04 N⌋, 1)`` iterations the sparsity ``topk`` is set to ``‖x_best − x‖₀ / (1.5 n)``; samples whose
    sparsity dropped below 95 % of its last value get η = ε and restart from their best point, the others get η/1.5
    (η ∈ [ε/10, ε]). The initial ``topk`` is 0.05 for training (E-AT) and 0.2 in the AutoAttack evaluation version.

Training variant (E-AT / Revisiting-AT ``apgd_train``): no random start by default, N steps cost N input-gradient
evaluations plus one forward pass (the loss at the last iterate is needed to pick the best point, its gradient is
not), and the best-loss iterate is returned. Everything per sample is tensor arithmetic (masks, no indexing): the
iteration loop has no host synchronization.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .base import LpAttack, attack_mode
from .norms import lp_norm, point_projector, random_in_ball, select
from .registry import register_attack

_logger = logging.getLogger(__name__)

PROJECTIONS = ("paper", "exact")


class APGDResult(NamedTuple):
    """Everything one APGD run finds.

    Attributes:
        x_best: the highest-loss iterate of every sample (what ``perturb`` returns; used for training).
        loss_best: its loss (N,).
        fooled: whether some iterate was misclassified (N,) — the robust-accuracy criterion of AutoAttack.
        x_fooled: a misclassified iterate where ``fooled``, else ``x_best`` (what AutoAttack's APGD returns).
    """

    x_best: Tensor
    loss_best: Tensor
    fooled: Tensor
    x_fooled: Tensor


def _bview(t: Tensor, like: Tensor) -> Tensor:
    return t.view((like.shape[0],) + (1,) * (like.dim() - 1))


def _paper_l2_projector(x: Tensor, eps: float):
    """The L2 projection of ``apgd_train`` / AutoAttack: ``clip(x + δ·min(ε, ‖δ‖) / (‖δ‖ + 1e-12), 0, 1)``.

    Feasible for the box, and inside the ball unless the clip moves the point out of it (it never does: clipping
    toward ``x`` ∈ [0, 1] only shortens δ); not the nearest point of the ball ∩ box.
    """
    def project(z: Tensor) -> Tensor:
        delta = z - x
        length = _bview(lp_norm(delta, "L2"), x)
        return (x + delta / (length + 1e-12) * length.clamp(max=eps)).clamp_(0.0, 1.0)

    return project


@register_attack("apgd")
class APGDAttack(LpAttack):
    """APGD with cross-entropy (or DLR) loss, Linf / L2 / L1, hard or soft targets; see the module docstring.

    Args:
        model: classifier taking [0, 1] inputs; DDP / DataParallel wrappers are removed.
        norm: ``'Linf'``, ``'L2'`` or ``'L1'``.
        eps: radius; ``None`` → ImageNet default of the norm (4/255, 2.0, 75).
        n_iter: number of steps (the paper trains with 2).
        n_restarts: independent runs; the highest loss per sample wins. Runs after the first use a random start.
        seed: seed of the private generator (random starts only).
        loss: ``'ce'`` or ``'dlr'``.
        random_start: start from a random point of the ball (AutoAttack) instead of ``x`` (training variant).
        momentum: α of the Linf/L2 update (0.75 in APGD; 1.0 disables momentum).
        rho: oscillation threshold ρ of the checkpoint rule.
        topk_init: initial sparsity of the L1 step (0.05 training, 0.2 AutoAttack).
        step_size: initial step size η₀; ``None`` → 2ε (Linf, L2) or ε (L1). Scaled together with ε by
            :meth:`set_eps_scale`.
        projection: L2 projection, ``'paper'`` (onto the ball, then clip to [0, 1], as ``apgd_train`` and AutoAttack)
            or ``'exact'`` (the nearest point of the ball ∩ box). Linf is a clip and L1 the exact projection (as in
            the reference) either way.
        first_step_vs_start: count the first step as an increase if its loss beats the loss at the starting point.
            Default False: compare it with 0, as ``apgd_train`` and AutoAttack do.
        use_best: ``perturb`` returns the highest-loss iterate (APGD; costs one forward pass to score the last
            iterate). ``False`` returns the last iterate instead, so N steps cost exactly N forward + input-backward
            passes. :meth:`run` always scores every iterate.

    Example:
        >>> attack = APGDAttack(model, norm="Linf", eps=4 / 255, n_iter=2)
        >>> x_adv = attack.perturb(x, y)
    """

    default_n_iter = 2

    def __init__(self, model: nn.Module, *, norm: str = "Linf", eps: float | None = None, n_iter: int | None = None,
                 n_restarts: int = 1, seed: int = 0, loss: str = "ce", random_start: bool = False,
                 momentum: float = 0.75, rho: float = 0.75, topk_init: float = 0.05,
                 step_size: float | None = None, use_best: bool = True, projection: str = "paper",
                 first_step_vs_start: bool = False) -> None:
        super().__init__(model, norm=norm, eps=eps, n_iter=n_iter, seed=seed, loss=loss)
        if not isinstance(n_restarts, int) or n_restarts < 1:
            raise ValueError(f"n_restarts must be an int >= 1, got {n_restarts!r}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must lie in (0, 1], got {momentum}")
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"rho must lie in (0, 1], got {rho}")
        if not 0.0 < topk_init <= 1.0:
            raise ValueError(f"topk_init must lie in (0, 1], got {topk_init}")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        if n_restarts > 1 and not use_best:
            raise ValueError("n_restarts > 1 keeps the best restart by loss, which needs use_best=True")
        self.use_best = bool(use_best)
        self.n_restarts = n_restarts
        self.step_size = None if step_size is None else float(step_size)
        self.random_start = bool(random_start)
        self.momentum = float(momentum)
        self.rho = float(rho)
        self.topk_init = float(topk_init)
        self.projection = projection
        self.first_step_vs_start = bool(first_step_vs_start)

    @property
    def current_step_size(self) -> float:
        """Initial step size η₀ in use (scaled with ε during a warm-up)."""
        if self.step_size is None:
            return (1.0 if self.norm == "L1" else 2.0) * self.current_eps
        return self.step_size * self.eps_scale

    def __repr__(self) -> str:
        return (f"APGDAttack(norm={self.norm!r}, eps={self.eps:.6g}, n_iter={self.n_iter}, "
                f"n_restarts={self.n_restarts}, random_start={self.random_start}, use_best={self.use_best}, "
                f"seed={self.seed}, loss={self.loss!r})")

    def run(self, x: Tensor, y: Tensor) -> APGDResult:
        """Like :meth:`perturb`, but return the full :class:`APGDResult` (best-loss and misclassified iterates)."""
        x, y = self._check_inputs(x, y)
        generator_seed = self._next_seed()
        with attack_mode(self.model):
            return self._run(x, y, generator_seed)

    def _attack(self, x: Tensor, y: Tensor, generator_seed: int) -> Tensor:
        return self._run(x, y, generator_seed, track_fooled=False, score_last=self.use_best).x_best

    def _run(self, x: Tensor, y: Tensor, generator_seed: int, track_fooled: bool = True,
             score_last: bool = True) -> APGDResult:
        eps = self.current_eps
        generator = None
        result = None
        for restart in range(self.n_restarts):
            if self.random_start or restart > 0:
                generator = generator or self._generator(x.device, generator_seed)
                start = random_in_ball(x, self.norm, eps, generator)
            else:
                start = x
            current = self._single_run(x, y, start, eps, track_fooled, score_last)
            if result is None:
                result = current
                continue
            better = current.loss_best > result.loss_best
            newly_fooled = current.fooled & ~result.fooled
            result = APGDResult(
                x_best=select(better, current.x_best, result.x_best),
                loss_best=torch.where(better, current.loss_best, result.loss_best),
                fooled=result.fooled | current.fooled,
                x_fooled=select(newly_fooled, current.x_fooled, result.x_fooled),
            )
        return result

    def _direction_(self, grad: Tensor) -> Tensor:
        """The step direction, computed in place: sign(∇) (Linf), ∇/‖∇‖₂ (L2); L1 keeps ∇ (its step needs |∇|)."""
        if self.norm == "Linf":
            return grad.sign_()
        if self.norm == "L2":
            return grad.div_(_bview(lp_norm(grad, "L2"), grad).add_(1e-12))
        return grad

    def _l1_direction(self, grad: Tensor, topk: Tensor) -> Tensor:
        """sign(∇) on the ``topk`` fraction of largest |∇| entries, scaled to unit L1 norm."""
        magnitude = grad.abs()
        n_features = magnitude[0].numel()
        ranked = magnitude.reshape(magnitude.shape[0], -1).sort(dim=1).values
        index = ((1.0 - topk) * n_features).clamp(0, n_features - 1).long()
        threshold = ranked.gather(1, index[:, None]).squeeze(1)
        sparse = torch.where(magnitude >= _bview(threshold, grad), grad.sign(), 0.0)
        return sparse / (_bview(lp_norm(sparse, "L1"), grad) + 1e-10)

    def _single_run(self, x: Tensor, y: Tensor, start: Tensor, eps: float, track_fooled: bool,
                    score_last: bool = True) -> APGDResult:
        # Buffers: x_best, direction_best (and x_fooled) are owned and updated in place with exact per-sample
        # selections (Tensor.lerp_ with 0/1 weights); each step allocates one new iterate. On CPU a fresh allocation
        # costs more than the arithmetic, so this keeps the attack's own work a small fraction of the model's.
        norm, n_iter = self.norm, self.n_iter
        batch = x.shape[0]
        n_features = x[0].numel()
        project = _paper_l2_projector(x, eps) if norm == "L2" and self.projection == "paper" \
            else point_projector(x, norm, eps)
        eta = self.current_step_size
        step = torch.full((batch,) + (1,) * (x.dim() - 1), eta, device=x.device)
        m = self.momentum

        def weight(mask: Tensor) -> Tensor:
            return _bview(mask.to(x.dtype), x)

        x_adv = start
        loss, logits, grad = self._loss_and_grad(x_adv, y, need_grad=n_iter > 0)
        direction = self._direction_(grad) if grad is not None else None
        fooled = self._misclassified(logits, y)
        x_fooled = x_adv.clone() if track_fooled else None
        x_best, loss_best = x_adv.clone(), loss
        direction_best = direction.clone() if n_iter > 1 else None
        x_prev = x_adv

        # Linf / L2 checkpoint state.
        window = max(int(0.22 * n_iter), 1)
        min_window = max(int(0.06 * n_iter), 1)
        window_decrease = max(int(0.03 * n_iter), 1)
        increases = torch.zeros(batch, device=x.device)
        loss_prev = loss if self.first_step_vs_start else torch.zeros_like(loss)
        loss_best_at_check = loss_best
        reduced_at_check = torch.ones(batch, dtype=torch.bool, device=x.device)
        # L1 state.
        l1_window = max(int(0.04 * n_iter), 1)
        topk = torch.full((batch,), self.topk_init, device=x.device)
        sparsity_prev = torch.full((batch,), float(n_features), device=x.device)
        since_check = 0

        for i in range(n_iter):
            if norm == "L1":
                x_next = project(torch.addcmul(x_adv, step, self._l1_direction(direction, topk)))
            else:
                x_next = project(torch.addcmul(x_adv, step, direction))
                if i > 0 and m < 1.0:
                    # x + m(z - x) + (1 - m)(x - x_prev) = m·z + 2(1 - m)·x - (1 - m)·x_prev, in place on z
                    x_next = project(x_next.mul_(m).add_(x_adv, alpha=2.0 * (1.0 - m)).sub_(x_prev, alpha=1.0 - m))
            x_prev, x_adv = x_adv, x_next

            last = i == n_iter - 1
            if last and not score_last:
                # use_best=False: return the final iterate without paying a forward pass to score it.
                return APGDResult(x_best=x_adv, loss_best=torch.full_like(loss_best, float("nan")), fooled=fooled,
                                  x_fooled=x_adv)
            loss, logits, grad = self._loss_and_grad(x_adv, y, need_grad=not last)
            misclassified = self._misclassified(logits, y)
            if track_fooled:
                x_fooled.lerp_(x_adv, weight(misclassified))
            fooled = fooled | misclassified
            improved = loss > loss_best
            x_best.lerp_(x_adv, weight(improved))
            loss_best = torch.where(improved, loss, loss_best)
            if last:
                break
            direction = self._direction_(grad)
            direction_best.lerp_(direction, weight(improved))

            since_check += 1
            if norm == "L1":
                if since_check < l1_window:
                    continue
                sparsity = lp_norm(x_best - x, "L0").float()
                restart = sparsity / sparsity_prev < 0.95
                topk = sparsity / n_features / 1.5
                step = torch.where(_bview(restart, x), eta, step / 1.5).clamp(eta / 10, eta)
                sparsity_prev = sparsity
            else:
                increases = increases + (loss > loss_prev).float()
                loss_prev = loss
                if since_check < window:
                    continue
                oscillating = increases <= self.rho * window
                stalled = ~reduced_at_check & (loss_best_at_check >= loss_best)
                restart = oscillating | stalled
                reduced_at_check = restart
                loss_best_at_check = loss_best
                step = torch.where(_bview(restart, x), step / 2.0, step)
                increases = torch.zeros_like(increases)
                window = max(window - window_decrease, min_window)
            # x_adv is this step's own iterate (never the caller's x), so it can be overwritten in place.
            x_adv.lerp_(x_best, weight(restart))
            direction.lerp_(direction_best, weight(restart))
            since_check = 0

        if track_fooled:
            x_fooled.lerp_(x_best, weight(~fooled))
        else:
            x_fooled = x_best
        return APGDResult(x_best=x_best, loss_best=loss_best, fooled=fooled, x_fooled=x_fooled)
