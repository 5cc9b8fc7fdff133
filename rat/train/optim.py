"""Optimizer with weight-decay-free parameter groups (the schedules are the specs' :meth:`rat.train.spec.LRSpec.lr_at`
and :meth:`rat.train.spec.ResolutionSpec.resolution_at`)."""
from __future__ import annotations

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
