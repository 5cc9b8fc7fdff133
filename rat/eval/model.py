"""The model an evaluation attacks: read from its checkpoint through rat.models' one reader, with rat.eval's rules
(``--arch`` only for a checkpoint that does not name its own, ``--use-ema`` only with EMA weights, ``--model-kwargs``
and ``--normalize`` on top of the checkpoint's record), and built as AutoAttack sees it (:class:`EvalModel`).

A checkpoint with a record that changes how its model is built (a rat.quant checkpoint's ``quant`` record) is built
as deployed (``rat.models.build_model(..., deploy=True)``): rat.models imports the record's builder, so rat.eval
does not import rat.quant.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rat.models import CheckpointError, ModelRecipe, build_model, read_checkpoint, resolve_normalization
from rat.precision import PRECISIONS

if TYPE_CHECKING:
    from rat.eval.spec import EvalSpec

__all__ = ["EvalModel", "ModelSource", "build_eval_model", "model_recipe"]


@dataclasses.dataclass
class ModelSource:
    """The model of an evaluation (its recipe) and the SHA-256 of its checkpoint file (None for random weights)."""

    recipe: ModelRecipe
    checkpoint_sha256: str | None

    @property
    def arch(self) -> str:
        return self.recipe.arch

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """``create_model`` kwargs, ``normalize`` included (as the result records them)."""
        return dict(self.recipe.model_kwargs)

    @property
    def train_resolution(self) -> int | None:
        return self.recipe.resolution

    @property
    def normalization(self) -> str:
        """Where the input normalization comes from."""
        return self.recipe.normalization

    @property
    def quantization(self) -> str | None:
        """The rat.quant format of a quantized checkpoint (its ``quant`` record's name), else None."""
        checkpoint = self.recipe.checkpoint
        return None if checkpoint is None else checkpoint.records.get("quant", {}).get("name")

    def release(self) -> None:
        """Drop the loaded checkpoint (weights, optimizer state and all) once the model is built."""
        self.recipe = dataclasses.replace(self.recipe, checkpoint=None)


def _requested_normalize(spec: EvalSpec) -> bool | None:
    """The normalization asked for: ``spec.normalize``, else a ``normalize`` in ``spec.model_kwargs``, else None."""
    if spec.normalize is not None:
        return spec.normalize
    value = spec.model_kwargs.get("normalize")
    return None if value is None else bool(value)


def model_recipe(spec: EvalSpec) -> ModelRecipe:
    """Architecture, model kwargs and input normalization from the checkpoint (and the spec), with clear errors.

    Raises:
        CheckpointError: nothing to evaluate, a checkpoint that does not name its architecture without ``--arch``,
            another ``--arch`` than the checkpoint's, ``--use-ema`` without EMA weights, an input normalization the
            checkpoint does not say or contradicts.
    """
    from rat.models.preflight import check_arch

    if spec.arch is not None:
        check_arch(spec.arch)
    if spec.checkpoint is None:
        if spec.arch is None:
            raise CheckpointError("nothing to evaluate: pass --checkpoint PATH, or --arch NAME for random weights")
        normalize, why = resolve_normalization(spec.arch, None, _requested_normalize(spec))
        return ModelRecipe(spec.arch, {**spec.model_kwargs, "normalize": normalize}, None, why)
    path = spec.checkpoint
    ckpt = read_checkpoint(path, use_ema=spec.use_ema)
    arch = ckpt.arch
    if arch is None:
        if spec.arch is None:
            raise CheckpointError(f"checkpoint {path} does not name its architecture (not a rat trainer checkpoint): "
                                  "pass --arch NAME, e.g. --arch convnext_base_cvst")
        arch = spec.arch
    elif spec.arch is not None and spec.arch != arch:
        raise CheckpointError(f"checkpoint {path} holds a {arch} but --arch {spec.arch} was given: drop --arch "
                              "(rat checkpoints name their architecture)")
    if spec.use_ema and ckpt.trained_without_ema:
        raise CheckpointError(f"checkpoint {path} has no EMA weights: drop --use-ema")
    return ckpt.recipe(arch, normalize=_requested_normalize(spec), **spec.model_kwargs)


class _ContiguousInputGrad(torch.autograd.Function):
    """Identity whose backward returns a contiguous gradient.

    A channels_last model gives channels_last input gradients, and AutoAttack calls ``.view`` on them (which needs
    a contiguous tensor); this keeps the speed of channels_last and hands AutoAttack the layout it expects.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class EvalModel(nn.Module):
    """The model as AutoAttack sees it: contiguous input gradients, optional autocast, fp32 logits.

    Args:
        model: the classifier on [0,1] inputs.
        dtype: autocast dtype (``torch.bfloat16``/``torch.float16``) or None for fp32.
        device_type: ``cuda`` or ``cpu``.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None, device_type: str):
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.device_type = device_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            x = _ContiguousInputGrad.apply(x)
        if self.dtype is None:
            return self.model(x)
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            return self.model(x).float()


def build_eval_model(recipe: ModelRecipe, *, resolution: int, device: torch.device,
                     precision: str = "fp32") -> nn.Module:
    """The model to attack: built at ``resolution`` (ViT position embeddings resampled by the factory), weights loaded
    strictly and the checkpoint's records built in (a rat.quant checkpoint quantizes every layer's input, as
    deployed), on ``device``, channels_last, eval mode, parameters frozen, optionally under autocast.

    Raises:
        CheckpointError: the checkpoint's weights do not fit the architecture.
    """
    try:
        model = build_model(recipe, resolution, deploy=True)
    except (RuntimeError, CheckpointError) as exc:
        if recipe.checkpoint is None:
            raise
        kwargs = {k: v for k, v in recipe.model_kwargs.items() if k != "normalize"}
        raise CheckpointError(f"checkpoint does not fit architecture {recipe.arch} (model kwargs {kwargs}): {exc}. "
                              "Pass the --arch the checkpoint was trained with (and --model-kwargs such as "
                              "num_classes)") from exc
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    model.requires_grad_(False)
    return EvalModel(model, PRECISIONS[precision], device.type).eval()
