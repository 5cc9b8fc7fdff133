"""What the trainer needs around an attack: the ε warm-up schedule and the (mixed) adversarial loss."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .base import Attack, NoAttack

_logger = logging.getLogger(__name__)


def eps_warmup_factor(epoch: float, warmup_epochs: float) -> float:
    """Linear ε warm-up: ``min(1, epoch / warmup_epochs)`` (1 when ``warmup_epochs`` is 0).

    Args:
        epoch: fractional epoch, e.g. ``epoch + step / steps_per_epoch``.
        warmup_epochs: length of the ramp from 0 to the full ε.
    """
    if warmup_epochs < 0 or epoch < 0:
        raise ValueError(f"epoch ({epoch}) and warmup_epochs ({warmup_epochs}) must be >= 0")
    if warmup_epochs == 0:
        return 1.0
    return min(1.0, float(epoch) / float(warmup_epochs))


class AdversarialLoss(NamedTuple):
    """Result of :func:`adversarial_loss`.

    Attributes:
        loss: the scalar to backpropagate.
        output: logits on the adversarial inputs (on the clean inputs for :class:`NoAttack`).
        x_adv: the adversarial inputs.
        clean_output: logits on the clean inputs when ``clean_weight > 0``, else ``None``.
    """

    loss: Tensor
    output: Tensor
    x_adv: Tensor
    clean_output: Tensor | None


def adversarial_loss(model: nn.Module, attack: Attack, criterion: Callable[[Tensor, Tensor], Tensor], x: Tensor,
                     y: Tensor, *, clean_weight: float = 0.0) -> AdversarialLoss:
    """Attack the batch and compute the training loss ``(1 − w)·L(f(x_adv), y) + w·L(f(x), y)``.

    The attack runs on the unwrapped module in eval mode (and restores the mode); the loss forward then runs
    ``model`` — the training model as the trainer holds it (DDP-wrapped, compiled, …) — in its current mode, so
    the gradient all-reduce happens once, in the trainer's ``backward``. With ``clean_weight > 0`` (seed 000's
    ``--mixed-loss``: ``clean_weight=0.5``) clean and adversarial inputs go through **one** forward pass of the
    concatenated batch; note that BatchNorm then normalizes them together.

    Args:
        model: the training model (possibly DDP-wrapped).
        attack: the attack (built on the same model).
        criterion: loss taking (logits, targets) and returning a scalar, e.g. timm ``SoftTargetCrossEntropy``.
        x: clean inputs in [0, 1].
        y: labels (N,) or soft targets (N, C), as the criterion expects.
        clean_weight: weight w ∈ [0, 1] of the clean loss (0 = pure adversarial training).
    """
    if not 0.0 <= clean_weight <= 1.0:
        raise ValueError(f"clean_weight must lie in [0, 1], got {clean_weight}")
    if isinstance(attack, NoAttack):
        output = model(x)
        return AdversarialLoss(criterion(output, y), output, x, output if clean_weight > 0 else None)
    x_adv = attack.perturb(x, y)
    if clean_weight == 0.0:
        output = model(x_adv)
        return AdversarialLoss(criterion(output, y), output, x_adv, None)
    both = model(torch.cat([x_adv, x.to(x_adv.dtype)]))
    output, clean_output = both.split(x.shape[0])
    loss = (1.0 - clean_weight) * criterion(output, y) + clean_weight * criterion(clean_output, y)
    return AdversarialLoss(loss, output, x_adv, clean_output)
