"""How far a quantized model's parameters are from the full-precision ones: a per-tensor divergence, summed per layer
and averaged over layers with weights proportional to parameters (``js_param``) or FLOPs (``js_flops``).

Two per-tensor measures (:data:`MEASURES`):

* ``softmax`` (default, the seed's "js-div"): the Jensen–Shannon divergence between ``softmax(P)`` and
  ``softmax(Q)`` of the full-precision tensor ``P`` and the de-quantized tensor ``Q`` (same shape), paired element by
  element: ``JS = (KL(p || m) + KL(q || m)) / 2`` with ``m = (p + q) / 2``, natural log, summed over every element
  (torch's ``KLDivLoss(reduction='sum')``). The softmax runs along the dimension that ``torch.nn.functional.softmax``
  picks when called without ``dim`` (the seed calls it so; :func:`implicit_softmax_dim`): dim 0 for 0-, 1- and 3-D
  tensors (biases, Conv1d weights), dim 1 otherwise (Linear and Conv2d/3d weights: over the input channels). A
  tensor of ``n`` softmax groups has ``0 <= JS <= n ln 2``. Computed in float64 and clipped at 0 (the seed clips
  negative rounding noise too).
* ``histogram`` (rat's earlier measure): JS (scipy's ``jensenshannon`` squared, base 2, in [0, 1]) between the value
  histograms of ``P`` and ``Q``, ``bins`` equal bins over ``±max|P|``.

Per layer, the measure of its weight plus that of its bias (the seed adds both with the layer's weight); layer
shares are over the quantizable layers: ``params`` (weight + bias elements) or forward FLOPs (torch's
``FlopCounterMode``). ``js_flops_wt_log = js_flops * log10(MACs)`` and ``js_flops_wt_cbrt = js_flops * MACs^(1/3)``
(MACs of the whole model, one forward pass at batch 1) are the seed's MAC-weighted variants for fitting several models
on one curve. The weighting is written here (no library computes it).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon
from torch import nn

from rat.models.flops import count_module_flops

__all__ = ["DEFAULT_BINS", "MEASURES", "SIMILARITIES", "implicit_softmax_dim", "js_histogram", "js_softmax",
           "layer_flops", "layer_params", "model_macs", "model_similarity", "tensor_divergence"]

DEFAULT_BINS = 256
MEASURES = ("softmax", "histogram")
# the x axes a fit can use (records carry all of them)
SIMILARITIES = ("js_flops", "js_param", "js_flops_wt_log", "js_flops_wt_cbrt")


def implicit_softmax_dim(ndim: int) -> int:
    """The dimension ``torch.nn.functional.softmax(x)`` uses without ``dim`` (torch's ``_get_softmax_dim``, which
    warns that the implicit choice is deprecated): 0 for 0-, 1- and 3-D tensors, else 1."""
    return 0 if ndim in (0, 1, 3) else 1


def js_softmax(reference: torch.Tensor, other: torch.Tensor) -> float:
    """The seed's per-tensor JS divergence (natural log, summed) between the softmaxes of two same-shape tensors."""
    if reference.shape != other.shape:
        raise ValueError(f"paired tensors differ in shape: {tuple(reference.shape)} vs {tuple(other.shape)}")
    dim = implicit_softmax_dim(reference.dim())
    p = F.softmax(reference.detach().double().cpu(), dim=dim)
    q = F.softmax(other.detach().double().cpu(), dim=dim)
    log_m = ((p + q) / 2).log()
    js = (F.kl_div(log_m, p, reduction="sum") + F.kl_div(log_m, q, reduction="sum")) / 2
    return max(float(js), 0.0)


def js_histogram(reference: torch.Tensor, other: torch.Tensor, bins: int = DEFAULT_BINS) -> float:
    """JS divergence (base 2) between the value histograms of two tensors, ``bins`` bins on ``reference``'s range."""
    ref = reference.detach().double().flatten().cpu()
    oth = other.detach().double().flatten().cpu()
    bound = float(ref.abs().max())
    if bound == 0:
        bound = 1.0
    p = torch.histc(ref, bins=bins, min=-bound, max=bound).numpy()
    q = torch.histc(oth.clamp(-bound, bound), bins=bins, min=-bound, max=bound).numpy()
    return float(jensenshannon(p, q, base=2) ** 2)


def tensor_divergence(reference: torch.Tensor, other: torch.Tensor, measure: str = "softmax",
                      bins: int = DEFAULT_BINS) -> float:
    """One tensor pair under ``measure`` (:data:`MEASURES`)."""
    if measure == "softmax":
        return js_softmax(reference, other)
    if measure == "histogram":
        return js_histogram(reference, other, bins)
    raise ValueError(f"unknown similarity measure {measure!r}: use one of {', '.join(MEASURES)}")


def layer_params(tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, int]:
    """Parameter elements (weight + bias) of each layer of ``rat.quant.ptq.layer_tensors``' output."""
    return {name: sum(int(t.numel()) for t in parts.values()) for name, parts in tensors.items()}


def layer_flops(model: nn.Module, layer_names: list[str], img_size: int) -> tuple[dict[str, int], int]:
    """Forward FLOPs (batch 1, torch's FlopCounterMode, 1 multiply-add = 2 FLOPs) of each named submodule, and the
    whole model's multiply-accumulates (the total / 2), from one counted forward pass."""
    counts = count_module_flops(model, img_size)
    root = type(model).__name__
    return {name: counts.get(f"{root}.{name}", 0) for name in layer_names}, int(counts.get("Global", 0)) // 2


def model_macs(model: nn.Module, img_size: int) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (FlopCounterMode's total / 2)."""
    return layer_flops(model, [], img_size)[1]


def model_similarity(fp: Mapping[str, Mapping[str, torch.Tensor]], quantized: Mapping[str, Mapping[str, torch.Tensor]],
                     params: Mapping[str, int], flops: Mapping[str, int], macs: int, measure: str = "softmax",
                     bins: int = DEFAULT_BINS) -> dict:
    """``{'js_param', 'js_flops', 'js_flops_wt_log', 'js_flops_wt_cbrt', 'js_layers'}`` of a quantized model.

    Args:
        fp: ``{layer: {'weight': W, 'bias': b}}`` of the full-precision (BatchNorm-folded) model
            (``rat.quant.ptq.layer_tensors``).
        quantized: The same for the quantized model.
        params: Parameter elements per layer (:func:`layer_params`).
        flops: FLOPs per layer (:func:`layer_flops`).
        macs: MACs of the whole model (:func:`model_macs`), for the MAC-weighted variants.
        measure: ``softmax`` (the seed's) or ``histogram``.
        bins: Histogram bins (``histogram`` only).
    """
    js = {name: sum(tensor_divergence(parts[key], quantized[name][key], measure, bins) for key in parts)
          for name, parts in fp.items()}
    p_total = sum(params[n] for n in js)
    f_total = sum(flops[n] for n in js)
    js_param = sum(js[n] * params[n] for n in js) / p_total
    js_flops = sum(js[n] * flops[n] for n in js) / f_total if f_total > 0 else float("nan")
    return {"js_param": float(js_param), "js_flops": float(js_flops),
            "js_flops_wt_log": float(js_flops * math.log10(macs)) if macs > 1 else float("nan"),
            "js_flops_wt_cbrt": float(js_flops * macs ** (1 / 3)),
            "js_layers": js}
