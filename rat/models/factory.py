"""One entry point for building any timm classifier, rat's *_cvst models included, as a [0, 1]-input model.

``create_model(name, checkpoint=None, img_size=None)`` builds ``timm.create_model(name, **kwargs)``, puts it inside a
:class:`NormalizedModel` (input normalization from the model's pretrained cfg is its first module), loads a
checkpoint strictly in any supported layout, and sets the evaluation resolution. Whatever it returns is what the
trainer saves ``state_dict()`` of, and what ``create_model(..., checkpoint=...)`` reloads.
"""
from __future__ import annotations

import logging
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
    check_normalization,
    checkpoint_grid_size,
    is_reference_layout,
    load_checkpoint_file,
    load_state_dict_strict,
    select_state_dict,
    unwrap_state_dict,
)
from .layers import ImageNormalizer

_logger = logging.getLogger(__name__)

__all__ = [
    "RELEASE_NORMALIZATION", "NormalizedModel", "checkpoint_normalization", "create_model",
    "create_model_from_checkpoint", "dynamic_size_kwargs", "load_checkpoint_into", "resolve_normalization",
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

# Family checkpoint filters (reference-layout renames) by the module that registers the architecture.
_FILTERS: dict[str, Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]] = {
    convnext_cvst.__name__: convnext_cvst.checkpoint_filter_fn,
    convnext_iso_cvst.__name__: convnext_iso_cvst.checkpoint_filter_fn,
    vit_cvst.__name__: vit_cvst.checkpoint_filter_fn,
}


class NormalizedModel(nn.Module):
    """A classifier that takes images in [0, 1]: ``model(normalize(x))``.

    ``normalize`` is an :class:`~rat.models.layers.ImageNormalizer` with the mean/std of the inner model's pretrained
    cfg (non-persistent buffers), or ``nn.Identity`` for models trained without input normalization. State-dict keys
    are ``model.<timm keys>`` either way. Attacks and epsilons therefore live in pixel space.

    The timm-facing helpers (``set_input_size``, ``forward_features``, ``reset_classifier``, ``no_weight_decay``,
    ...) are forwarded to the inner model. ``pretrained_cfg`` describes the wrapper's input: its mean/std are 0/1
    when normalization is inside, so timm data pipelines do not normalize twice.

    Args:
        model: A timm classifier.
        normalize: Normalize inputs with the inner model's pretrained-cfg mean/std.
    """

    def __init__(self, model: nn.Module, normalize: bool = True) -> None:
        super().__init__()
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = tuple(float(m) for m in cfg.get("mean", IMAGENET_DEFAULT_MEAN))
        std = tuple(float(s) for s in cfg.get("std", IMAGENET_DEFAULT_STD))
        self.input_mean: tuple[float, ...] | None = mean if normalize else None
        self.input_std: tuple[float, ...] | None = std if normalize else None
        self.normalize = ImageNormalizer(mean, std) if normalize else nn.Identity()
        self.model = model

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The inner model's pretrained cfg, with mean 0 / std 1 when this wrapper normalizes."""
        cfg = dict(getattr(self.model, "pretrained_cfg", None) or {})
        if self.input_mean is not None:
            cfg["mean"] = (0.0,) * len(self.input_mean)
            cfg["std"] = (1.0,) * len(self.input_mean)
        return cfg

    @property
    def default_cfg(self) -> dict[str, Any]:
        """Alias of :attr:`pretrained_cfg` (timm's older name)."""
        return self.pretrained_cfg

    @property
    def num_classes(self) -> int:
        """Classifier outputs of the inner model."""
        return int(self.model.num_classes)

    @property
    def num_features(self) -> int:
        """Feature width before the classifier."""
        return int(self.model.num_features)

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Set the input resolution: ViTs resample their position embedding; convnets need nothing.

        Args:
            img_size: New resolution (an int for square images).
        """
        fn = getattr(self.model, "set_input_size", None)
        if fn is None:
            _logger.debug("%s has no set_input_size; it runs at any resolution as is", type(self.model).__name__)
            return
        fn(img_size=to_2tuple(img_size))

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Enable or disable activation checkpointing in the inner model."""
        self.model.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Full parameter names (``model.`` prefixed) that the inner model exempts from weight decay."""
        fn = getattr(self.model, "no_weight_decay", None)
        return {f"model.{name}" for name in fn()} if fn is not None else set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The inner model's classifier layer."""
        return self.model.get_classifier()

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        """Replace the classifier (see timm's ``reset_classifier``)."""
        self.model.reset_classifier(num_classes, *args, **kwargs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features of a [0, 1] batch."""
        return self.model.forward_features(self.normalize(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Classifier head applied to :meth:`forward_features` output."""
        return self.model.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of an NCHW batch with pixel values in [0, 1]."""
        return self.model(self.normalize(x))


def _filter_fn(model: nn.Module) -> Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None:
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not arch or not is_model(arch):
        return None
    return _FILTERS.get(model_entrypoint(arch).__module__)


def load_checkpoint_into(model: NormalizedModel, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint",
                         hint: str = "") -> None:
    """Load weights of any supported layout into a :class:`NormalizedModel`, strictly.

    Wrapper prefixes are stripped, released normalization buffers checked against the model, reference ConvStem
    names mapped by the family's filter fn; a ViT is first set to the checkpoint's resolution (read from its
    ``pos_embed``) so that the weights load unchanged.

    Args:
        model: Target model, as returned by :func:`create_model`.
        state_dict: The weights.
        source: Name of the checkpoint for messages.
        hint: Extra sentence for the mismatch error.

    Raises:
        CheckpointError: Keys or shapes do not match, or the normalization differs.
    """
    inner_sd, norm = unwrap_state_dict(state_dict)
    check_normalization(norm, model.input_mean, model.input_std, source)
    inner = model.model
    pos = inner_sd.get("pos_embed")
    target = getattr(inner, "pos_embed", None)
    if (pos is not None and isinstance(target, torch.Tensor) and pos.shape != target.shape and pos.ndim == 3
            and pos.shape[-1] == target.shape[-1] and hasattr(inner, "set_input_size")):
        num_prefix = 0 if getattr(inner, "no_embed_class", False) else getattr(inner, "num_prefix_tokens", 1)
        grid = checkpoint_grid_size(pos, num_prefix)
        patch = inner.patch_embed.patch_size
        res = (grid[0] * patch[0], grid[1] * patch[1])
        _logger.info("%s was trained at %dx%d px; building the model at that resolution to load it", source, *res)
        inner.set_input_size(img_size=res)
    filter_fn = _filter_fn(inner)
    if filter_fn is not None:
        inner_sd = filter_fn(inner_sd, inner)
    load_state_dict_strict(inner, inner_sd, source=source, hint=hint)


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


def create_model(
        name: str,
        checkpoint: str | Path | Mapping[str, Any] | None = None,
        img_size: int | None = None,
        *,
        normalize: bool | None = None,
        use_ema: bool = False,
        **kwargs: Any,
) -> NormalizedModel:
    """Build a [0, 1]-input classifier, optionally load a checkpoint, optionally set the resolution.

    Args:
        name: Any registered timm model (rat's ``*_cvst`` models, ``resnet50``, ``vit_small_patch16_224``, ...),
            optionally with a pretrained tag (``convnext_tiny_cvst.rat_in1k_linf4``).
        checkpoint: Path (torch or ``.safetensors``) or already loaded dict: a rat trainer checkpoint, a state dict
            (rat or timm keys), or a revisiting-at release. Loaded strictly with ``weights_only=True``.
        img_size: Input resolution. ViTs resample their position embedding to it (after loading a checkpoint at its
            own resolution); convnets run at any resolution. None: the checkpoint's resolution, else the cfg's.
        normalize: Put ImageNet-style mean/std normalization (from the pretrained cfg) inside the model; False for
            models trained on raw [0, 1] inputs. None: from the checkpoint (:func:`resolve_normalization`: a rat
            trainer checkpoint's record, released normalize.* buffers, or the paper's release table); a checkpoint
            that does not say is refused. Without a checkpoint None means True.
        use_ema: Load the checkpoint's EMA weights (``model_ema``/``state_dict_ema``).
        **kwargs: Passed to ``timm.create_model`` (num_classes, drop_path_rate, in_chans, ...).

    Returns:
        The model, in train mode, on the CPU (or the default device).

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
    fixed_size = bool(cfg is not None and cfg.fixed_input_size)
    if img_size is not None and fixed_size and state is None:
        build_kwargs["img_size"] = img_size  # build at the target size: position embeddings start untouched
    model = NormalizedModel(timm.create_model(name, **build_kwargs), normalize=normalize)
    if state is not None:
        load_checkpoint_into(model, state, source=source, hint=hint)
        _logger.info("Loaded %s into %s", source, name)
    if img_size is not None:
        model.set_input_size(img_size)
    return model


def create_model_from_checkpoint(
        checkpoint: str | Path | Mapping[str, Any],
        img_size: int | None = None,
        *,
        use_ema: bool = False,
        **overrides: Any,
) -> NormalizedModel:
    """Rebuild a model from a rat trainer checkpoint, which records ``arch`` and ``model_kwargs``.

    Args:
        checkpoint: Path or loaded dict of a checkpoint written by ``rat.train``.
        img_size: Evaluation resolution; None keeps the training resolution (``model_kwargs['img_size']``).
        use_ema: Load the EMA weights.
        **overrides: Replace entries of the recorded ``model_kwargs`` (e.g. ``drop_path_rate=0.0``).

    Returns:
        The model with the checkpoint's weights.
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
    kwargs = dict(ckpt["model_kwargs"])
    kwargs.update(overrides)
    train_size = kwargs.pop("img_size", None)
    if isinstance(train_size, (tuple, list)):
        train_size = int(train_size[-1])
    model = create_model(ckpt["arch"], checkpoint=ckpt, img_size=img_size if img_size is not None else train_size,
                         use_ema=use_ema, **kwargs)
    return model
