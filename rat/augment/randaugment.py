"""RandAugment applied batch-wise on the training device, per sample; with random erasing, the heavy recipe.

timm's RandAugment works on one PIL image at a time, which is why reference code leaves FFCV for a torch
``DataLoader``. Here the same policy runs on a decoded ``[0, 1]`` batch (any device, any memory format): every image
draws its own ops, magnitudes and signs (and erase boxes), and the images that drew the same op are processed together
(:func:`rat.augment.ops.apply_ops_`).

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

The heavy recipe, RandAugment then random erasing (:mod:`rat.augment.erasing`), is :class:`BatchAugment`
(:func:`build_augment`).
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rat.augment.erasing import BatchRandomErasing
from rat.augment.ops import LEVEL_DENOM, apply_ops_, check_fill_and_interpolation
from rat.augment.transform import BatchTransform

__all__ = ["RAND_INCREASING_OPS", "RAND_OPS", "BatchAugment", "BatchRandAugment", "RandAugmentSpec", "build_augment",
           "parse_rand_augment"]

RAND_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)


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

