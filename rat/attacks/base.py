"""The attack contract, shared by every attack in rat.

Every attack is an object with ``perturb(x, y) -> x_adv``. The contract, tested in ``tests/test_attacks.py``:

* Input: ``x`` NCHW (contiguous or channels_last), floating, values in [0, 1] — normalization belongs inside the
  model (the range is checked on every call for CPU tensors, on the first call for GPU tensors, where a check per
  step would force a host synchronization). ``y``: int64 class indices of shape (N,) or soft targets of shape
  (N, C) (mixup / cutmix / label smoothing).
* Output: float32, same shape and memory layout as ``x``, inside the ε-ball of ``x`` and inside [0, 1]. The
  perturbation is computed and kept in float32, also when the model runs under ``torch.autocast`` (bf16 or fp16):
  the forward pass follows the caller's autocast state, the loss is computed from float32 logits.
* The model is attacked in eval mode; the train/eval flag of *every* submodule is restored afterwards.
* Only input gradients are taken (``torch.autograd.grad(loss, x_adv)``): no ``.backward()``, no ``zero_grad()``,
  parameter ``.grad`` fields are never touched.
* DDP / DataParallel wrappers are removed at construction: the attack runs on the underlying module, so no gradient
  all-reduce happens during the attack.
* Randomness comes from a private ``torch.Generator`` seeded from ``(seed, call index)``; the global RNG state is
  never consumed, and ``state_dict()`` / ``load_state_dict()`` carry the call index so that a resumed run draws the
  same random starts. Two attacks built with the same arguments produce identical outputs for identical inputs.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .norms import NORMS, canonical_norm

_logger = logging.getLogger(__name__)

DEFAULT_EPS: dict[str, float] = {"Linf": 4 / 255, "L2": 2.0, "L1": 75.0}
"""ImageNet defaults per norm (pixel units, images in [0, 1] at 224 px). Croce & Hein's E-AT code trains ImageNet
L1 models with ε = 255; rat defaults to 75 — pass ``eps=255`` to reproduce E-AT."""

# An ε whose mean change per pixel value (Linf: ε; L2: ε/√d; L1: ε/d, for d = 3·r² values) exceeds this is warned
# about: the largest radius in common use is Linf 16/255, and a radius given in 0-255 units is 255 times too large.
IMPLAUSIBLE_EPS_SCALE = 32 / 255


def check_eps(norm: str, eps: float, resolution: int) -> str | None:
    """Check a radius (in [0, 1] pixel units) against the image box at ``resolution`` px (3 channels).

    Returns None for a plausible radius, and a warning when the mean change it allows per pixel value is above
    :data:`IMPLAUSIBLE_EPS_SCALE`.

    Raises:
        ValueError: the radius reaches the diameter of the box [0, 1]^d (Linf 1, L2 √d, L1 d): every image lies within
            it, so the attack can turn any image into any other; typically ε given in 0-255 units.
    """
    values = 3 * resolution * resolution
    diameter = {"Linf": 1.0, "L2": math.sqrt(values), "L1": float(values)}[norm]
    scale = eps / diameter
    in_255 = f"{norm} radii are in [0,1] pixel units (4/255 = 0.0157, not 4)" if norm == "Linf" else \
        f"{norm} radii are in [0,1] pixel units (e.g. {DEFAULT_EPS[norm]:g}; a radius in 0-255 units is 255x too large)"
    if scale >= 1:
        raise ValueError(f"{norm} eps {eps:g} covers the whole image box at {resolution} px (every image is within "
                         f"{diameter:.4g} of every other), so the attack can replace the image: {in_255}")
    if scale > IMPLAUSIBLE_EPS_SCALE:
        return (f"{norm} eps {eps:g} at {resolution} px allows a mean change of {scale * 255:.0f}/255 per pixel value, "
                f"more than any usual threat model: {in_255}")
    return None


LOSSES: tuple[str, ...] = ("ce", "dlr")

_SEED_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio) that spreads (seed, call) pairs apart


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel wrappers, so attacking never triggers a gradient all-reduce."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


@contextmanager
def attack_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and enable autograd; restore every submodule's train/eval flag on exit."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        if all(flag == flags[0][1] for _, flag in flags):
            model.train(flags[0][1])
        else:
            # Pre-order: a parent's train() resets its children, which are restored right after it.
            for module, flag in flags:
                module.train(flag)


def margin_labels(y: Tensor) -> Tensor:
    """Hard labels of ``y``: itself for int labels, the argmax for soft targets."""
    return y if y.dim() == 1 else y.argmax(dim=1)


def per_sample_loss(logits: Tensor, y: Tensor, loss: str) -> Tensor:
    """Per-sample loss (N,) in float32 for hard (N,) or soft (N, C) targets.

    Args:
        logits: model output (N, C), any float dtype (cast to float32 here).
        y: int64 labels (N,) or soft targets (N, C) summing to 1.
        loss: ``'ce'`` (cross-entropy; with soft targets -Σ y log softmax) or ``'dlr'`` (Croce & Hein's
            difference-of-logits-ratio loss, on the argmax of soft targets; needs ≥ 3 classes).
    """
    logits = logits.float()
    if loss == "ce":
        if y.dim() == 1:
            return F.cross_entropy(logits, y, reduction="none")
        return -(y.float() * F.log_softmax(logits, dim=1)).sum(dim=1)
    if loss == "dlr":
        if logits.shape[1] < 3:
            raise ValueError(f"the DLR loss needs at least 3 classes, the model outputs {logits.shape[1]}: "
                             "use loss='ce'")
        labels = margin_labels(y)
        top = logits.topk(3, dim=1).values
        true = logits.gather(1, labels[:, None]).squeeze(1)
        other = torch.where(top[:, 0] == true, top[:, 1], top[:, 0])
        return -(true - other) / (top[:, 0] - top[:, 2] + 1e-12)
    raise ValueError(f"unknown loss {loss!r}: use one of {', '.join(LOSSES)}")


class Attack:
    """Interface of every attack: ``perturb(x, y) -> x_adv`` plus state for checkpoints and the ε warm-up.

    Attributes:
        model: the attacked (unwrapped) module.
    """

    name: ClassVar[str] = ""

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"an attack needs a torch.nn.Module, got {type(model).__name__}")
        self.model = unwrap_model(model)

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        """Return adversarial inputs for ``(x, y)``; see the module docstring for the contract."""
        raise NotImplementedError

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return self.perturb(x, y)

    def set_eps_scale(self, scale: float) -> None:
        """Multiply the radius (and step sizes) by ``scale`` ∈ [0, 1] — the ε warm-up hook. No-op by default."""

    def state_dict(self) -> dict[str, Any]:
        """State to store in a checkpoint so that a resumed run draws the same random numbers."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class NoAttack(Attack):
    """Clean training: ``perturb`` returns ``x`` unchanged (no forward pass, no mode switch)."""

    name = "none"

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        """Return ``x`` itself (detached)."""
        return x.detach()

    def __repr__(self) -> str:
        return "NoAttack()"


class LpAttack(Attack):
    """Base of the gradient attacks in an Lp ball: argument checks, mode handling, seeding, loss and input gradient.

    Args:
        model: classifier taking [0, 1] inputs; DDP / DataParallel wrappers are removed.
        norm: threat model, ``'Linf'``, ``'L2'`` or ``'L1'`` (also ``'inf'``, ``'2'``, ``'1'``).
        eps: radius in pixel units (images in [0, 1]); ``None`` takes :data:`DEFAULT_EPS` of the norm.
        n_iter: number of attack steps (input-gradient evaluations); ``None`` takes the attack's default.
        seed: seed of the private generator (use ``base_seed + rank`` under DDP).
        loss: ``'ce'`` or ``'dlr'``.
    """

    supported_norms: ClassVar[tuple[str, ...]] = NORMS
    default_n_iter: ClassVar[int] = 2

    def __init__(self, model: nn.Module, *, norm: str = "Linf", eps: float | None = None, n_iter: int | None = None,
                 seed: int = 0, loss: str = "ce") -> None:
        super().__init__(model)
        self.norm = canonical_norm(norm)
        if self.norm not in self.supported_norms:
            raise ValueError(f"{type(self).__name__} supports norms {', '.join(self.supported_norms)}, "
                             f"not {self.norm!r}: use attack 'apgd' for {self.norm}")
        self.eps = DEFAULT_EPS[self.norm] if eps is None else float(eps)
        if not (self.eps >= 0.0 and self.eps < float("inf")):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        self.n_iter = self.default_n_iter if n_iter is None else n_iter
        if not isinstance(self.n_iter, int) or isinstance(self.n_iter, bool) or self.n_iter < 0:
            raise ValueError(f"n_iter must be an int >= 0, got {n_iter!r}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}: use one of {', '.join(LOSSES)}")
        self.loss = loss
        self.seed = int(seed)
        self.eps_scale = 1.0
        self._calls = 0
        self._range_checked = False

    # --- public state -------------------------------------------------------------------------------------------

    @property
    def current_eps(self) -> float:
        """The radius in use: ``eps × eps_scale``."""
        return self.eps * self.eps_scale

    def set_eps_scale(self, scale: float) -> None:
        """Scale ε (and the step sizes, which are tied to ε) by ``scale`` ∈ [0, 1], e.g. for an ε warm-up."""
        scale = float(scale)
        if not 0.0 <= scale <= 1.0:
            raise ValueError(f"eps scale must lie in [0, 1], got {scale}")
        self.eps_scale = scale

    def state_dict(self) -> dict[str, Any]:
        """``{'calls': n}``: the number of ``perturb`` calls so far, which (with ``seed``) fixes the next RNG draw."""
        return {"calls": self._calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the call counter saved by :meth:`state_dict`."""
        self._calls = int(state["calls"])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(norm={self.norm!r}, eps={self.eps:.6g}, n_iter={self.n_iter}, "
                f"seed={self.seed}, loss={self.loss!r})")

    # --- the call --------------------------------------------------------------------------------------------------

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        """Adversarial inputs for ``(x, y)``.

        Args:
            x: images (N, C, H, W) in [0, 1], contiguous or channels_last.
            y: int64 labels (N,) or soft targets (N, C).

        Returns:
            float32 ``x_adv`` of the same shape and layout, with ``‖x_adv - x‖ ≤ ε`` and ``0 ≤ x_adv ≤ 1``.
        """
        x, y = self._check_inputs(x, y)
        generator_seed = self._next_seed()
        if self.current_eps == 0.0 or self.n_iter == 0:
            return x.clone()
        with attack_mode(self.model):
            x_adv = self._attack(x, y, generator_seed)
        return x_adv.detach()

    def _attack(self, x: Tensor, y: Tensor, generator_seed: int) -> Tensor:
        raise NotImplementedError

    # --- helpers for subclasses ----------------------------------------------------------------------------------

    def _next_seed(self) -> int:
        seed = (self.seed * _SEED_MIX + self._calls) % (1 << 63)
        self._calls += 1
        return seed

    @staticmethod
    def _generator(device: torch.device, seed: int) -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        return generator

    def _check_inputs(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(f"perturb(x, y) takes tensors, got {type(x).__name__} and {type(y).__name__}")
        if torch.is_inference_mode_enabled():
            raise RuntimeError("attacks need autograd and cannot run under torch.inference_mode(): "
                               "use torch.no_grad() (or nothing) around the evaluation loop instead")
        if x.dim() < 2 or not x.is_floating_point():
            raise ValueError(f"x must be a floating-point batch (N, C, H, W), got shape {tuple(x.shape)} "
                             f"and dtype {x.dtype}")
        if y.shape[0] != x.shape[0] or y.dim() not in (1, 2):
            raise ValueError(f"y must be labels (N,) or soft targets (N, C) with N = {x.shape[0]}, "
                             f"got shape {tuple(y.shape)}")
        if y.dim() == 1 and y.dtype != torch.int64:
            raise ValueError(f"hard labels must be int64, got {y.dtype}: pass y.long()")
        x = x.detach().float()
        # The range check needs the values on the host: every call on CPU, only the first call on an accelerator,
        # where a check per training step would force a host synchronization.
        if x.device.type == "cpu" or not self._range_checked:
            low, high = torch.aminmax(x)
            if not bool((low >= 0.0) & (high <= 1.0)):
                raise ValueError("attack inputs must lie in [0, 1] (pixel scale); normalization belongs inside the "
                                 "model (rat.models.create_model(..., normalize=True))")
            self._range_checked = True
        return x, y.detach()

    def _loss_and_grad(self, x_adv: Tensor, y: Tensor, need_grad: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-sample loss (N,), detached logits, and the input gradient of the summed loss (or None).

        The gradient is a fresh tensor with the layout of ``x_adv``, which the caller may modify in place.
        """
        if not need_grad:
            with torch.no_grad():
                logits = self.model(x_adv)
                return per_sample_loss(logits, y, self.loss), logits.detach(), None
        x_in = x_adv.detach().requires_grad_(True)
        logits = self.model(x_in)
        loss = per_sample_loss(logits, y, self.loss)
        (grad,) = torch.autograd.grad(loss.sum(), [x_in])
        if grad.stride() != x_in.stride():
            # e.g. an expanded gradient (stride 0) from a pooling-first model; the attacks update it in place.
            grad = torch.empty_like(x_in).copy_(grad)
        if logits.dtype == torch.float16:
            # fp16 backward can overflow; a non-finite entry would turn the iterate into NaN, so treat it as flat.
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        return loss.detach(), logits.detach(), grad

    @staticmethod
    def _misclassified(logits: Tensor, y: Tensor) -> Tensor:
        return logits.argmax(dim=1) != margin_labels(y)


def as_list(value: Any, n: int, what: str) -> list[Any]:
    """Broadcast a scalar (or None) to ``n`` copies; check the length of a sequence."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        values = list(value)
        if len(values) != n:
            raise ValueError(f"got {len(values)} values of {what} for {n} norms: give one per norm")
        return values
    return [value] * n
