"""Optimizer with weight-decay-free parameter groups, and the per-iteration learning-rate schedules."""
from __future__ import annotations

import math

import torch
from timm.optim import param_groups_weight_decay
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups, always in this order: weights with decay; norms, biases and what the model's ``no_weight_decay()``
    names (ViTs: position embedding, class token) without.

    Membership is timm's ``param_groups_weight_decay`` (rat's models are timm models, so their own
    ``no_weight_decay()`` names their parameters). The groups are rebuilt from it because timm lists them the other
    way round and leaves out empty ones (with ``weight_decay=0`` it returns a single group), while a resumed run's
    optimizer state must match the decay-first pair that rat's checkpoints hold.
    """
    skip = model.no_weight_decay() if callable(getattr(model, "no_weight_decay", None)) else ()
    exempt = {id(p) for group in param_groups_weight_decay(model, 1.0, no_weight_decay_list=skip)  # any decay > 0
              if group["weight_decay"] == 0.0 for p in group["params"]}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) not in exempt], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, *,
                    betas: tuple[float, float] = (0.9, 0.95), momentum: float = 0.9,
                    nesterov: bool = False, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW (betas as given) or SGD (momentum, optional Nesterov), both with the two parameter groups above.

    ``fused``: AdamW's fused kernels (one launch for all parameters: ``torch.optim.AdamW(fused=True)``) instead of
    torch's default multi-tensor (foreach) ones; the same update up to rounding."""
    groups = param_groups(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True if fused else None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    raise ValueError(f"unknown optimizer {name!r}: use 'adamw' or 'sgd'")


def lr_at(step: int, steps_per_epoch: int, *, epochs: int, lr: float, schedule: str, warmup_epochs: float,
          min_lr: float = 5e-6, step_ratio: float = 0.1, step_length: int = 30) -> float:
    """Learning rate for global iteration ``step`` (0-based).

    Warm-up: linear from 0 to ``lr`` at ``warmup_epochs`` (the paper's ``lr_peak_epoch``). Then

    * ``cosine``: half cosine from ``lr`` down to ``min_lr`` at the end of training (the paper: 5e-6);
    * ``step``: ``lr * step_ratio ** (epoch // step_length)``;
    * ``cyclic``: linear from ``lr`` down to 0 at the end (the triangular schedule of ffcv-imagenet).

    A pure function of the step, so a resumed run needs no scheduler state (and timm has no triangular schedule).
    """
    total = epochs * steps_per_epoch
    warmup = warmup_epochs * steps_per_epoch
    t = step + 1  # the lr used for the update that completes step `t` of `total`
    if warmup > 0 and t <= warmup:
        return lr * t / warmup
    if schedule == "cosine":
        progress = (t - warmup) / max(total - warmup, 1)
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "step":
        return lr * step_ratio ** (step // (step_length * steps_per_epoch))
    if schedule == "cyclic":
        return lr * max(total - t, 0) / max(total - warmup, 1)
    raise ValueError(f"unknown lr schedule {schedule!r}: use cosine, step or cyclic")


def resolution_at(epoch: int, *, min_res: int, max_res: int, start_ramp: int, end_ramp: int, step: int = 32) -> int:
    """Progressive resizing (0-based ``epoch``): ``min_res`` up to ``start_ramp``, growing linearly to ``max_res`` at
    ``end_ramp``, rounded down to a multiple of ``step`` and kept within [min_res, max_res]."""
    if end_ramp <= start_ramp:
        res = float(max_res if epoch >= end_ramp else min_res)
    else:
        frac = min(max((epoch - start_ramp) / (end_ramp - start_ramp), 0.0), 1.0)
        res = min_res + frac * (max_res - min_res)
    return min(max(int(res) // step * step, min_res), max_res)
