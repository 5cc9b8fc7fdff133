"""One entry point for building any timm classifier, rat's *_cvst models included, as a [0, 1]-input model.

``create_model(name, checkpoint=None, img_size=None)`` returns ``timm.create_model(name, **kwargs)`` itself, with input
normalization as one of its modules, a checkpoint of any supported layout loaded strictly, at the resolution asked
for. ``create_model_from_checkpoint(path)`` rebuilds what a rat checkpoint records and calls ``create_model``; every
rat entry point (training init and resume, rat.eval and its runner, rat.quant) loads through these two.

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
  fns (:func:`~rat.models.checkpoint.unwrap_state_dict` strips the prefix). The model's ``load_state_dict`` applies
  its family filter fn too (a load-state-dict pre-hook that ``create_model`` registers), so a trainer resuming from
  such a checkpoint with ``module.load_state_dict(state['model'])`` keeps working.
* **One filter fn per model** does every rename and check: a rat family's ``checkpoint_filter_fn``, else
  :func:`~rat.models.checkpoint.filter_state_dict` (which every family's filter starts with). This module renames
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
from timm.models import get_arch_name, get_pretrained_cfg, is_model, model_entrypoint
from torch import nn

from . import convnext_cvst, convnext_iso_cvst, vit_cvst
from .checkpoint import (
    CheckpointError,
    checkpoint_grid_size,
    filter_state_dict,
    is_reference_layout,
    load_checkpoint_file,
    load_state_dict_strict,
    select_state_dict,
    unwrap_state_dict,
)
from .layers import ImageNormalizer

_logger = logging.getLogger(__name__)

__all__ = [
    "RELEASE_NORMALIZATION", "add_input_normalization", "checkpoint_filter", "checkpoint_model_kwargs",
    "checkpoint_normalization", "create_model", "create_model_from_checkpoint", "dynamic_size_kwargs",
    "ModelKwargsError", "resolve_normalization",
]

# Input normalization of the paper's released checkpoints (Singh, Croce & Hein 2023, github.com/nmndeep/revisiting-at),
# for files in the reference layout that carry no normalize.* buffers. The reference normalizes only through
# normalize_model(), whose buffers are saved with the weights, and its training script passes
# --model.add_normalization 0. RobustBench's loader (model_zoo/imagenet.py, get_convstem_models) builds the
# Singh2023Revisiting_{ConvNeXt-T,S,B,L,ViT-B}-ConvStem models without normalization and ViT-S-ConvStem inside
# normalize_model(IMAGENET_MEAN, IMAGENET_STD). ViT-M-CvSt and ConvNeXt-iso-CvSt are not in RobustBench; their
# releases follow the training script.
RELEASE_NORMALIZATION: dict[str, bool] = {
    "convnext_tiny_cvst": False,
    "convnext_small_cvst": False,
    "convnext_base_cvst": False,
    "convnext_large_cvst": False,
    "convnext_iso_small_cvst": False,
    "vit_small_patch16_cvst": True,
    "vit_medium_patch16_cvst": False,
    "vit_base_patch16_cvst": False,
}
NORMALIZE_HINT = ("pass normalize=True (ImageNet mean/std inside the model) or normalize=False (raw [0, 1] inputs); "
                  "on the command line --normalize 1 or --normalize 0")

StateDictFilter = Callable[[Mapping[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]
# Family checkpoint filters by the module that registers the architecture; other timm models get filter_state_dict.
_FILTERS: dict[str, StateDictFilter] = {
    convnext_cvst.__name__: convnext_cvst.checkpoint_filter_fn,
    convnext_iso_cvst.__name__: convnext_iso_cvst.checkpoint_filter_fn,
    vit_cvst.__name__: vit_cvst.checkpoint_filter_fn,
}


def checkpoint_filter(model: nn.Module) -> StateDictFilter:
    """The filter fn that maps any supported checkpoint layout onto ``model``: its rat family's
    ``checkpoint_filter_fn``, else :func:`~rat.models.checkpoint.filter_state_dict`."""
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


def checkpoint_normalization(name: str, checkpoint: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                             ) -> tuple[bool | None, str, bool]:
    """What a checkpoint says about the input normalization of its model.

    In order: a rat trainer checkpoint's ``model_kwargs['normalize']``; ``normalize.mean/std`` buffers in the weights
    (normalization on); a revisiting-at release in the reference layout of one of the paper's architectures
    (:data:`RELEASE_NORMALIZATION`). Anything else does not say.

    Args:
        name: Architecture the checkpoint is loaded into.
        checkpoint: The whole checkpoint dict.
        state_dict: Its weights (:func:`~rat.models.checkpoint.select_state_dict`).

    Returns:
        ``(normalize, reason, recorded)``: ``recorded`` is True when the file itself records it (trainer record,
        buffers) and False for the release table; ``(None, '', False)`` when the checkpoint does not say.
    """
    kwargs = checkpoint.get("model_kwargs")
    if isinstance(kwargs, Mapping) and "normalize" in kwargs:
        return bool(kwargs["normalize"]), "recorded in the checkpoint (model_kwargs)", True
    inner, norm = unwrap_state_dict(state_dict)
    if norm:
        return True, "the checkpoint carries normalize.mean/std", True
    arch = get_arch_name(name)
    if arch in RELEASE_NORMALIZATION and is_reference_layout(inner):
        return RELEASE_NORMALIZATION[arch], f"paper release of {arch} (reference layout, rat's release table)", False
    return None, "", False


def resolve_normalization(name: str, checkpoint: Mapping[str, Any] | None, normalize: bool | None,
                          source: str = "checkpoint", use_ema: bool = False) -> tuple[bool, str]:
    """The input normalization a model runs with: what the checkpoint says, or the explicit ``normalize``.

    Without a checkpoint, ``None`` means True (a fresh model normalizes with its cfg's mean/std). A checkpoint that does
    not say needs an explicit value; an explicit value that contradicts the checkpoint's record or buffers is an
    error, one that contradicts the release table wins (with a warning).

    Returns:
        ``(normalize, reason)``.

    Raises:
        CheckpointError: the checkpoint does not say and ``normalize`` is None, or they disagree.
    """
    if checkpoint is None:
        return (True, "default for a model without checkpoint") if normalize is None else (bool(normalize), "given")
    said, why, recorded = checkpoint_normalization(name, checkpoint, select_state_dict(checkpoint, use_ema=use_ema))
    if normalize is None:
        if said is None:
            raise CheckpointError(f"{source} does not record whether its model normalizes its input: {NORMALIZE_HINT}")
        return said, why
    normalize = bool(normalize)
    if said is not None and said != normalize:
        if not recorded:
            _logger.warning("%s: normalize=%s given although the %s says %s", source, normalize, why, said)
            return normalize, "given (overrides the release table)"
        raise CheckpointError(f"{source}: {why}, normalize={said}, but normalize={normalize} was given; create it "
                              f"with normalize={said} (or leave normalize out)")
    return normalize, "given" if said is None else why


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
        checkpoint: str | Path | Mapping[str, Any] | None = None,
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
        checkpoint: Path (torch or ``.safetensors``) or already loaded dict: a rat trainer checkpoint, a state dict
            (rat or timm keys), or a revisiting-at release. Loaded strictly with ``weights_only=True``.
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
    state = None
    source = "checkpoint"
    hint = ""
    if checkpoint is not None:
        if isinstance(checkpoint, Mapping):
            ckpt = dict(checkpoint)
        else:
            source = str(checkpoint)
            ckpt = load_checkpoint_file(checkpoint)
        arch = ckpt.get("arch")
        if isinstance(arch, str) and is_model(arch) and get_arch_name(arch) != get_arch_name(name):
            raise CheckpointError(f"{source} holds a '{arch}' model, not '{name}'")
        if isinstance(ckpt.get("quant"), Mapping):
            _logger.warning("%s holds a rat.quant %s model: create_model loads its quantized weights but runs float "
                            "activations; rat.quant.load_quantized_model (and rat.eval) also quantize every layer's "
                            "input", source, ckpt["quant"].get("name", "?"))
        if isinstance(ckpt.get("model_kwargs"), Mapping):
            hint = (f"it was written for create_model({arch!r}, **{dict(ckpt['model_kwargs'])}); "
                    f"rat.models.create_model_from_checkpoint(path) rebuilds it from that record")
        state = select_state_dict(ckpt, use_ema=use_ema)
        normalize, why = resolve_normalization(name, ckpt, normalize, source=source, use_ema=use_ema)
        _logger.info("%s: input normalization %s (%s)", source, "on" if normalize else "off", why)
    elif use_ema:
        raise ValueError("use_ema=True needs a checkpoint")
    elif normalize is None:
        normalize = True

    build_kwargs = dict(kwargs)
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
    if img_size is None and state is not None:
        trained = _checkpoint_img_size(model, state)
        if trained is not None:
            _logger.info("%s was trained at %dx%d px; building the model at that resolution", source, *trained)
            model.set_input_size(img_size=trained)
    elif img_size is not None and hasattr(model, "set_input_size"):
        model.set_input_size(img_size=to_2tuple(img_size))  # models that take the size as state, not as a kwarg
    if state is not None:
        try:
            weights = checkpoint_filter(model)(state, model)
        except CheckpointError as exc:
            raise CheckpointError(exc if source == "checkpoint" else f"{source}: {exc}") from exc
        load_state_dict_strict(model, weights, source=source, hint=hint)
        _logger.info("Loaded %s into %s", source, name)
    return model


def checkpoint_model_kwargs(checkpoint: Mapping[str, Any], name: str, *, normalize: bool | None = None,
                            use_ema: bool = False, source: str = "checkpoint", **overrides: Any,
                            ) -> tuple[dict[str, Any], int | None, str]:
    """The :func:`create_model` kwargs of the model a checkpoint holds.

    Args:
        checkpoint: A loaded checkpoint dict.
        name: The architecture it is loaded into.
        normalize: The input normalization asked for (None: what the checkpoint says, :func:`resolve_normalization`).
        use_ema: The EMA weights will be loaded.
        source: Name of the checkpoint for messages.
        **overrides: Replace entries of the recorded ``model_kwargs`` (e.g. ``drop_path_rate=0.0``).

    Returns:
        ``(kwargs, img_size, reason)``: a rat trainer checkpoint's recorded ``model_kwargs`` (none for a file that
        does not record its architecture) with the overrides applied, ``normalize`` resolved and ``img_size`` taken
        out; the recorded training resolution (or None); where the normalization comes from.
    """
    recorded = checkpoint.get("model_kwargs")
    kwargs = dict(recorded) if isinstance(checkpoint.get("arch"), str) and isinstance(recorded, Mapping) else {}
    kwargs.update(overrides)
    kwargs.pop("normalize", None)
    img_size = kwargs.pop("img_size", None)
    if isinstance(img_size, (tuple, list)):
        img_size = int(img_size[-1])
    kwargs["normalize"], why = resolve_normalization(name, checkpoint, normalize, source=source, use_ema=use_ema)
    return kwargs, img_size, why


def create_model_from_checkpoint(
        checkpoint: str | Path | Mapping[str, Any],
        img_size: int | None = None,
        *,
        use_ema: bool = False,
        **overrides: Any,
) -> nn.Module:
    """Rebuild a model from a rat trainer checkpoint, which records ``arch`` and ``model_kwargs``.

    Args:
        checkpoint: Path or loaded dict of a checkpoint written by ``rat.train`` (or ``rat.quant``).
        img_size: Evaluation resolution; None keeps the training resolution (``model_kwargs['img_size']``).
        use_ema: Load the EMA weights.
        **overrides: Replace entries of the recorded ``model_kwargs`` (e.g. ``drop_path_rate=0.0``).

    Returns:
        The model with the checkpoint's weights (:func:`create_model`).
    """
    source = "checkpoint"
    if isinstance(checkpoint, Mapping):
        ckpt = dict(checkpoint)
    else:
        source = str(checkpoint)
        ckpt = load_checkpoint_file(checkpoint)
    if not isinstance(ckpt.get("arch"), str) or not isinstance(ckpt.get("model_kwargs"), Mapping):
        raise CheckpointError(
            f"{source} is not a rat trainer checkpoint (it needs 'arch' and 'model_kwargs' entries); load it with "
            f"rat.models.create_model(NAME, checkpoint=path)")
    normalize = overrides.pop("normalize", None)
    kwargs, train_size, _ = checkpoint_model_kwargs(ckpt, ckpt["arch"], normalize=normalize, use_ema=use_ema,
                                                    source=source, **overrides)
    return create_model(ckpt["arch"], checkpoint=ckpt, img_size=img_size if img_size is not None else train_size,
                        use_ema=use_ema, **kwargs)
