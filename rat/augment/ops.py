"""The batched op kernel: per-image augmentation ops on a float ``[0, 1]`` batch, any device, any memory format.

:func:`apply_ops_` is the one base that RandAugment (:mod:`rat.augment.randaugment`) and the Adversarial AutoAugment
policy (:mod:`rat.augment.policy`) share: image ``i`` gets op ``ops[choice[i]]`` at ``magnitude[i]`` (timm's 0..10
scale, level = magnitude / 10, turned into the op's argument by :func:`level_to_arg` as timm's ``LEVEL_TO_ARG`` does),
the images that drew the same op are processed together, geometric ops go through one resampling call. The op
definitions (timm 1.0 / PIL) are tabled in :mod:`rat.augment.randaugment`; Cutout is AutoAugment's (a square of side
``0.2 · level`` of the shorter image side). The ops work on float images (the 8-bit ops quantize their input) and
geometric ops resample with ``grid_sample``, not PIL: the differences from timm are named there.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["CUTOUT_MAX", "GEOMETRIC_OPS", "INTERPOLATIONS", "LEVEL_DENOM", "apply_ops_", "check_fill_and_interpolation",
           "level_to_arg"]

LEVEL_DENOM = 10.0
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
CUTOUT_MAX = 0.2  # Cutout's square side at magnitude 10, as a fraction of the shorter image side
INTERPOLATIONS = ("bilinear", "bicubic", "random")
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # PIL's ITU-R 601-2 luma, as in Image.convert('L')
_BICUBIC_A = -0.75  # the bicubic kernel of torch's grid_sample (PIL uses -0.5)

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



def check_fill_and_interpolation(fill: Sequence[float], interpolation: str) -> torch.Tensor:
    """Validate the geometric-op settings; returns ``fill`` as a tensor."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r} must be one of {INTERPOLATIONS}")
    if len(fill) != 3:
        raise ValueError(f"fill must have 3 values (RGB in [0, 1]), got {fill}")
    return torch.tensor([float(v) for v in fill])

