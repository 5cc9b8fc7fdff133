"""Heavy augmentation applied batch-wise on the training device, per sample: RandAugment and random erasing.

timm's RandAugment works on one PIL image at a time, which is why reference code leaves FFCV for a torch
``DataLoader``. Here the same policy runs on a decoded ``[0, 1]`` batch (any device, any memory format): every image
draws its own ops, magnitudes, signs and erase boxes, and the images that drew the same op are processed together.

RandAugment semantics matched (timm 1.0 ``rand_augment_transform``, e.g. ``'rand-m9-mstd0.5-inc1'``):

* ``n`` layers (default 2); in each, every image picks one op uniformly (with replacement across layers) and applies
  it with probability ``p`` (default 0.5);
* magnitude per image and layer: ``m`` (``mN``), plus Gaussian noise ``mstd`` (uniform in ``[0, m]`` if ``mstd`` >
  100), clipped to ``[0, mmax]`` (default 10); level = magnitude / 10;
* ops (``inc1`` set; the ``inc0`` set replaces the *Increasing* ops by the plain ones) and their arguments:

  ==================== ===========================================================================================
  AutoContrast         per channel, stretch [min, max] to [0, 1]
  Equalize             per-channel histogram equalization (PIL ``ImageOps.equalize`` on 8-bit values)
  Invert               ``1 - x``
  Rotate               ``30 * level`` degrees, random sign, about the centre
  PosterizeIncreasing  keep ``4 - int(4 * level)`` bits (Posterize: ``int(4 * level)``)
  SolarizeIncreasing   invert 8-bit values ``>= 256 - int(256 * level)`` (Solarize: ``>= int(256 * level)``)
  SolarizeAdd          add ``min(128, int(110 * level))`` / 255 to 8-bit values below 128
  ColorIncreasing      blend with greyscale, factor ``max(0.1, 1 ± 0.9 * level)`` (Color: ``0.1 + 1.8 * level``)
  ContrastIncreasing   blend with the mean grey level, same factor
  BrightnessIncreasing blend with black, same factor
  SharpnessIncreasing  blend with the 3x3 SMOOTH-filtered image (borders kept), same factor
  ShearX / ShearY      shear ``0.3 * level``, random sign (PIL affine: origin at the top-left corner)
  TranslateXRel / YRel ``0.45 * level`` of the width / height, random sign
  ==================== ===========================================================================================

  Geometric ops fill uncovered pixels with ``fill`` (timm uses the transform's mean; the reference recipe ran timm
  with ``mean=(0, 0, 0)``, hence black, the default) and interpolate bicubic (the reference
  ``--train_interpolation bicubic``), bilinear, or a per-image random choice of the two (timm's ``'random'``).

Differences from timm, by design: the ops work on float images (timm rounds to 8 bits after every op; the 8-bit ops
here quantize their input), and geometric ops resample with ``grid_sample``, not PIL, so edge pixels differ slightly.

Random erasing (timm ``RandomErasing`` semantics: probability ``p``; box area ``U(0.02, 1/3)`` of the image over
``count``; log-uniform aspect in ``[0.3, 1/0.3]``; up to 10 tries for a box that fits; ``'pixel'`` mode fills
per-pixel normal noise, ``'rand'`` one normal colour per box, ``'const'`` zeros) is implemented batched here: timm's
loops over images in Python with the global ``random`` module, so it cannot follow a ``torch.Generator``. timm erases
*normalized* tensors; the noise here is ``mean + std * N(0, 1)`` with ``mean=(0, 0, 0), std=(1, 1, 1)`` by default
(the reference recipe's un-normalized pipeline) and is clipped to ``[0, 1]``, so batches keep the [0, 1] contract
that attacks rely on.

Mixup/CutMix and label smoothing are timm's ``Mixup``: :func:`build_mixup`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "RAND_INCREASING_OPS", "RAND_OPS", "BatchAugment", "BatchRandAugment", "BatchRandomErasing", "GroupMixup",
    "RandAugmentSpec", "build_augment", "build_mixup", "parse_rand_augment",
]

_logger = logging.getLogger(__name__)

LEVEL_DENOM = 10.0
RAND_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
CUTOUT_MAX = 0.2  # Cutout's square side at magnitude 10, as a fraction of the shorter image side
INTERPOLATIONS = ("bilinear", "bicubic", "random")
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # PIL's ITU-R 601-2 luma, as in Image.convert('L')
_BICUBIC_A = -0.75  # the bicubic kernel of torch's grid_sample (PIL uses -0.5)


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed timm RandAugment string (see :func:`parse_rand_augment`)."""

    magnitude: float = 10.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    magnitude_max: float = LEVEL_DENOM
    increasing: bool = False

    @property
    def ops(self) -> tuple[str, ...]:
        return RAND_INCREASING_OPS if self.increasing else RAND_OPS


def parse_rand_augment(config: str) -> RandAugmentSpec:
    """Parse a timm RandAugment string such as ``'rand-m9-mstd0.5-inc1'`` (sections ``m n p mstd mmax inc``).

    Raises:
        ValueError: not a ``rand-...`` string, an unknown section, or a transform-set section (``t...``).
    """
    parts = config.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment config {config!r} must start with 'rand-' (e.g. 'rand-m9-mstd0.5-inc1')")
    values: dict[str, float] = {}
    for part in parts[1:]:
        if part.startswith("t"):
            raise ValueError(f"RandAugment config {config!r}: transform sets ('{part}') are not supported; use the "
                             "default set (inc0) or the increasing set (inc1)")
        pieces = re.split(r"(\d.*)", part)
        if len(pieces) < 2 or pieces[0] not in ("m", "n", "p", "mstd", "mmax", "inc"):
            raise ValueError(f"RandAugment config {config!r}: unknown section {part!r} (known: m, n, p, mstd, "
                             "mmax, inc)")
        try:
            values[pieces[0]] = float(pieces[1])
        except ValueError as exc:
            raise ValueError(f"RandAugment config {config!r}: section {part!r} has no number") from exc
    mstd = values.get("mstd", 0.0)
    return RandAugmentSpec(
        magnitude=float(int(values.get("m", LEVEL_DENOM))),
        num_layers=int(values.get("n", 2)),
        prob=values.get("p", 0.5),
        magnitude_std=math.inf if mstd > 100 else mstd,
        magnitude_max=float(int(values.get("mmax", LEVEL_DENOM))),
        increasing=bool(int(values.get("inc", 0))),
    )


def level_to_arg(name: str, magnitude: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Per-image op argument from magnitude (0..10) and sign (+1/-1), as timm's ``LEVEL_TO_ARG`` (sign where timm
    negates at random)."""
    level = magnitude / LEVEL_DENOM
    if name == "Rotate":
        return level * 30.0 * sign
    if name in ("ShearX", "ShearY"):
        return level * 0.3 * sign
    if name in ("TranslateXRel", "TranslateYRel"):
        return level * 0.45 * sign
    if name == "Posterize":
        return torch.floor(level * 4)
    if name == "PosterizeIncreasing":
        return 4 - torch.floor(level * 4)
    if name == "PosterizeOriginal":
        return torch.floor(level * 4) + 4
    if name == "Solarize":
        return torch.floor(level * 256).clamp(max=256)
    if name == "SolarizeIncreasing":
        return 256 - torch.floor(level * 256).clamp(max=256)
    if name == "SolarizeAdd":
        return torch.floor(level * 110).clamp(max=128)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return level * 1.8 + 0.1
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        return (1.0 + level * 0.9 * sign).clamp(min=0.1)
    if name == "Cutout":
        return level * CUTOUT_MAX
    return torch.zeros_like(magnitude)  # AutoContrast, Equalize, Invert take no argument


# ---------------------------------------------------------------------------------------------------------------------
# Ops on a float batch (n, 3, H, W) in [0, 1] with a per-image argument (n,). Each returns a new tensor.


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _to_levels(x: torch.Tensor) -> torch.Tensor:
    return (x * 255.0).round_().clamp_(0, 255)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (degenerate + _col(factor) * (x - degenerate)).clamp_(0.0, 1.0)


def auto_contrast(x: torch.Tensor, _arg: torch.Tensor | None = None) -> torch.Tensor:
    x = x.contiguous()  # per-image, per-channel reductions are many times slower on channels_last
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    spread = hi - lo
    ok = spread > 0
    scale = torch.where(ok, 1.0 / spread.clamp(min=1e-12), torch.ones_like(spread))
    lo = torch.where(ok, lo, torch.zeros_like(lo))
    return ((x - lo) * scale).clamp_(0.0, 1.0)


def equalize(x: torch.Tensor, _arg: torch.Tensor | None = None) -> torch.Tensor:
    n, c, h, w = x.shape
    q = _to_levels(x.contiguous()).to(torch.int64).view(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.int64, device=x.device).scatter_add_(1, q, torch.ones_like(q))
    last = hist.gather(1, q.amax(dim=1, keepdim=True))  # count of the highest level present
    step = torch.div(h * w - last, 255, rounding_mode="floor")
    usable = ((hist > 0).sum(dim=1, keepdim=True) > 1) & (step > 0)
    safe_step = step.clamp(min=1)
    before = hist.cumsum(dim=1) - hist  # pixels strictly below each level
    lut = torch.div(torch.div(safe_step, 2, rounding_mode="floor") + before, safe_step, rounding_mode="floor")
    lut = torch.where(usable, lut.clamp_(max=255), torch.arange(256, device=x.device))  # identity: left as is
    return lut.to(x.dtype).div_(255.0).gather(1, q).view(n, c, h, w)


def invert(x: torch.Tensor, _arg: torch.Tensor | None = None) -> torch.Tensor:
    return 1.0 - x


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    # Keeping the top ``bits`` of an 8-bit level is flooring it to a multiple of 2**(8 - bits): exact in float.
    step = _col(torch.exp2((8 - bits.to(x.dtype)).clamp(0, 8)))
    return torch.floor_(_to_levels(x).div_(step)).mul_(step).div_(255.0)


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    # round(255 x) >= t  <=>  x >= (t - 0.5) / 255 for integer t
    return torch.where(x >= _col((threshold.to(x.dtype) - 0.5) / 255.0), 1.0 - x, x)


def solarize_add(x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    return torch.where(x < 127.5 / 255.0, (x + _col(add.to(x.dtype)) / 255.0).clamp(max=1.0), x)


def color(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(_gray(x), x, factor)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = torch.floor(_gray(x).mean(dim=(1, 2, 3), keepdim=True) * 255.0 + 0.5) / 255.0
    return _blend(mean, x, factor)


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _col(factor)).clamp_(0.0, 1.0)


def sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # PIL's SMOOTH kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 = (3x3 box sum + 4 * centre) / 13, as a separable
    # box sum of shifted views (cheaper on CPU than avg_pool2d or a depthwise conv2d, in any memory format). PIL keeps
    # the border pixels, where the blend is then the identity.
    rows = x[..., :, :-2] + x[..., :, 1:-1] + x[..., :, 2:]
    inner = x[..., 1:-1, 1:-1]
    degenerate = (rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :] + 4.0 * inner) / 13.0
    out = x.clone()
    out[..., 1:-1, 1:-1] = _blend(degenerate, inner, factor)
    return out


_COLOR_OPS = {
    "AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert,
    "Posterize": posterize, "PosterizeIncreasing": posterize, "PosterizeOriginal": posterize,
    "Solarize": solarize, "SolarizeIncreasing": solarize, "SolarizeAdd": solarize_add,
    "Color": color, "ColorIncreasing": color, "Contrast": contrast, "ContrastIncreasing": contrast,
    "Brightness": brightness, "BrightnessIncreasing": brightness,
    "Sharpness": sharpness, "SharpnessIncreasing": sharpness,
}


def affine_theta(names: Sequence[str], args: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``affine_grid`` matrices (n, 2, 3) mapping output to input coordinates for PIL-style geometric ops.

    PIL's ``Image.transform(AFFINE, (a, b, c, d, e, f))`` samples the input at ``(a x + b y + c, d x + e y + f)``
    for output pixel ``(x, y)`` (origin top-left); ``rotate`` turns counter-clockwise about the centre. These are
    the same maps in ``grid_sample``'s normalized coordinates (``align_corners=False``).
    """
    n = len(names)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    a = args.detach().to("cpu", torch.float64)
    for i, name in enumerate(names):
        v = float(a[i])
        if name == "ShearX":  # x_in = x + v * y, y measured from the top edge
            theta[i, 0, 1] = v * height / width
            theta[i, 0, 2] = v * height / width
        elif name == "ShearY":  # y_in = v * x + y, x measured from the left edge
            theta[i, 1, 0] = v * width / height
            theta[i, 1, 2] = v * width / height
        elif name == "TranslateXRel":  # x_in = x + v * width
            theta[i, 0, 2] = 2.0 * v
        elif name == "TranslateYRel":
            theta[i, 1, 2] = 2.0 * v
        elif name == "Rotate":  # counter-clockwise by v degrees about the centre
            rad = math.radians(v)
            cos, sin = math.cos(rad), math.sin(rad)
            theta[i, 0, 0] = cos
            theta[i, 0, 1] = -sin * height / width
            theta[i, 1, 0] = sin * width / height
            theta[i, 1, 1] = cos
        else:
            raise ValueError(f"{name} is not a geometric op")
    return theta


def _affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``F.affine_grid(theta, (n, C, height, width), align_corners=False)`` in closed form: one broadcast add of an
    x term and a y term per image instead of a (H·W, 3) x (3, 2) ``bmm`` per image, which is slow on CPU."""
    xs = torch.arange(width, device=theta.device, dtype=theta.dtype).mul_(2.0).add_(1.0).div_(width).sub_(1.0)
    ys = torch.arange(height, device=theta.device, dtype=theta.dtype).mul_(2.0).add_(1.0).div_(height).sub_(1.0)
    x_term = xs.view(1, 1, width, 1) * theta[:, :, 0].view(-1, 1, 1, 2) + theta[:, :, 2].view(-1, 1, 1, 2)
    y_term = ys.view(1, height, 1, 1) * theta[:, :, 1].view(-1, 1, 1, 2)
    return x_term + y_term


def _taps(shift: float, mode: str) -> list[tuple[int, float]]:
    """``grid_sample``'s 1-D taps ``(offset, weight)`` for sampling at ``position + shift``: bilinear, or bicubic with
    torch's kernel (``A = -0.75``)."""
    base = math.floor(shift)
    t = shift - base
    if mode == "bilinear":
        return [(base, 1.0 - t), (base + 1, t)]
    a = _BICUBIC_A

    def near(d: float) -> float:
        return ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0

    def far(d: float) -> float:
        return ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a

    return [(base - 1, far(t + 1.0)), (base, near(t)), (base + 1, near(1.0 - t)), (base + 2, far(2.0 - t))]


def _shift(image: torch.Tensor, shift: float, dim: int, mode: str) -> torch.Tensor:
    """``image`` (C, H, W) sampled at ``position + shift`` along ``dim`` with zero padding: a translation as a few
    weighted slices, which is what ``grid_sample`` computes for it (the taps across ``dim`` have weights 0 and 1)."""
    size = image.shape[dim]
    out = torch.zeros_like(image)
    for offset, weight in _taps(shift, mode):
        lo, hi = max(0, -offset), min(size, size - offset)
        if weight != 0.0 and lo < hi:
            out.narrow(dim, lo, hi - lo).add_(image.narrow(dim, lo + offset, hi - lo), alpha=weight)
    return out


def geometric(x: torch.Tensor, theta: torch.Tensor, fill: torch.Tensor, mode: str) -> torch.Tensor:
    """Resample each image with its affine ``theta``; pixels from outside the image take ``fill`` (C,).

    Translations (``theta``'s linear part the identity: TranslateXRel/YRel) are resampled as weighted slices, the
    rest (Rotate, ShearX/Y) with ``grid_sample``; both are ``grid_sample``'s interpolation with zero padding.
    """
    colour = fill.to(device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    src = x - colour if bool(fill.any()) else x
    height, width = x.shape[2:]
    cpu_theta = theta.detach().to("cpu", torch.float64)
    translation = (cpu_theta[:, :, :2] == torch.eye(2, dtype=torch.float64)).all(dim=2).all(dim=1)
    rest = torch.nonzero(~translation).flatten()
    sampled = None
    if len(rest):
        grid = _affine_grid(theta[rest.to(theta.device)].to(device=x.device, dtype=x.dtype), height, width)
        sampled = F.grid_sample(src[rest.to(x.device)], grid, mode=mode, padding_mode="zeros", align_corners=False)
    if len(rest) == len(x):
        out = sampled
    else:
        # grid_sample writes NCHW: then collect every row in that layout (each is transposed once on the way back).
        out = torch.empty_like(src) if sampled is None else torch.empty(src.shape, dtype=src.dtype, device=src.device)
        for i in torch.nonzero(translation).flatten().tolist():
            image = src[i]
            shift_x, shift_y = float(cpu_theta[i, 0, 2]) * width / 2, float(cpu_theta[i, 1, 2]) * height / 2
            image = _shift(image, shift_x, 2, mode) if shift_x else image
            out[i] = _shift(image, shift_y, 1, mode) if shift_y else image
        if sampled is not None:
            out.index_copy_(0, rest.to(x.device), sampled)
    if src is not x:
        out.add_(colour)
    return out.clamp_(0.0, 1.0)


def _scatter(out: torch.Tensor, rows: torch.Tensor, result: torch.Tensor) -> None:
    """``out[rows] = result`` (``rows`` on the CPU). Between layouts (an NCHW result into a channels_last batch) one
    ``copy_`` per row, several times faster than ``index_copy_`` there."""
    if out.is_contiguous(memory_format=torch.channels_last) == result.is_contiguous(memory_format=torch.channels_last):
        out.index_copy_(0, rows.to(out.device), result)
        return
    for j, row in enumerate(rows.tolist()):
        out[row].copy_(result[j])


def _gather(out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of a batch, in its memory format (a channels_last batch is gathered as NHWC rows, a memcpy each;
    ``index_select`` on it would transpose them to NCHW)."""
    if out.is_contiguous() or not out.is_contiguous(memory_format=torch.channels_last):
        return out.index_select(0, idx)
    return out.permute(0, 2, 3, 1).index_select(0, idx).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------------------------------


def cutout_boxes(side: torch.Tensor, centre: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Cutout squares ``(n, 4)`` int64 ``(top, left, h, w)``: side ``round(side * min(height, width))`` pixels
    around ``centre`` (``(n, 2)`` uniform [0, 1) draws, row then column), clipped to the image."""
    px = torch.round(side.to(torch.float64) * min(height, width)).to(torch.int64)
    cy = torch.floor(centre[:, 0] * height).to(torch.int64)
    cx = torch.floor(centre[:, 1] * width).to(torch.int64)
    top, left = (cy - px // 2).clamp(min=0), (cx - px // 2).clamp(min=0)
    bottom, right = (cy - px // 2 + px).clamp(max=height), (cx - px // 2 + px).clamp(max=width)
    return torch.stack([top, left, (bottom - top).clamp(min=0), (right - left).clamp(min=0)], dim=1)


def box_mask(boxes: torch.Tensor, height: int, width: int, device: torch.device) -> torch.Tensor:
    """``(n, 1, H, W)`` bool: inside any of each image's boxes (``(n, k, 4)`` or ``(n, 4)`` ``(top, left, h, w)``)."""
    b = boxes.to(device).view(boxes.shape[0], -1, 4)
    ys = torch.arange(height, device=device).view(1, 1, height, 1)
    xs = torch.arange(width, device=device).view(1, 1, 1, width)
    top, left, h, w = (b[..., i].view(b.shape[0], -1, 1, 1) for i in range(4))
    return ((ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)).any(dim=1, keepdim=True)


def cutout(x: torch.Tensor, boxes: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Paint each image's box ``(top, left, h, w)`` (``boxes`` (n, 4)) with the colour ``fill`` (C,)."""
    colour = fill.to(device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return torch.where(box_mask(boxes, x.shape[2], x.shape[3], x.device), colour, x)


def apply_ops_(out: torch.Tensor, ops: Sequence[str], choice: torch.Tensor, magnitude: torch.Tensor,
               gen: torch.Generator, *, fill: torch.Tensor, interpolation: str,
               cutout_fill: torch.Tensor | None = None) -> None:
    """One layer of per-image ops on ``out`` (float NCHW, in place): image ``i`` gets ``ops[choice[i]]`` at
    ``magnitude[i]`` (0..10, timm's scale), or nothing where ``choice[i] < 0``. Geometric ops fill with ``fill``,
    Cutout paints ``cutout_fill`` (default ``fill``).

    The shared batched base of RandAugment and the adversarial policy. Draws from the CPU generator ``gen``, in this
    order: a sign per image (for the ops timm negates at random), an interpolation per image (used when
    ``interpolation='random'``), and, only when ``ops`` holds Cutout, a box centre per image. Images that drew the
    same colour op are processed together; all geometric ops of the layer go through one :func:`geometric` call per
    interpolation. Rows are gathered and written back in ``out``'s memory format.
    """
    n, _, height, width = out.shape
    sign = torch.where(torch.rand(n, generator=gen) > 0.5, -1.0, 1.0).to(torch.float64)
    bicubic = torch.rand(n, generator=gen) >= 0.5
    centres = torch.rand(n, 2, generator=gen, dtype=torch.float64) if "Cutout" in ops else None
    geo_rows: list[torch.Tensor] = []
    geo_names: list[str] = []
    geo_args: list[torch.Tensor] = []
    for k, name in enumerate(ops):
        rows = torch.nonzero(choice == k).flatten()
        if len(rows) == 0:
            continue
        arg = level_to_arg(name, magnitude[rows], sign[rows])
        if name in GEOMETRIC_OPS:
            geo_rows.append(rows)
            geo_names += [name] * len(rows)
            geo_args.append(arg)
            continue
        idx = rows.to(out.device)
        if name == "Cutout":
            result = cutout(_gather(out, idx), cutout_boxes(arg, centres[rows], height, width),
                            fill if cutout_fill is None else cutout_fill)
        else:
            result = _COLOR_OPS[name](_gather(out, idx), arg.to(device=out.device, dtype=out.dtype))
        _scatter(out, rows, result)
    if not geo_rows:
        return
    rows = torch.cat(geo_rows)
    theta = affine_theta(geo_names, torch.cat(geo_args), height, width)
    if interpolation == "random":
        groups = [("bilinear", ~bicubic[rows]), ("bicubic", bicubic[rows])]
    else:
        groups = [(interpolation, torch.ones(len(rows), dtype=torch.bool))]
    for mode, member in groups:
        if not bool(member.any()):
            continue
        chosen = rows[member]
        _scatter(out, chosen, geometric(_gather(out, chosen.to(out.device)), theta[member], fill, mode))


# ---------------------------------------------------------------------------------------------------------------------


def _check_batch(x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"expected a float (N, 3, H, W) batch in [0, 1], got {x.dtype} {tuple(x.shape)}")


def _device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    if device.type == "cpu":
        return generator
    dev_gen = torch.Generator(device=device)
    dev_gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    return dev_gen


def _cpu_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        if generator.device.type != "cpu":
            raise ValueError("pass a CPU torch.Generator: the per-image parameters are drawn on the CPU (the noise "
                             "is drawn on the batch's device from a seed it gives)")
        return generator
    fresh = torch.Generator()
    fresh.manual_seed(int(torch.randint(0, 2**62, (1,))))  # follows torch.manual_seed
    return fresh


def check_fill_and_interpolation(fill: Sequence[float], interpolation: str) -> torch.Tensor:
    """Validate the geometric-op settings; returns ``fill`` as a tensor."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r} must be one of {INTERPOLATIONS}")
    if len(fill) != 3:
        raise ValueError(f"fill must have 3 values (RGB in [0, 1]), got {fill}")
    return torch.tensor([float(v) for v in fill])


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, run the batch ops on one intra-op thread. They are small (the few rows that drew one op) and many,
    so OpenMP's wake-ups cost more than its threads save: RandAugment + random erasing on 64 images of 160 px take
    0.47 ms per image on one thread against 0.62 on two (2-core machine), and the loader's decoding threads keep the
    other cores. It also makes the CPU result independent of the machine's thread count (reductions such as
    Contrast's mean are summed in one order). Other devices are left alone."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class BatchTransform:
    """Base of the batch augmentations: ``transform(x, generator)`` checks the batch, augments a private copy in
    ``x``'s memory format in place with :meth:`apply_` (no autograd), and returns it; ``x`` is untouched.

    The ops work on NCHW and channels_last batches alike (rows are gathered in the batch's own layout), so a
    channels_last batch from the loaders is never transposed as a whole.

    The per-image parameters come from the CPU ``generator`` (without one they follow ``torch.manual_seed``), so the
    same generator state gives the same batch on a given device.
    """

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_batch(x)
        gen = _cpu_generator(generator)
        with torch.no_grad(), _one_cpu_thread(x.device):
            out = x.clone()  # preserves x's memory format
            self.apply_(out, gen)
        return out

    def apply_(self, out: torch.Tensor, gen: torch.Generator) -> None:
        """Augment ``out`` (a float (N, 3, H, W) batch, any memory format) in place, drawing the parameters from the
        CPU generator ``gen``."""
        raise NotImplementedError


class BatchRandAugment(BatchTransform):
    """timm RandAugment with per-image ops and magnitudes on a batch (see the module docstring for the semantics).

    Args:
        config: timm RandAugment string, e.g. ``'rand-m9-mstd0.5-inc1'``.
        fill: colour (in [0, 1], per channel) of pixels uncovered by geometric ops.
        interpolation: ``'bicubic'``, ``'bilinear'`` or ``'random'`` (per image) for geometric ops.
    """

    def __init__(self, config: str = "rand-m9-mstd0.5-inc1", *, fill: Sequence[float] = (0.0, 0.0, 0.0),
                 interpolation: str = "bicubic"):
        self.fill = check_fill_and_interpolation(fill, interpolation)
        self.config = config
        self.spec = parse_rand_augment(config)
        self.interpolation = interpolation

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r}, fill={self.fill.tolist()}, interpolation={self.interpolation})"

    def _magnitudes(self, n: int, generator: torch.Generator) -> torch.Tensor:
        spec = self.spec
        if spec.magnitude_std == math.inf:
            mag = torch.rand(n, generator=generator, dtype=torch.float64) * spec.magnitude
        elif spec.magnitude_std > 0:
            mag = spec.magnitude + spec.magnitude_std * torch.randn(n, generator=generator, dtype=torch.float64)
        else:
            mag = torch.full((n,), spec.magnitude, dtype=torch.float64)
        return mag.clamp(0.0, spec.magnitude_max)

    def apply_(self, out: torch.Tensor, gen: torch.Generator) -> None:
        n = out.shape[0]
        ops = self.spec.ops
        for _ in range(self.spec.num_layers):
            choice = torch.randint(len(ops), (n,), generator=gen)
            applied = torch.rand(n, generator=gen) < self.spec.prob
            magnitude = self._magnitudes(n, gen)
            apply_ops_(out, ops, torch.where(applied, choice, -1), magnitude, gen, fill=self.fill,
                       interpolation=self.interpolation)


class BatchRandomErasing(BatchTransform):
    """timm ``RandomErasing`` semantics on a batch, per image, vectorized, seeded by a ``torch.Generator``.

    Args:
        probability: chance that an image is erased.
        mode: ``'pixel'`` (per-pixel noise), ``'rand'`` (one noise colour per box) or ``'const'`` (``mean``).
        min_area, max_area: box area range as a fraction of the image (divided by the box count).
        min_aspect, max_aspect: aspect ratio range (log-uniform); ``max_aspect`` defaults to ``1 / min_aspect``.
        min_count, max_count: number of boxes per erased image (uniform in the range).
        mean, std: noise is ``mean + std * N(0, 1)`` per channel, then clipped to [0, 1].
    """

    def __init__(self, probability: float = 0.25, mode: str = "pixel", *, min_area: float = 0.02,
                 max_area: float = 1 / 3, min_aspect: float = 0.3, max_aspect: float | None = None,
                 min_count: int = 1, max_count: int | None = None, mean: Sequence[float] = (0.0, 0.0, 0.0),
                 std: Sequence[float] = (1.0, 1.0, 1.0)):
        if mode not in ("pixel", "rand", "const"):
            raise ValueError(f"random erasing mode={mode!r} must be 'pixel', 'rand' or 'const'")
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"random erasing probability={probability} must be in [0, 1]")
        max_count = max_count or min_count
        if not 1 <= min_count <= max_count:
            raise ValueError(f"random erasing counts ({min_count}, {max_count}) must satisfy 1 <= min <= max")
        self.probability = probability
        self.mode = mode
        self.area = (min_area, max_area)
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect or 1.0 / min_aspect))
        self.count = (min_count, max_count)
        self.mean = torch.tensor([float(v) for v in mean])
        self.std = torch.tensor([float(v) for v in std])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.probability}, mode={self.mode}, count={self.count})"

    def boxes(self, n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """Sample boxes: ``(n, max_count, 4)`` int64 ``(top, left, h, w)``, ``h == 0`` where no box is drawn."""
        erase = torch.rand(n, generator=generator) < self.probability
        count = torch.randint(self.count[0], self.count[1] + 1, (n,), generator=generator)
        out = torch.zeros(n, self.count[1], 4, dtype=torch.int64)
        tries = 10
        for slot in range(self.count[1]):
            area = torch.empty(n, tries, dtype=torch.float64).uniform_(*self.area, generator=generator)
            area = area * (height * width) / count.unsqueeze(1)
            aspect = torch.exp(torch.empty(n, tries, dtype=torch.float64).uniform_(*self.log_aspect,
                                                                                   generator=generator))
            h = torch.round(torch.sqrt(area * aspect)).to(torch.int64)
            w = torch.round(torch.sqrt(area / aspect)).to(torch.int64)
            fits = (w < width) & (h < height)
            first = torch.argmax(fits.to(torch.int64), dim=1, keepdim=True)  # first try that fits
            h = h.gather(1, first).squeeze(1)
            w = w.gather(1, first).squeeze(1)
            u_top = torch.rand(n, generator=generator, dtype=torch.float64)
            u_left = torch.rand(n, generator=generator, dtype=torch.float64)
            drawn = erase & (slot < count) & fits.any(dim=1)
            top = torch.floor(u_top * (height - h + 1)).to(torch.int64)
            left = torch.floor(u_left * (width - w + 1)).to(torch.int64)
            out[:, slot] = torch.stack([top, left, h, w], dim=1) * drawn.unsqueeze(1)
        return out

    def apply_(self, out: torch.Tensor, gen: torch.Generator) -> None:
        n, c, height, width = out.shape
        boxes = self.boxes(n, height, width, gen)
        dev_gen = _device_generator(gen, out.device)
        rows = torch.nonzero((boxes[:, :, 2] > 0).any(dim=1)).flatten()
        if len(rows) == 0:
            return
        drawn = [(i, int(r), [box for box in boxes[r].tolist() if box[2] > 0]) for i, r in enumerate(rows.tolist())]
        mean = self.mean.to(device=out.device, dtype=out.dtype).view(c, 1)
        std = self.std.to(device=out.device, dtype=out.dtype).view(c, 1)
        # Only the boxes' pixels are drawn and written: per-pixel noise for every box pixel ('pixel'), one colour per
        # erased image ('rand'), or the mean ('const'); rows are painted in place, in any memory format.
        if self.mode == "pixel":
            total = sum(h * w for _, _, row_boxes in drawn for _, _, h, w in row_boxes)
            noise = torch.randn(c, total, generator=dev_gen, device=out.device, dtype=out.dtype)
        elif self.mode == "rand":
            noise = torch.randn(len(rows), c, generator=dev_gen, device=out.device, dtype=out.dtype).T
        else:
            noise = torch.zeros(c, len(rows), device=out.device, dtype=out.dtype)
        fill = (mean + std * noise).clamp_(0.0, 1.0)  # (c, pixels) or (c, erased images)
        offset = 0
        for i, row, row_boxes in drawn:
            for top, left, h, w in row_boxes:
                if self.mode == "pixel":
                    paint = fill[:, offset:offset + h * w].view(c, h, w)
                    offset += h * w
                else:
                    paint = fill[:, i].view(c, 1, 1)
                out[row, :, top:top + h, left:left + w] = paint


class BatchAugment(BatchTransform):
    """RandAugment then random erasing on a ``[0, 1]`` batch on its device: the recipe's per-image heavy augmentation.

    ``augment(x, generator)`` returns a new batch; with the same CPU ``generator`` state the result is identical on a
    given device. Without a generator the parameters follow ``torch.manual_seed``.
    """

    def __init__(self, rand_augment: BatchRandAugment | None, random_erasing: BatchRandomErasing | None):
        self.rand_augment = rand_augment
        self.random_erasing = random_erasing

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.rand_augment!r}, {self.random_erasing!r})"

    def apply_(self, out: torch.Tensor, gen: torch.Generator) -> None:
        if self.rand_augment is not None:
            self.rand_augment.apply_(out, gen)
        if self.random_erasing is not None:
            self.random_erasing.apply_(out, gen)


def build_augment(
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        re_mode: str = "pixel",
        re_count: int = 1,
        *,
        interpolation: str = "bicubic",
        fill: Sequence[float] = (0.0, 0.0, 0.0),
        re_mean: Sequence[float] = (0.0, 0.0, 0.0),
        re_std: Sequence[float] = (1.0, 1.0, 1.0),
) -> BatchAugment | None:
    """The heavy-augmentation recipe (defaults: the paper's RandAugment + random erasing p=0.25, pixel mode).

    Args:
        auto_augment: timm RandAugment string, or ``None``/``''`` for none.
        re_prob: random erasing probability (0 disables it).
        re_mode: ``'pixel'``, ``'rand'`` or ``'const'``.
        re_count: maximum boxes per erased image.
        interpolation: geometric-op interpolation (``'bicubic'``, ``'bilinear'``, ``'random'``).
        fill: colour of pixels uncovered by geometric ops.
        re_mean, re_std: random-erasing noise distribution (per channel, pixel units).

    Returns:
        A :class:`BatchAugment`, or ``None`` when both parts are disabled.
    """
    rand_augment = BatchRandAugment(auto_augment, fill=fill, interpolation=interpolation) if auto_augment else None
    erasing = BatchRandomErasing(re_prob, re_mode, max_count=re_count, mean=re_mean, std=re_std) \
        if re_prob > 0 else None
    if rand_augment is None and erasing is None:
        return None
    return BatchAugment(rand_augment, erasing)


def build_mixup(
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        *,
        num_classes: int,
        prob: float = 1.0,
        mode: str = "batch",
):
    """timm ``Mixup`` for the recipe (mixup 0.8, cutmix 1.0, switch 0.5, label smoothing 0.1), or ``None``.

    ``mixup_fn(x, y)`` mixes ``x`` in place on its device and returns soft targets ``(N, num_classes)`` (use
    ``timm.loss.SoftTargetCrossEntropy``). It needs an even batch size, and draws from numpy's global RNG (seed it).
    Returns ``None`` when both alphas are 0: label smoothing then belongs to the loss.
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be >= 2")
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob, mode=mode,
                 label_smoothing=label_smoothing, num_classes=num_classes)


class GroupMixup:
    """timm ``Mixup``/CutMix inside groups: a batch of ``groups`` equal groups (group-major, ``(G·K, C, H, W)``) is
    viewed as ``(G, K, ...)`` and mixed along ``K`` only, image ``k`` of a group with image ``K − 1 − k`` of the same
    group, with one λ (and one CutMix box) for the whole step, drawn by timm exactly as for a plain batch; so no
    image takes pixels from another group (the adversarial policy's groups: each policy's loss stays its own).

    ``mixup`` is a timm ``Mixup`` in ``'batch'`` mode (:func:`build_mixup`); ``K`` must be even. Each group's soft
    targets are timm's ``mixup_target`` of its labels at that λ. Returns ``(mixed images, soft targets (G·K,
    num_classes))``; ``x`` keeps its memory format.
    """

    def __init__(self, mixup, groups: int):
        if mixup.mode != "batch":
            raise ValueError(f"GroupMixup mixes with one lambda per batch: build the Mixup with mode='batch', not "
                             f"{mixup.mode!r}")
        self.mixup, self.groups = mixup, groups

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from timm.data.mixup import mixup_target

        n, c, h, w = x.shape
        k = n // self.groups
        if k * self.groups != n or k % 2:
            raise ValueError(f"GroupMixup: {n} images do not form {self.groups} groups of an even size")
        # Policies into channels: flipping dim 0 of (K, G·C, H, W) pairs images k and K - 1 - k of every group.
        by_position = x.view(self.groups, k, c, h, w).transpose(0, 1).reshape(k, self.groups * c, h, w)
        lam = self.mixup._mix_batch(by_position)  # timm's λ and box draw and in-place mix (the body of __call__)
        mixed = by_position.view(k, self.groups, c, h, w).transpose(0, 1).reshape(n, c, h, w)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            mixed = mixed.contiguous(memory_format=torch.channels_last)
        soft = torch.cat([mixup_target(t, self.mixup.num_classes, lam, self.mixup.label_smoothing)
                          for t in target.view(self.groups, k)])
        return mixed, soft
