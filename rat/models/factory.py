"""One entry point for building any timm classifier, rat's *_cvst models included, as a [0, 1]-input model.

``create_model(name, checkpoint=None, img_size=None)`` returns ``timm.create_model(name, **kwargs)`` itself, with input
normalization as one of its modules, a checkpoint of any supported layout loaded strictly, at the resolution asked
for. ``create_model_from_checkpoint(path)`` rebuilds what a rat checkpoint records. Both read the checkpoint with
:func:`~rat.models.checkpoint.read_checkpoint` and build with :func:`build_model`, the one way from a checkpoint (a
:class:`~rat.models.checkpoint.ModelRecipe`) to a model; every rat entry point (training init and resume, rat.eval
and its runner, rat.quant) loads through them.

Design:

* **The returned object is the timm model.** Input normalization (STYLE.md section 4: the model takes pixels in
  [0, 1]) is an :class:`~rat.models.layers.ImageNormalizer` registered as the model's ``normalize`` submodule, with
  the mean/std of the model's pretrained cfg, and run as a forward pre-hook of the model's input module (the
  top-level module holding the cfg's ``first_conv``: ``stem``, ``patch_embed``, ``conv1``, ...; the model itself for
  the rare model with several input branches, such as CrossViT). Every path into the network (``forward``,
  ``forward_features``, ``forward_intermediates``) starts there, so all of them see normalized input, and every
  timm hook (``no_weight_decay``, ``set_input_size``, ``group_matcher``, ``reset_classifier``,
  ``set_grad_checkpointing``, ``num_classes``, ...) is the model's own: nothing is forwarded by hand, and timm's
  optimizer helpers see the model's own parameter names. A wrapper module would have to translate every hook that
  names parameters (``no_weight_decay``, ``group_matcher``) and every forward variant. The hook is a bound method of
  the ``normalize`` module, so ``copy.deepcopy`` (EMA) binds the copy to the copied module. A model that takes raw
  [0, 1] inputs has ``normalize = None``. When normalizing, the instance's ``pretrained_cfg`` (and ``default_cfg``)
  says mean 0 / std 1, the input the model now expects, so timm data pipelines do not normalize twice.
* **Keys.** The normalizer's buffers are not persistent, so ``state_dict()`` holds exactly timm's keys. Checkpoints
  written before this layout (``model.<timm keys>``, from the wrapper rat used then) load through the family filter
  fns (:func:`~rat.models.weights.unwrap_state_dict` strips the prefix). The model's ``load_state_dict`` applies
  its family filter fn too (a load-state-dict pre-hook that ``create_model`` registers), so a trainer resuming from
  such a checkpoint with ``module.load_state_dict(state['model'])`` keeps working.
* **One filter fn per model** does every rename and check: a rat family's ``checkpoint_filter_fn``, else
  :func:`~rat.models.weights.filter_state_dict` (which every family's filter starts with). This module renames
  nothing.
* **One resolution mechanism.** The model is built at the resolution it should run at (``img_size``; without it, a
  checkpoint's own resolution, read from its ``pos_embed``; else the cfg's), and the filter fn resamples a
  checkpoint's position embedding to the model's grid with timm's ``resample_abs_pos_embed``.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple
from timm.models import get_pretrained_cfg, is_model, model_entrypoint
from torch import nn

from . import convnext_cvst, convnext_iso_cvst, vit_cvst
from .checkpoint import ModelRecipe, RatCheckpoint, apply_records, read_checkpoint, resolve_normalization
from .layers import ImageNormalizer
from .weights import (
    CheckpointError,
    checkpoint_grid_size,
    filter_state_dict,
    load_state_dict_strict,
    unwrap_state_dict,
)

_logger = logging.getLogger(__name__)

__all__ = [
    "ModelKwargsError", "add_input_normalization", "build_model", "checkpoint_filter", "create_model",
    "create_model_from_checkpoint", "dynamic_size_kwargs",
]

StateDictFilter = Callable[[Mapping[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]
# Family checkpoint filters by the module that registers the architecture; other timm models get filter_state_dict.
_FILTERS: dict[str, StateDictFilter] = {
    convnext_cvst.__name__: convnext_cvst.checkpoint_filter_fn,
    convnext_iso_cvst.__name__: convnext_iso_cvst.checkpoint_filter_fn,
    vit_cvst.__name__: vit_cvst.checkpoint_filter_fn,
}


def checkpoint_filter(model: nn.Module) -> StateDictFilter:
    """The filter fn that maps any supported checkpoint layout onto ``model``: its rat family's
    ``checkpoint_filter_fn``, else :func:`~rat.models.weights.filter_state_dict`."""
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not arch or not is_model(arch):
        return filter_state_dict
    return _FILTERS.get(model_entrypoint(arch).__module__, filter_state_dict)


def _filter_on_load(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """``load_state_dict`` pre-hook: map the weights under ``prefix`` with the model's filter fn, in place."""
    keys = [k for k in state_dict if k.startswith(prefix)]
    if not keys:
        return
    weights = {k[len(prefix):]: state_dict.pop(k) for k in keys}
    state_dict.update({prefix + k: v for k, v in checkpoint_filter(module)(weights, module).items()})


def _input_module(model: nn.Module) -> nn.Module:
    """The top-level module that receives the image: the one holding the pretrained cfg's ``first_conv``. A model
    without one (several input branches, e.g. CrossViT's list of patch embeddings) gets normalization in front of its
    ``forward`` only."""
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    if isinstance(first, (list, tuple)):
        first = first[0] if first else None
    module = model._modules.get(first.split(".", 1)[0]) if isinstance(first, str) and first else None
    if module is None or isinstance(module, (nn.ModuleList, nn.ModuleDict)):  # a container is never called
        _logger.warning("%s has no single input module (first_conv=%r): input normalization runs in front of its "
                        "forward() only, forward_features() takes normalized inputs", type(model).__name__, first)
        return model
    return module


def add_input_normalization(model: nn.Module, normalize: bool = True) -> nn.Module:
    """Make ``model`` take images in [0, 1]: ``model.normalize`` (mean/std of its pretrained cfg) runs before its
    input module; ``normalize=False`` records ``model.normalize = None`` (the model takes raw [0, 1] inputs).

    Args:
        model: A timm classifier (changed in place).
        normalize: Normalize inputs with the pretrained cfg's mean/std.

    Returns:
        The same model.
    """
    if hasattr(model, "normalize"):
        raise ValueError(f"{type(model).__name__} already has a 'normalize' attribute")
    if not normalize:
        model.register_module("normalize", None)
        return model
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    normalizer = ImageNormalizer(cfg.get("mean", IMAGENET_DEFAULT_MEAN), cfg.get("std", IMAGENET_DEFAULT_STD))
    _input_module(model).register_forward_pre_hook(normalizer.normalize_input)
    model.register_module("normalize", normalizer)
    channels = len(normalizer.mean_values)
    model.pretrained_cfg = model.default_cfg = {**cfg, "mean": (0.0,) * channels, "std": (1.0,) * channels}
    return model


def _checkpoint_img_size(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
    """The resolution a ViT-like checkpoint was trained at (its ``pos_embed`` grid times the model's patch size), or
    None when the model or the checkpoint has no absolute position embedding of another size."""
    pos = unwrap_state_dict(state_dict)[0].get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if (pos is None or not isinstance(target, torch.Tensor) or pos.shape == target.shape or pos.ndim != 3
            or pos.shape[-1] != target.shape[-1] or not hasattr(model, "set_input_size")):
        return None
    num_prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    grid = checkpoint_grid_size(pos, num_prefix)
    patch = model.patch_embed.patch_size
    return grid[0] * patch[0], grid[1] * patch[1]


def dynamic_size_kwargs(name: str) -> dict[str, Any]:
    """``{'dynamic_img_size': True}`` for models with a fixed input size that can take any size per forward pass
    (timm ViTs: the position embedding is resampled on the fly, with the same ``resample_abs_pos_embed`` call as
    ``set_input_size``); ``{}`` for models that run at any resolution anyway (convnets).

    Args:
        name: A timm model name (probed on the meta device: no memory, no weights).
    """
    with torch.device("meta"):
        probe = timm.create_model(name)
    return {"dynamic_img_size": True} if hasattr(probe, "dynamic_img_size") else {}


class ModelKwargsError(ValueError):
    """A keyword argument the model's class does not take (``--model-kwargs``, a jobs file's ``model_kwargs``)."""


def create_model(
        name: str,
        checkpoint: str | Path | Mapping[str, Any] | RatCheckpoint | None = None,
        img_size: int | None = None,
        *,
        normalize: bool | None = None,
        use_ema: bool = False,
        **kwargs: Any,
) -> nn.Module:
    """Build a [0, 1]-input timm classifier, optionally load a checkpoint, at the resolution asked for.

    Args:
        name: Any registered timm model (rat's ``*_cvst`` models, ``resnet50``, ``vit_small_patch16_224``, ...),
            optionally with a pretrained tag (``convnext_tiny_cvst.rat_in1k_linf4``).
        checkpoint: Path (torch or ``.safetensors``), loaded dict or :func:`~rat.models.checkpoint.read_checkpoint`
            result: a rat trainer checkpoint, a state dict (rat or timm keys), or a revisiting-at release. Loaded
            strictly with ``weights_only=True``; its recorded ``model_kwargs`` are not used
            (:func:`create_model_from_checkpoint` rebuilds from them).
        img_size: Input resolution. ViTs are built at it and a checkpoint's position embedding is resampled to it;
            convnets run at any resolution. None: the checkpoint's resolution, else the cfg's.
        normalize: Put ImageNet-style mean/std normalization (from the pretrained cfg) inside the model; False for
            models trained on raw [0, 1] inputs. None: from the checkpoint (:func:`resolve_normalization`: a rat
            trainer checkpoint's record, released normalize.* buffers, or the paper's release table); a checkpoint
            that does not say is refused. Without a checkpoint None means True.
        use_ema: Load the checkpoint's EMA weights (``model_ema``/``state_dict_ema``).
        **kwargs: Passed to ``timm.create_model`` (num_classes, drop_path_rate, in_chans, ...).

    Returns:
        The timm model itself (see the module docstring), in train mode, on the CPU (or the default device).

    Raises:
        ValueError: Unknown model name or conflicting arguments.
        CheckpointError: The checkpoint is unreadable, unsafe, or does not match the model, or it does not say
            whether the model normalizes its input and ``normalize`` is None.
    """
    if not is_model(name):
        raise ValueError(f"unknown model '{name}': rat's models are timm.list_models('*_cvst') (after "
                         f"`import rat.models`); any other timm.list_models() name works too")
    if checkpoint is not None and kwargs.get("pretrained", False):
        raise ValueError("pass either checkpoint=... or pretrained=True, not both")
    if checkpoint is None and use_ema:
        raise ValueError("use_ema=True needs a checkpoint")
    ckpt = None if checkpoint is None else _read(checkpoint, use_ema)
    if ckpt is not None:
        ckpt.check_arch(name)
    normalize, why = resolve_normalization(name, ckpt, normalize)
    return build_model(ModelRecipe(name, {**kwargs, "normalize": normalize}, None, why, ckpt), img_size)


def create_model_from_checkpoint(
        checkpoint: str | Path | Mapping[str, Any] | RatCheckpoint,
        img_size: int | None = None,
        *,
        use_ema: bool = False,
        deploy: bool = False,
        **overrides: Any,
) -> nn.Module:
    """Rebuild a model from a rat trainer checkpoint, which records ``arch`` and ``model_kwargs``.

    Args:
        checkpoint: Path, loaded dict or :func:`~rat.models.checkpoint.read_checkpoint` result of a checkpoint
            written by ``rat.train`` (or ``rat.quant``).
        img_size: Evaluation resolution; None keeps the training resolution (``model_kwargs['img_size']``).
        use_ema: Load the EMA weights.
        deploy: Also build the checkpoint's records into the model (:func:`build_model`).
        **overrides: Replace entries of the recorded ``model_kwargs`` (e.g. ``drop_path_rate=0.0``).

    Returns:
        The model with the checkpoint's weights.
    """
    ckpt = _read(checkpoint, use_ema)
    if ckpt.arch is None or ckpt.model_kwargs is None:
        raise CheckpointError(
            f"{ckpt.source} is not a rat trainer checkpoint (it needs 'arch' and 'model_kwargs' entries); load it with "
            f"rat.models.create_model(NAME, checkpoint=path)")
    recipe = ckpt.recipe(normalize=overrides.pop("normalize", None), **overrides)
    return build_model(recipe, img_size if img_size is not None else recipe.resolution, deploy=deploy)


def _read(checkpoint: str | Path | Mapping[str, Any] | RatCheckpoint, use_ema: bool) -> RatCheckpoint:
    if not isinstance(checkpoint, RatCheckpoint):
        return read_checkpoint(checkpoint, use_ema=use_ema)
    if use_ema and not checkpoint.use_ema:
        raise ValueError("use_ema=True with a checkpoint read without it: read_checkpoint(path, use_ema=True)")
    return checkpoint


def build_model(recipe: ModelRecipe, img_size: int | None = None, *, deploy: bool = False) -> nn.Module:
    """Build what a recipe says: ``timm.create_model(arch, **kwargs)`` with input normalization inside, at
    ``img_size`` (None: the checkpoint's resolution read from its ``pos_embed``, else the cfg's), the checkpoint's
    weights loaded strictly through the model's filter fn.

    Args:
        recipe: From :meth:`~rat.models.checkpoint.RatCheckpoint.recipe` or :func:`create_model`.
        img_size: Input resolution (see :func:`create_model`).
        deploy: Also build the checkpoint's records into the model
            (:func:`~rat.models.checkpoint.apply_records`: a rat.quant checkpoint also quantizes every layer's input,
            the model as deployed); False loads the weights alone.

    Raises:
        ModelKwargsError: a keyword the model's class does not take.
        CheckpointError: the weights do not fit the model.
    """
    build_kwargs = dict(recipe.model_kwargs)
    normalize = build_kwargs.pop("normalize", True)
    name, ckpt = recipe.arch, recipe.checkpoint
    cfg = get_pretrained_cfg(name)
    if img_size is not None and cfg is not None and cfg.fixed_input_size:
        build_kwargs["img_size"] = img_size  # built at the target size; a checkpoint's pos_embed is resampled to it
    try:
        net = timm.create_model(name, **build_kwargs)
    except TypeError as exc:  # a keyword the model's class does not take (from --model-kwargs or a jobs file)
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if unknown is None:
            raise
        raise ModelKwargsError(f"model '{name}' takes no argument '{unknown.group(1)}' (given "
                               f"{sorted(build_kwargs)}): fix the model kwargs (see the model class's signature)") \
            from exc
    model = add_input_normalization(net, normalize=normalize)
    model.register_load_state_dict_pre_hook(_filter_on_load)
    if img_size is None and ckpt is not None:
        trained = _checkpoint_img_size(model, ckpt.weights)
        if trained is not None:
            _logger.info("%s was trained at %dx%d px; building the model at that resolution", ckpt.source, *trained)
            model.set_input_size(img_size=trained)
    elif img_size is not None and hasattr(model, "set_input_size"):
        model.set_input_size(img_size=to_2tuple(img_size))  # models that take the size as state, not as a kwarg
    if ckpt is None:
        return model
    _logger.info("%s: input normalization %s (%s)", ckpt.source, "on" if normalize else "off", recipe.normalization)
    try:
        weights = checkpoint_filter(model)(ckpt.weights, model)
    except CheckpointError as exc:
        raise CheckpointError(exc if ckpt.source == "checkpoint" else f"{ckpt.source}: {exc}") from exc
    hint = ""
    if ckpt.model_kwargs is not None:
        hint = (f"it was written for create_model({ckpt.arch!r}, **{dict(ckpt.model_kwargs)}); "
                f"rat.models.create_model_from_checkpoint(path) rebuilds it from that record")
    load_state_dict_strict(model, weights, source=ckpt.source, hint=hint)
    _logger.info("Loaded %s into %s", ckpt.source, name)
    if deploy:
        return apply_records(ckpt, model)
    if ckpt.records:
        _logger.warning("%s holds %s records: the model is built from its weights alone (build_model(..., "
                        "deploy=True), as rat.eval does, also builds them in: a rat.quant model quantizes every "
                        "layer's input)", ckpt.source, ", ".join(ckpt.records))
    return model
