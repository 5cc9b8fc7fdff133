"""ViT-CvSt: timm's VisionTransformer whose patch projection is a ConvStem (Singh, Croce & Hein, 2023).

The 16x16 patchify convolution inside ``PatchEmbed`` becomes four 3x3 stride-2 convs (48 -> 96 -> 192 -> 384, each
followed by LayerNorm + GELU) and a 1x1 projection to the embedding width, so the stem lives at
``patch_embed.proj.*`` exactly where the reference put it (``patch_embed.proj.stem.N.*`` in released checkpoints).

* ViT-S-CvSt: DeiT-S / ViT-S (dim 384, depth 12, 6 heads, class token)
* ViT-M-CvSt: DeiT-III medium (dim 512, depth 12, 8 heads, LayerScale 1e-6, position embedding without class token)
* ViT-B-CvSt: ViT-B (dim 768, depth 12, 12 heads)

Resolution: the model is built (or ``set_input_size``-d) at the size it should run at, and a checkpoint trained at
another size is adapted to the model: :func:`checkpoint_filter_fn` resamples its ``pos_embed`` with timm's
``resample_abs_pos_embed``, the call ``set_input_size`` makes.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from .convnext_cvst import LINF4_DESCRIPTION, PAPER
from .layers import ConvStem
from .weights import filter_state_dict, remap_reference_stem

_logger = logging.getLogger(__name__)

__all__ = ["ConvStemPatchEmbed", "checkpoint_filter_fn"]


class ConvStemPatchEmbed(PatchEmbed):
    """timm ``PatchEmbed`` whose projection is a :class:`~rat.models.layers.ConvStem` of total stride ``patch_size``.

    Args:
        img_size: Input resolution.
        patch_size: Patch size; must equal the product of ``stem_strides``.
        in_chans: Input image channels.
        embed_dim: Embedding width (the stem's 1x1 projection output).
        stem_channels: Output channels of the stem's 3x3 convs.
        stem_strides: Stride of each stem conv.
        device: Device to create parameters on.
        dtype: Parameter dtype.
        **kwargs: Passed to ``PatchEmbed`` (norm_layer, flatten, output_fmt, strict_img_size, dynamic_img_pad, ...);
            ``bias`` is ignored (the stem convs always have biases, as in the reference).
    """

    def __init__(
            self,
            img_size: int | tuple[int, int] | None = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            embed_dim: int = 768,
            stem_channels: Sequence[int] = (48, 96, 192, 384),
            stem_strides: Sequence[int] = (2, 2, 2, 2),
            device: torch.device | str | None = None,
            dtype: torch.dtype | None = None,
            **kwargs: Any,
    ) -> None:
        kwargs.pop("bias", None)
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         device=device, dtype=dtype, **kwargs)
        stem = ConvStem(in_chans, stem_channels, stem_strides, out_chs=embed_dim, device=device, dtype=dtype)
        if to_2tuple(stem.stride) != self.patch_size:
            raise ValueError(f"ConvStem strides {tuple(stem_strides)} give stride {stem.stride}, "
                             f"but patch_size is {patch_size}")
        self.proj = stem

    def set_input_size(
            self,
            img_size: int | tuple[int, int] | None = None,
            patch_size: int | tuple[int, int] | None = None,
    ) -> None:
        """Change the input resolution (the patch size is fixed by the stem's strides)."""
        if patch_size is not None and to_2tuple(patch_size) != self.patch_size:
            raise ValueError(f"the ConvStem fixes the patch size to {self.patch_size}; cannot change it to "
                             f"{patch_size}")
        super().set_input_size(img_size=img_size)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Map rat, timm and revisiting-at checkpoints onto a ViT-CvSt (no key is dropped).

    :func:`~rat.models.weights.filter_state_dict` (wrapper prefixes, released normalization buffers checked
    against the model's, ``pos_embed`` resampled to the model's grid), then the reference stem's names
    (``patch_embed.proj.stem.N.*``).

    Args:
        state_dict: Weights in any supported layout (see :mod:`rat.models.weights`).
        model: The target model.

    Returns:
        Weights keyed like ``model.state_dict()``; anything unmappable stays as is so the strict load reports it.
    """
    return remap_reference_stem(filter_state_dict(state_dict, model), "patch_embed.proj.stem.", "patch_embed.proj.")


def _create_vit_cvst(variant: str, pretrained: bool = False, stem_channels: Sequence[int] = (48, 96, 192, 384),
                     stem_strides: Sequence[int] = (2, 2, 2, 2), **kwargs: Any) -> VisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        VisionTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        embed_layer=partial(ConvStemPatchEmbed, stem_channels=tuple(stem_channels), stem_strides=tuple(stem_strides)),
        **kwargs)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj.0.conv", "classifier": "head",
        **PAPER, **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "vit_small_patch16_cvst.rat_in1k_linf4": _cfg(description=LINF4_DESCRIPTION),
    "vit_medium_patch16_cvst.rat_in1k_linf4": _cfg(description=LINF4_DESCRIPTION),
    "vit_base_patch16_cvst.rat_in1k_linf4": _cfg(description=LINF4_DESCRIPTION),
    "vit_micro_patch16_cvst": _cfg(input_size=(3, 64, 64),
                                   description="tiny CPU demo/test variant, no weights"),
})


@register_model
def vit_small_patch16_cvst(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-S-CvSt (22.8M params): ViT-S/16 with a ConvStem 48 -> 96 -> 192 -> 384 -> 1x1 384."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_vit_cvst("vit_small_patch16_cvst", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_medium_patch16_cvst(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-M-CvSt (39.5M params): DeiT-III medium/16 with a ConvStem 48 -> 96 -> 192 -> 384 -> 1x1 512."""
    model_args = dict(patch_size=16, embed_dim=512, depth=12, num_heads=8, no_embed_class=True, init_values=1e-6)
    return _create_vit_cvst("vit_medium_patch16_cvst", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_base_patch16_cvst(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-B-CvSt (87.1M params): ViT-B/16 with a ConvStem 48 -> 96 -> 192 -> 384 -> 1x1 768."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_vit_cvst("vit_base_patch16_cvst", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_micro_patch16_cvst(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """A tiny ViT-CvSt for CPU demos and tests (64 px by default, 32-64 px work)."""
    model_args = dict(patch_size=16, embed_dim=64, depth=4, num_heads=2,
                      stem_channels=(8, 16, 32, 64), stem_strides=(2, 2, 2, 2))
    return _create_vit_cvst("vit_micro_patch16_cvst", pretrained=pretrained, **dict(model_args, **kwargs))
