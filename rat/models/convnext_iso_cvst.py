"""Isotropic ConvNeXt with a ConvStem (ConvNeXt-iso-CvSt of Singh, Croce & Hein, 2023).

The isotropic ConvNeXt (Liu et al. 2022, section 3.3) keeps one resolution and width throughout: a stride-16 stem and
``depth`` ConvNeXt blocks without LayerScale. The CvSt variant replaces the 16x16 patchify stem by the ViT ConvStem
(48 -> 96 -> 192 -> 384, all stride 2, then a 1x1 projection to ``dim``). timm has no isotropic ConvNeXt, so this
file builds it from timm's ``ConvNeXtBlock`` and ``NormMlpClassifierHead`` (pool -> LayerNorm -> fc, the order of the
original). Released checkpoints use the original ConvNeXt repository's names (``dwconv``, ``pwconv1``, ``norm``,
``head``); :func:`checkpoint_filter_fn` maps them.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import NormMlpClassifierHead, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXtBlock
from torch import nn

from .convnext_cvst import LINF4_DESCRIPTION, PAPER
from .layers import ConvStem
from .weights import filter_state_dict, remap_reference_stem

_logger = logging.getLogger(__name__)

__all__ = ["ConvNeXtIsotropicCvSt", "checkpoint_filter_fn"]


class ConvNeXtIsotropicCvSt(nn.Module):
    """Isotropic ConvNeXt with a ConvStem of total stride 16.

    Args:
        in_chans: Input image channels.
        num_classes: Classifier outputs (0 for no classifier).
        global_pool: Global pooling type of the head.
        dim: Width of every block.
        depth: Number of ConvNeXt blocks.
        stem_channels: Output channels of the stem's 3x3 convs (a 1x1 projection to ``dim`` follows).
        stem_strides: Stride of each stem conv; their product is the patch size.
        ls_init_value: LayerScale init value, None (the paper's setting) for no LayerScale.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth rate, increased linearly over the blocks.
        device: Device to create parameters on.
        dtype: Parameter dtype.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            dim: int = 384,
            depth: int = 18,
            stem_channels: Sequence[int] = (48, 96, 192, 384),
            stem_strides: Sequence[int] = (2, 2, 2, 2),
            ls_init_value: float | None = None,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            device: torch.device | str | None = None,
            dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.num_features = self.head_hidden_size = dim
        self.stem = ConvStem(in_chans, stem_channels, stem_strides, out_chs=dim, **dd)
        dp_rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist() if depth > 0 else []
        self.blocks = nn.Sequential(*[
            ConvNeXtBlock(dim, ls_init_value=ls_init_value, drop_path=dp_rates[i], **dd) for i in range(depth)])
        self.feature_info = [dict(num_chs=dim, reduction=self.stem.stride, module=f"blocks.{i}") for i in range(depth)]
        self.head = NormMlpClassifierHead(dim, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        # trunc-normal init of blocks and head as in the original; the stem keeps PyTorch's default init, as in the
        # reference, which swapped the stem in after construction.
        for module in [self.blocks, self.head]:
            for m in module.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regexes grouping parameters into stem and blocks (for layer-wise lr decay)."""
        return dict(stem=r"^stem", blocks=r"^blocks\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Enable or disable activation checkpointing over the blocks."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final linear classifier."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs."""
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and blocks: ``(N, C, H, W) -> (N, dim, H / 16, W / 16)``."""
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, LayerNorm and (unless ``pre_logits``) classify."""
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a normalized NCHW batch."""
        return self.forward_head(self.forward_features(x))


_REFERENCE_RENAMES = (
    (re.compile(r"^blocks\.(\d+)\.dwconv\."), r"blocks.\1.conv_dw."),
    (re.compile(r"^blocks\.(\d+)\.pwconv([12])\."), r"blocks.\1.mlp.fc\2."),
    (re.compile(r"^norm\.(weight|bias)$"), r"head.norm.\1"),
    (re.compile(r"^head\.(weight|bias)$"), r"head.fc.\1"),
)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: ConvNeXtIsotropicCvSt,
                         ) -> dict[str, torch.Tensor]:
    """Map rat and revisiting-at (original ConvNeXt naming) checkpoints onto :class:`ConvNeXtIsotropicCvSt`.

    Args:
        state_dict: Weights in any supported layout (see :mod:`rat.models.weights`).
        model: The target model.

    Returns:
        Weights keyed like ``model.state_dict()``; anything unmappable stays as is so the strict load reports it.
    """
    state_dict = remap_reference_stem(filter_state_dict(state_dict, model), "stem.stem.", "stem.")
    out = {}
    for k, v in state_dict.items():
        for pattern, replacement in _REFERENCE_RENAMES:
            k = pattern.sub(replacement, k)
        out[k] = v
    return out


def _create_convnext_iso_cvst(variant: str, pretrained: bool = False, **kwargs: Any) -> ConvNeXtIsotropicCvSt:
    depth = int(kwargs.get("depth", 18))
    return build_model_with_cfg(
        ConvNeXtIsotropicCvSt, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=tuple(range(depth))[-4:]),  # features of the last blocks
        **kwargs)


default_cfgs = generate_default_cfgs({
    "convnext_iso_small_cvst.rat_in1k_linf4": {
        "url": "",
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (14, 14),
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0.conv", "classifier": "head.fc",
        "description": LINF4_DESCRIPTION,
        **PAPER,
    },
})


@register_model
def convnext_iso_small_cvst(pretrained: bool = False, **kwargs: Any) -> ConvNeXtIsotropicCvSt:
    """ConvNeXt-iso-CvSt (23.0M params): isotropic ConvNeXt, dim 384, depth 18, ConvStem to 384 at stride 16."""
    model_args = dict(dim=384, depth=18, stem_channels=(48, 96, 192, 384), stem_strides=(2, 2, 2, 2))
    return _create_convnext_iso_cvst("convnext_iso_small_cvst", pretrained=pretrained, **dict(model_args, **kwargs))
