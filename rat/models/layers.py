"""Building blocks shared by the rat model families: the ConvStem and the input normalizer."""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from timm.layers import ConvNormAct, LayerNorm2d
from torch import nn

_logger = logging.getLogger(__name__)

__all__ = ["ConvStem", "ImageNormalizer"]


class ConvStem(nn.Sequential):
    """Convolutional stem of the paper's CvSt models (Singh, Croce & Hein, NeurIPS 2023).

    A stack of ``k x k`` convolutions (with bias), each followed by a channels-first LayerNorm and GELU, optionally
    closed by a ``1 x 1`` projection convolution (with bias, no norm, no activation). The ViT-CvSt models use the
    projection to reach the embedding width; the ConvNeXt-CvSt models end on LayerNorm + GELU and feed the first stage
    directly. Layer ``i`` is ``ConvNormAct`` number ``i`` (timm's block, whose norm keeps timm's historic name ``bn``),
    so parameters are named ``{i}.conv.weight``, ``{i}.conv.bias``, ``{i}.bn.weight``, ``{i}.bn.bias`` and the
    projection is layer ``len(channels)``.

    Args:
        in_chans: Input image channels.
        channels: Output channels of each ``k x k`` convolution, e.g. ``(48, 96, 192, 384)``.
        strides: Stride of each ``k x k`` convolution; their product is the stem's total stride.
        kernel_sizes: Kernel size of each ``k x k`` convolution (an int applies to all). Padding is ``k // 2``.
        out_chs: Output channels of the closing ``1 x 1`` projection; None for no projection.
        norm_eps: LayerNorm epsilon (the reference uses 1e-6).
        act_layer: Activation after each norm.
        device: Device to create parameters on.
        dtype: Parameter dtype.
    """

    def __init__(
            self,
            in_chans: int = 3,
            channels: Sequence[int] = (48, 96),
            strides: Sequence[int] = (2, 2),
            kernel_sizes: int | Sequence[int] = 3,
            out_chs: int | None = None,
            norm_eps: float = 1e-6,
            act_layer: type[nn.Module] = nn.GELU,
            device: torch.device | str | None = None,
            dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        strides = tuple(int(s) for s in strides)
        if isinstance(kernel_sizes, int):
            kernel_sizes = (kernel_sizes,) * len(channels)
        kernel_sizes = tuple(int(k) for k in kernel_sizes)
        if not channels or len(strides) != len(channels) or len(kernel_sizes) != len(channels):
            raise ValueError(
                f"ConvStem needs one stride and one kernel size per conv layer, got channels={channels}, "
                f"strides={strides}, kernel_sizes={kernel_sizes}")
        dd = {"device": device, "dtype": dtype}
        in_chs = in_chans
        for i, (chs, stride, kernel) in enumerate(zip(channels, strides, kernel_sizes)):
            self.add_module(str(i), ConvNormAct(
                in_chs, chs, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=True,
                norm_layer=LayerNorm2d, act_layer=act_layer, norm_kwargs={"eps": norm_eps}, **dd))
            in_chs = chs
        if out_chs is not None:
            self.add_module(str(len(channels)), ConvNormAct(
                in_chs, out_chs, kernel_size=1, stride=1, padding=0, bias=True, apply_norm=False, apply_act=False,
                **dd))
            in_chs = out_chs
        self.channels = channels
        self.strides = strides
        self.kernel_sizes = kernel_sizes
        self.out_chs = in_chs
        self.has_proj = out_chs is not None
        self.stride = 1
        for s in strides:
            self.stride *= s


class ImageNormalizer(nn.Module):
    """Maps images in [0, 1] to ``(x - mean) / std``, the normalization a classifier was trained with.

    The buffers are not persistent: mean and std come from the model's pretrained config, so checkpoints need not
    carry them (released checkpoints that do are checked against them when loading). ``mean_values`` and
    ``std_values`` keep them as floats (readable on the meta device too).

    :meth:`normalize_input` is the forward pre-hook with which :func:`rat.models.create_model` puts it in front of a
    timm model's input module.

    Args:
        mean: Per-channel mean.
        std: Per-channel standard deviation (all > 0).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean = tuple(float(m) for m in mean)
        std = tuple(float(s) for s in std)
        if len(mean) != len(std) or not mean:
            raise ValueError(f"mean and std must have one entry per channel, got mean={mean}, std={std}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {std}")
        self.mean_values, self.std_values = mean, std
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize an NCHW batch in [0, 1]."""
        return (x - self.mean) / self.std

    def normalize_input(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Forward pre-hook: normalize the first positional input of ``module``, pass the rest unchanged."""
        return (self(args[0]), *args[1:])

    def extra_repr(self) -> str:
        return f"mean={[round(v, 4) for v in self.mean_values]}, std={[round(v, 4) for v in self.std_values]}"
