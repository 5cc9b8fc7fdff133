"""Parameter and FLOP counts (torch's FlopCounterMode), e.g. for model-FLOPs utilization (MFU)."""
from __future__ import annotations

import logging

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

_logger = logging.getLogger(__name__)

__all__ = ["count_flops", "count_module_flops", "count_params"]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters counted once).

    Args:
        model: Any module, also on the meta device.
        trainable_only: Count only parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, img_size: int, batch_size: int = 1) -> int:
    """FLOPs of one forward pass in eval mode, as counted by ``torch.utils.flop_counter.FlopCounterMode``.

    One multiply-add counts as 2 FLOPs (matmuls, convolutions and attention; norms and activations are not counted),
    so the number is about twice the "GFLOPs" (really MACs) that fvcore-based tables, the paper's included, report.
    A training step with backward costs about 3x this. Works on the meta device, so large models need no memory.

    Args:
        model: A classifier taking ``(N, C, img_size, img_size)`` input (C from its pretrained cfg, default 3).
        img_size: Input resolution; a ViT must already be set to it (``set_input_size``).
        batch_size: Batch size of the counted forward pass.

    Returns:
        Total FLOPs of the forward pass for the whole batch.
    """
    return int(_counted_forward(model, img_size, batch_size).get_total_flops())


def count_module_flops(model: nn.Module, img_size: int, batch_size: int = 1) -> dict[str, int]:
    """FLOPs of one forward pass per submodule, as :func:`count_flops` counts them.

    Keys are ``FlopCounterMode``'s module names: the root class name, then the dotted path
    (``"ResNet.layer1.0.conv1"``); a parent counts the FLOPs of its children too.
    """
    counts = _counted_forward(model, img_size, batch_size).get_flop_counts()
    return {name: int(sum(per_op.values())) for name, per_op in counts.items()}


def _counted_forward(model: nn.Module, img_size: int, batch_size: int) -> FlopCounterMode:
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    cfg = getattr(model, "pretrained_cfg", None) or {}
    in_chans = int((cfg.get("input_size") or (3,))[0])
    x = torch.zeros(batch_size, in_chans, img_size, img_size, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter
