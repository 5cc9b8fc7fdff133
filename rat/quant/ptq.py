"""Simulated post-training quantization of any rat model: weights and input activations of every Conv/Linear layer.

First (``fold``, the seed's order), every BatchNorm that consumes a convolution's output directly is folded into it
(:func:`fold_batchnorm`): ``W <- W * g/s``, ``b <- beta + (b - mean) * g/s`` with ``g`` the BN weight and
``s = sqrt(running_var + eps)``. The folded bias is kept *in the BatchNorm module*, which becomes ``y -> y + b``
(weight 1, mean 0, ``running_var = 1 - eps``), so the model keeps its architecture and state-dict keys and a quantized
checkpoint loads into ``create_model_from_checkpoint`` unchanged. Then, per quantizable layer (every
``nn.Conv1d/2d/3d`` and ``nn.Linear``, timm's subclasses included):

* the weight is replaced by its fake-quantized value, per-tensor scale ``s_w = max|W| / fmt.max_value``;
* the layer's input is fake-quantized by a forward pre-hook, per-tensor scale ``s_in = max|x| / fmt.max_value``
  where ``max|x|`` is the largest absolute input seen on the calibration images by the full-precision model;
* the bias (the layer's own, or the folded one in its BatchNorm) is quantized at the accumulator scale
  ``s_in * s_w`` (``bias``, the seed's scheme; :func:`rat.quant.formats.quantize_bias`: INT32 for INT, bfloat16 for
  FLOAT and POT), or stays in float.

Everything else (input normalization, LayerNorm/BatchNorm, softmax, GELU, the attention matmuls, residual additions)
stays in float: these layers have no weights to quantize in this scheme, and the formats here do not serve them.

A quantized checkpoint is a rat checkpoint (``model``, ``arch``, ``model_kwargs``) whose weights are the quantized
values, plus a ``quant`` record (format, scales). ``rat.models.create_model_from_checkpoint`` loads it as a plain model
(quantized weights, float activations); :func:`load_quantized_model` also re-attaches the activation quantizers, and
so does ``rat.models.build_model(..., deploy=True)`` (rat.eval's path): importing this module registers the record's
builder with rat.models (``rat.models.checkpoint.RECORD_MODULES`` names this module, so rat.models imports it when it
meets a ``quant`` record, and rat.eval does not import rat.quant).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rat.models.checkpoint import RatCheckpoint, read_checkpoint, register_record_builder
from rat.models.weights import CheckpointError
from rat.quant.formats import BIAS_FORMATS, QuantFormat, fake_quantize, quantize_bias

__all__ = [
    "MIN_CALIB_IMAGES", "QUANT_RECORD_VERSION", "QuantizationError", "QuantizedModel", "calibrate", "fold_batchnorm",
    "layer_bias", "layer_tensors", "load_quantized_model", "quantizable_layers", "quantize_model",
    "save_quantized_checkpoint",
]

_logger = logging.getLogger(__name__)

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Fewer images give activation ranges that depend on a handful of inputs.
MIN_CALIB_IMAGES = 16
QUANT_RECORD_VERSION = 2  # 2: folded BatchNorm and quantized biases recorded


class QuantizationError(ValueError):
    """A model or calibration set that cannot be quantized as asked; the message says why and what to do."""


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of the Conv/Linear layers that :func:`quantize_model` quantizes, in module order.

    Raises:
        QuantizationError: the model has none.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)}
    if not layers:
        raise QuantizationError(f"{type(model).__name__} has no Conv/Linear layer to quantize: rat.quant quantizes "
                                "the weights and inputs of nn.Conv*d and nn.Linear layers")
    return layers


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """The largest absolute input of every quantizable layer over ``batches`` ([0, 1] images), full precision.

    Raises:
        QuantizationError: fewer than :data:`MIN_CALIB_IMAGES` images, or no quantizable layer.
    """
    layers = quantizable_layers(model)
    amax = {name: 0.0 for name in layers}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            amax[name] = max(amax[name], float(args[0].detach().abs().max()))
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for x in batches:
            model(x)
            seen += x.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen < MIN_CALIB_IMAGES:
        raise QuantizationError(f"calibration set too small: {seen} images, at least {MIN_CALIB_IMAGES} are needed "
                                "for stable activation ranges (raise the number of calibration images)")
    return amax


@torch.no_grad()
def fold_batchnorm(model: nn.Module, x: torch.Tensor) -> dict[str, str]:
    """Fold every BatchNorm whose input is exactly a convolution's output into that convolution, in place.

    The pairs are found from the data flow of one forward pass on ``x`` (eval mode): a BatchNorm is folded when the
    tensor it receives is the one a convolution returned. The folded bias is kept in the BatchNorm, which becomes
    ``y -> y + b`` (see the module docstring). A model without BatchNorm (LayerNorm CvSt models) is left as it is.

    Returns:
        ``{conv name: BatchNorm name}`` of the folded pairs.

    Raises:
        QuantizationError: folding changed the model's output (a convolution's output also feeds something else).
    """
    convs = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))}
    # an affine BatchNorm with running statistics (one without affine parameters has nowhere to keep the bias)
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.affine and m.track_running_stats}
    if not convs or not norms:
        return {}
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: dict[str, str] = {}

    def conv_hook(name: str):
        def record(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            produced[id(out)] = (name, out)  # the tensor is kept, so its id stays unique during the pass
        return record

    def norm_hook(name: str):
        def match(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            hit = produced.get(id(args[0]))
            if hit is not None and hit[1] is args[0]:
                pairs[hit[0]] = name
        return match

    handles = [m.register_forward_hook(conv_hook(n)) for n, m in convs.items()]
    handles += [m.register_forward_pre_hook(norm_hook(n)) for n, m in norms.items()]
    was_training = model.training
    model.eval()
    try:
        reference = model(x)
    finally:
        for handle in handles:
            handle.remove()
    produced.clear()
    for conv_name, norm_name in pairs.items():
        conv, norm = convs[conv_name], norms[norm_name]
        factor = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        conv.weight.mul_(factor.reshape(shape))
        conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
        folded = (conv_bias - norm.running_mean) * factor + norm.bias
        if conv.bias is not None:
            conv.bias.zero_()
        norm.running_mean.zero_()
        norm.running_var.fill_(1.0).sub_(norm.eps)
        norm.weight.fill_(1.0)
        norm.bias.copy_(folded)
    if not torch.allclose(model(x), reference, rtol=1e-3, atol=1e-4):
        raise QuantizationError("folding BatchNorm into the convolutions changed the model's output (a convolution's "
                                "output feeds more than its BatchNorm): set qscheme.fold_bn 0")
    model.train(was_training)
    return pairs


def layer_bias(model: nn.Module, name: str, folded: Mapping[str, str]) -> torch.Tensor | None:
    """The bias of quantizable layer ``name``: the folded one in its BatchNorm, else the layer's own (or None)."""
    if name in folded:
        return model.get_submodule(folded[name]).bias
    return model.get_submodule(name).bias


def layer_tensors(model: nn.Module, folded: Mapping[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer: {'weight': W, 'bias': b}}`` (detached copies; no ``bias`` for a layer without one) of every
    quantizable layer, biases as :func:`layer_bias` finds them."""
    tensors = {}
    for name, layer in quantizable_layers(model).items():
        tensors[name] = {"weight": layer.weight.detach().clone()}
        bias = layer_bias(model, name, folded)
        if bias is not None:
            tensors[name]["bias"] = bias.detach().clone()
    return tensors


@dataclasses.dataclass
class QuantizedModel:
    """A model quantized in place, its format and scales, and the hooks that quantize its layer inputs."""

    model: nn.Module
    fmt: QuantFormat
    weight_scales: dict[str, float]
    act_scales: dict[str, float]
    handles: list[Any] = dataclasses.field(default_factory=list, repr=False)
    folded: dict[str, str] = dataclasses.field(default_factory=dict)
    bias: str = "float32"

    def record(self) -> dict[str, Any]:
        """The ``quant`` entry of a quantized checkpoint (plain types only, safe for ``weights_only`` loading)."""
        return {"version": QUANT_RECORD_VERSION, "format": self.fmt.kind, "bits": self.fmt.bits,
                "exp_bits": self.fmt.exp_bits, "name": self.fmt.name, "weight_scales": dict(self.weight_scales),
                "act_scales": dict(self.act_scales), "bias": self.bias, "folded_bn": dict(self.folded)}


def _attach_act_quant(layers: Mapping[str, nn.Module], act_scales: Mapping[str, float], fmt: QuantFormat) -> list:
    def hook(scale: float):
        def quantize_input(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return (fake_quantize(args[0], scale, fmt), *args[1:])
        return quantize_input

    return [layers[name].register_forward_pre_hook(hook(scale)) for name, scale in act_scales.items()]


def _scale(amax: float, fmt: QuantFormat) -> float:
    # a layer whose input (or weight) is all zeros keeps zeros at any scale; 1.0 avoids dividing by zero
    return amax / fmt.max_value if amax > 0 else 1.0


@torch.no_grad()
def quantize_model(model: nn.Module, fmt: QuantFormat, act_amax: Mapping[str, float], *,
                   folded: Mapping[str, str] | None = None, bias: bool = True) -> QuantizedModel:
    """Quantize ``model`` in place: weights (and biases) replaced by their quantized values, input quantizers attached.

    Args:
        model: A model from ``rat.models.create_model`` (any module works), full precision, BatchNorm already folded
            by :func:`fold_batchnorm` when ``folded`` is given.
        fmt: The number format of weights and activations.
        act_amax: Per-layer input absolute maxima from :func:`calibrate` on the same architecture.
        folded: The pairs :func:`fold_batchnorm` returned (where the folded biases live), or None.
        bias: Quantize the biases at the accumulator scale (``quantize_bias``); False keeps them in float.
    """
    folded = dict(folded or {})
    layers = quantizable_layers(model)
    missing = sorted(set(layers) - set(act_amax))
    if missing:
        raise QuantizationError(f"no calibration range for layers {missing[:5]}: calibrate this architecture")
    weight_scales = {}
    for name, layer in layers.items():
        weight_scales[name] = _scale(float(layer.weight.abs().max()), fmt)
        layer.weight.copy_(fake_quantize(layer.weight, weight_scales[name], fmt))
    act_scales = {name: _scale(float(act_amax[name]), fmt) for name in layers}
    if bias:
        for name in layers:
            b = layer_bias(model, name, folded)
            if b is not None:
                b.copy_(quantize_bias(b, act_scales[name] * weight_scales[name], fmt.kind))
    handles = _attach_act_quant(layers, act_scales, fmt)
    return QuantizedModel(model, fmt, weight_scales, act_scales, handles, folded,
                          BIAS_FORMATS[fmt.kind] if bias else "float32")


def save_quantized_checkpoint(path: str | Path, quantized: QuantizedModel, arch: str, model_kwargs: Mapping[str, Any],
                              source: Mapping[str, Any] | None = None) -> Path:
    """Write ``{model, arch, model_kwargs, quant, source}`` atomically (``rat.io``); returns the path."""
    from rat.io import atomic_write

    state = {"model": quantized.model.state_dict(), "arch": arch, "model_kwargs": dict(model_kwargs),
             "quant": quantized.record(), "source": dict(source or {})}
    return atomic_write(path, lambda handle: torch.save(state, handle))


def load_quantized_model(checkpoint: str | Path | Mapping[str, Any] | RatCheckpoint, img_size: int | None = None,
                         ) -> QuantizedModel:
    """Rebuild a quantized model from a checkpoint of :func:`save_quantized_checkpoint`, activation quantizers on.

    Raises:
        QuantizationError: the checkpoint has no ``quant`` record.
    """
    from rat.models import create_model_from_checkpoint

    ckpt = checkpoint if isinstance(checkpoint, RatCheckpoint) else read_checkpoint(checkpoint)
    record = ckpt.records.get("quant")
    if record is None:
        raise QuantizationError("checkpoint has no 'quant' record: it is not a rat.quant checkpoint (write one with "
                                "python -m rat.quant ptq)")
    # the weights alone (built without the record, which would warn that it is left out); the record is applied here
    model = create_model_from_checkpoint(dataclasses.replace(ckpt, records={}), img_size=img_size)
    return _apply_record(model, record)


def _apply_record(model: nn.Module, record: Mapping[str, Any]) -> QuantizedModel:
    """``model`` (the quantized weights loaded) with the activation quantizers a ``quant`` record describes."""
    fmt = QuantFormat(record["format"], int(record["bits"]), int(record["exp_bits"]))
    layers = quantizable_layers(model)
    act_scales = {_layer_name(k, layers): float(v) for k, v in record["act_scales"].items()}
    weight_scales = {_layer_name(k, layers): float(v) for k, v in record["weight_scales"].items()}
    handles = _attach_act_quant(layers, act_scales, fmt)
    return QuantizedModel(model, fmt, weight_scales, act_scales, handles, dict(record.get("folded_bn") or {}),
                          str(record.get("bias", "float32")))


def _deployed(checkpoint: RatCheckpoint, model: nn.Module) -> nn.Module:
    """The ``quant`` record's builder (``rat.models.build_model(..., deploy=True)``): the quantized model as
    deployed, every layer's input quantized."""
    if checkpoint.use_ema:
        raise CheckpointError("a rat.quant checkpoint holds one quantized model and no EMA weights: drop --use-ema")
    return _apply_record(model, checkpoint.records["quant"]).model


register_record_builder("quant", _deployed)


def _layer_name(name: str, layers: Mapping[str, nn.Module]) -> str:
    """A recorded layer name as the model names it: records written while rat.models wrapped the timm network (before
    the model was the timm model itself) name layers ``model.<name>``."""
    return name if name in layers else name.removeprefix("model.")
