"""ConvNeXt-CvSt: timm's ConvNeXt with the 4x4 patchify stem replaced by a ConvStem (Singh, Croce & Hein, 2023).

Stems (3x3 convs, LayerNorm + GELU after each, no projection), from the paper's code:

* ConvNeXt-T/S: 48 -> 96, strides (2, 2)
* ConvNeXt-B:   64 -> 96 -> 128, strides (2, 2, 1)
* ConvNeXt-L:   96 -> 144 -> 192, strides (2, 2, 1)

The rest of the network is timm's ConvNeXt (LayerScale 1e-6, pool -> LayerNorm -> fc head), so parameter names
outside the stem are timm's. Released revisiting-at checkpoints keep the stem under ``stem.stem.N.*``;
:func:`checkpoint_filter_fn` maps them (and every wrapper prefix) onto these models.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXt

from rat.data.crop import VAL_CROP_RATIO

from .layers import ConvStem
from .weights import filter_state_dict, remap_reference_stem

_logger = logging.getLogger(__name__)

__all__ = ["ConvNeXtCvSt", "checkpoint_filter_fn"]

PAPER = {
    "paper_ids": "arXiv:2303.01870",
    "paper_name": "Revisiting Adversarial Training for ImageNet: Architectures, Training and Generalization across "
                  "Threat Models",
    "origin_url": "https://github.com/nmndeep/revisiting-at",
    # What timm's resolve_data_config hands a user: the evaluation protocol's centre crop (RobustBench's ImageNet
    # preprocessing, Resize(floor(r / 0.875), bicubic) + CenterCrop(r));
    # its one owner is rat.data.crop.VAL_CROP_RATIO.
    "crop_pct": VAL_CROP_RATIO, "interpolation": "bicubic",
}


class ConvNeXtCvSt(ConvNeXt):
    """ConvNeXt whose stem is a :class:`~rat.models.layers.ConvStem` of total stride 4.

    Args:
        stem_channels: Output channels of the stem convs; the last must equal ``dims[0]``.
        stem_strides: Stride of each stem conv; their product must be 4 (the stage layout of ConvNeXt).
        in_chans: Input image channels.
        dims: Feature dimension of each stage.
        device: Device to create parameters on.
        dtype: Parameter dtype.
        **kwargs: Passed to timm's ``ConvNeXt`` (depths, ls_init_value, drop_path_rate, num_classes, ...).
    """

    def __init__(
            self,
            stem_channels: Sequence[int] = (48, 96),
            stem_strides: Sequence[int] = (2, 2),
            in_chans: int = 3,
            dims: Sequence[int] = (96, 192, 384, 768),
            device: torch.device | str | None = None,
            dtype: torch.dtype | None = None,
            **kwargs: Any,
    ) -> None:
        if kwargs.get("stem_type", "patch") != "patch" or kwargs.get("patch_size", 4) != 4:
            raise ValueError("ConvNeXtCvSt replaces the stem; do not pass stem_type or patch_size")
        super().__init__(in_chans=in_chans, dims=tuple(dims), device=device, dtype=dtype, **kwargs)
        stem = ConvStem(in_chans, stem_channels, stem_strides, device=device, dtype=dtype)
        if stem.out_chs != dims[0] or stem.stride != 4:
            raise ValueError(
                f"the ConvStem must end at dims[0]={dims[0]} channels with total stride 4, got channels "
                f"{tuple(stem_channels)} and strides {tuple(stem_strides)}")
        # PyTorch default init for the stem convs, as in the reference (it swapped the stem in after construction).
        self.stem = stem


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: ConvNeXtCvSt) -> dict[str, torch.Tensor]:
    """Map rat, timm and revisiting-at checkpoints onto a :class:`ConvNeXtCvSt` (no key is dropped).

    Args:
        state_dict: Weights in any supported layout (see :mod:`rat.models.weights`).
        model: The target model.

    Returns:
        Weights keyed like ``model.state_dict()``; anything unmappable stays as is so the strict load reports it.
    """
    return remap_reference_stem(filter_state_dict(state_dict, model), "stem.stem.", "stem.")


def _create_convnext_cvst(variant: str, pretrained: bool = False, **kwargs: Any) -> ConvNeXtCvSt:
    return build_model_with_cfg(
        ConvNeXtCvSt, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0.conv", "classifier": "head.fc",
        **PAPER, **kwargs,
    }


# No weights are downloadable: a tag names a kind of weights that loads from a local file, e.g.
# timm.create_model('convnext_tiny_cvst.rat_in1k_linf4', pretrained=True, pretrained_cfg_overlay=dict(file=path)).
LINF4_DESCRIPTION = "ImageNet-1k, Linf 4/255 adversarial training (the paper's release or a rat run); local file only"
default_cfgs = generate_default_cfgs({
    "convnext_tiny_cvst.rat_in1k_linf4": _cfg(description=LINF4_DESCRIPTION),
    "convnext_small_cvst.rat_in1k_linf4": _cfg(description=LINF4_DESCRIPTION),
    "convnext_base_cvst.rat_in1k_linf4": _cfg(description=LINF4_DESCRIPTION),
    "convnext_large_cvst.rat_in1k_linf4": _cfg(description=LINF4_DESCRIPTION),
    "convnext_micro_cvst": _cfg(input_size=(3, 64, 64), pool_size=(2, 2),
                                description="tiny CPU demo/test variant, no weights"),
})


@register_model
def convnext_tiny_cvst(pretrained: bool = False, **kwargs: Any) -> ConvNeXtCvSt:
    """ConvNeXt-T-CvSt (28.6M params): ConvNeXt-T with a 48 -> 96 ConvStem."""
    model_args = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), stem_channels=(48, 96), stem_strides=(2, 2))
    return _create_convnext_cvst("convnext_tiny_cvst", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_small_cvst(pretrained: bool = False, **kwargs: Any) -> ConvNeXtCvSt:
    """ConvNeXt-S-CvSt (50.3M params): ConvNeXt-S with a 48 -> 96 ConvStem."""
    model_args = dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), stem_channels=(48, 96), stem_strides=(2, 2))
    return _create_convnext_cvst("convnext_small_cvst", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_base_cvst(pretrained: bool = False, **kwargs: Any) -> ConvNeXtCvSt:
    """ConvNeXt-B-CvSt (88.8M params): ConvNeXt-B with a 64 -> 96 -> 128 ConvStem."""
    model_args = dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), stem_channels=(64, 96, 128),
                      stem_strides=(2, 2, 1))
    return _create_convnext_cvst("convnext_base_cvst", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_large_cvst(pretrained: bool = False, **kwargs: Any) -> ConvNeXtCvSt:
    """ConvNeXt-L-CvSt (198.1M params): ConvNeXt-L with a 96 -> 144 -> 192 ConvStem."""
    model_args = dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536), stem_channels=(96, 144, 192),
                      stem_strides=(2, 2, 1))
    return _create_convnext_cvst("convnext_large_cvst", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_micro_cvst(pretrained: bool = False, **kwargs: Any) -> ConvNeXtCvSt:
    """A tiny ConvNeXt-CvSt for CPU demos and tests (64 px by default, 32-64 px work).

    Without LayerScale: with one or two blocks per stage, blocks that start as the identity (gamma 1e-6) leave the
    net nearly linear for hundreds of steps; measured on the demo data, 54 % vs ~20 % val accuracy after 500 steps.
    """
    model_args = dict(depths=(1, 1, 2, 1), dims=(32, 64, 128, 256), stem_channels=(16, 32), stem_strides=(2, 2),
                      ls_init_value=None)
    return _create_convnext_cvst("convnext_micro_cvst", pretrained=pretrained, **dict(model_args, **kwargs))
