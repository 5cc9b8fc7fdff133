"""How far a quantized model's weights are from the full-precision ones: per-layer Jensen–Shannon divergence between
the two weight histograms, averaged over layers with weights proportional to parameters (``js_param``) or FLOPs
(``js_flops``).

The weighting is written here (no library computes it); the divergence itself is scipy's ``jensenshannon``
(squared: scipy returns the distance, the square root of the divergence), in bits, so 0 ≤ JS ≤ 1. Both histograms
use the same ``bins`` equal bins over ``[-max|W|, max|W|]`` of the full-precision weight, which holds every
quantized value too (the grids are symmetric and saturate at that maximum).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from scipy.spatial.distance import jensenshannon
from torch import nn

from rat.models.flops import count_module_flops

__all__ = ["DEFAULT_BINS", "js_divergence", "layer_flops", "layer_params", "model_similarity", "weights_of"]

DEFAULT_BINS = 256


def js_divergence(reference: torch.Tensor, other: torch.Tensor, bins: int = DEFAULT_BINS) -> float:
    """Jensen–Shannon divergence (base 2) between the value histograms of two tensors, on ``reference``'s range."""
    ref = reference.detach().double().flatten().cpu()
    oth = other.detach().double().flatten().cpu()
    bound = float(ref.abs().max())
    if bound == 0:
        bound = 1.0
    p = torch.histc(ref, bins=bins, min=-bound, max=bound).numpy()
    q = torch.histc(oth.clamp(-bound, bound), bins=bins, min=-bound, max=bound).numpy()
    return float(jensenshannon(p, q, base=2) ** 2)


def layer_params(layers: Mapping[str, nn.Module]) -> dict[str, int]:
    """Weight elements of each layer."""
    return {name: int(m.weight.numel()) for name, m in layers.items()}


def layer_flops(model: nn.Module, layer_names: list[str], img_size: int) -> dict[str, int]:
    """Forward FLOPs (batch 1, torch's FlopCounterMode, 1 multiply-add = 2 FLOPs) of each named submodule."""
    counts = count_module_flops(model, img_size)
    root = type(model).__name__
    return {name: counts.get(f"{root}.{name}", 0) for name in layer_names}


def model_similarity(fp_weights: Mapping[str, torch.Tensor], q_weights: Mapping[str, torch.Tensor],
                     params: Mapping[str, int], flops: Mapping[str, int], bins: int = DEFAULT_BINS) -> dict:
    """``{'js_param', 'js_flops', 'js_layers'}`` of a quantized model against its full-precision weights.

    Args:
        fp_weights: Full-precision weight of each quantizable layer.
        q_weights: Quantized weight of the same layers.
        params: Weight elements per layer (:func:`layer_params`).
        flops: FLOPs per layer (:func:`layer_flops`).
        bins: Histogram bins.
    """
    js = {name: js_divergence(fp_weights[name], q_weights[name], bins) for name in fp_weights}
    p_total = sum(params[n] for n in js)
    f_total = sum(flops[n] for n in js)
    js_param = sum(js[n] * params[n] for n in js) / p_total
    js_flops = sum(js[n] * flops[n] for n in js) / f_total if f_total > 0 else float("nan")
    return {"js_param": float(js_param), "js_flops": float(js_flops),
            "js_layers": {n: round(v, 8) for n, v in js.items()}}


def weights_of(layers: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """A detached copy of each layer's weight."""
    return {name: m.weight.detach().clone() for name, m in layers.items()}

