"""The Adversarial AutoAugment search space (Zhang et al., ICLR 2020): its ops (:data:`AAA_OPS`, the one list),
:class:`PolicySpace`, and :class:`PolicyAugment`, which applies given sub-policies to a batch.

The operations are AutoAugment's search space without SamplePairing (the paper has 16 ops; the unofficial
implementation this follows leaves SamplePairing out: 15). They are rat's batched per-image ops of
:mod:`rat.augment.ops`, with AutoAugment's ranges as timm's ``'original'`` AutoAugment policy defines them; with
level = magnitude / 10, and ``magnitude_map='autoaugment'`` (AutoAugment's and timm's reading of a level):

================ ==================================================================================================
ShearX / ShearY  timm ``ShearX`` / ``ShearY``: ``0.3 · level``, random sign
TranslateX / Y   timm ``TranslateXRel`` / ``TranslateYRel``: ``0.45 · level`` of the width / height, random sign
                 (= timm's ``TranslateX`` with ``translate_const = 0.45 · image size``, as ``create_transform`` sets)
Rotate           ``30 · level`` degrees, random sign
AutoContrast, Invert, Equalize   no argument
Solarize         invert 8-bit values ``>= int(256 · level)``
Posterize        timm ``PosterizeOriginal``: keep ``4 + int(4 · level)`` bits
Contrast, Color, Brightness, Sharpness   enhance factor ``0.1 + 1.8 · level``
Cutout           a square of side ``0.2 · level`` of the shorter image side (DeVries & Taylor; AutoAugment's op) at a
                 uniformly random centre, clipped to the image, painted with ``cutout_fill``
================ ==================================================================================================

The default ``magnitude_map='seed'`` is the seed implementation's reading, ``low + level · (high − low)`` over each
op's range: the same for every op but the five signed ones (:data:`SIGNED_OPS`), whose range ``[−max, max]`` makes
the size ``max · |2 · level − 1|`` (level 0.5 is the identity), see :func:`timm_magnitudes`. The default magnitudes
are 0..9: the 10 levels of AutoAugment's policies as timm reads them (``m / 10``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rat.augment.ops import apply_ops_, check_fill_and_interpolation
from rat.augment.transform import BatchTransform

__all__ = ["AAA_OPS", "CUTOUT_FILLS", "MAGNITUDE_MAPS", "PolicyAugment", "PolicySpace", "images_per_policy",
           "timm_magnitudes"]

AAA_OPS = (
    "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "AutoContrast", "Invert", "Equalize", "Solarize",
    "Posterize", "Contrast", "Color", "Brightness", "Sharpness", "Cutout",
)
# The rat/timm op that implements a search-space op, where the names differ.
_IMPLEMENTED_BY = {"TranslateX": "TranslateXRel", "TranslateY": "TranslateYRel", "Posterize": "PosterizeOriginal"}
MAX_MAGNITUDE = 10
# The ops whose range is symmetric, [-max, max], negated at random (the seed maps their level onto that whole range).
SIGNED_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
MAGNITUDE_MAPS = ("seed", "autoaugment")
# Cutout's colour: the seed's (125, 123, 114) in 8 bits, or black.
CUTOUT_FILLS = {"seed": (125 / 255, 123 / 255, 114 / 255), "black": (0.0, 0.0, 0.0)}


@dataclass(frozen=True)
class PolicySpace:
    """The search space: ``num_sub_policies`` sub-policies of ``ops_per_sub_policy`` (op, magnitude) pairs.

    Raises:
        ValueError: an unknown or repeated op, a magnitude outside ``[0, 10]`` or repeated, or a size below 1.
    """

    ops: tuple[str, ...] = AAA_OPS
    magnitudes: tuple[int, ...] = tuple(range(10))
    num_sub_policies: int = 5
    ops_per_sub_policy: int = 2

    def __post_init__(self) -> None:
        unknown = [op for op in self.ops if op not in AAA_OPS]
        if unknown:
            raise ValueError(f"unknown op {unknown[0]!r} in the policy's ops: choose from {', '.join(AAA_OPS)}")
        if not self.ops or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"the policy's ops must be distinct and not empty, got {','.join(self.ops)}")
        bad = [m for m in self.magnitudes if not 0 <= m <= MAX_MAGNITUDE]
        if bad:
            raise ValueError(f"magnitude level {bad[0]} is out of range: levels are integers in [0, {MAX_MAGNITUDE}]")
        if not self.magnitudes or len(set(self.magnitudes)) != len(self.magnitudes):
            raise ValueError(f"the policy's magnitudes must be distinct and not empty, got {self.magnitudes}")
        if self.num_sub_policies < 1 or self.ops_per_sub_policy < 1:
            raise ValueError("a policy needs at least one sub-policy of at least one op")

    @property
    def implementations(self) -> tuple[str, ...]:
        """The :mod:`rat.augment.ops` op name behind each of :attr:`ops`."""
        return tuple(_IMPLEMENTED_BY.get(op, op) for op in self.ops)

    def describe(self, sub_policy: torch.Tensor) -> str:
        """``'(Rotate, 7) (Invert, 3)'`` for a sub-policy's tokens ``(L, 2)`` (op index, magnitude index)."""
        return " ".join(f"({self.ops[int(o)]}, {self.magnitudes[int(m)]})" for o, m in sub_policy.tolist())


def timm_magnitudes(space: PolicySpace, magnitude_map: str = "seed") -> torch.Tensor:
    """``(ops, magnitudes)`` float64: the magnitude on timm's scale (level = value / 10) that gives each search-space
    op at each of the space's magnitude levels its argument.

    ``'autoaugment'``: the level itself (AutoAugment's and timm's definition: a signed op's size is
    ``max · m / 10``, then a random sign). ``'seed'``: the seed implementation's definition, ``low + (m / 10) ·
    (high − low)`` over the op's range; for the signed ops (:data:`SIGNED_OPS`, range ``[−max, max]``) that is
    ``max · (2m / 10 − 1)`` before the random sign, i.e. timm's size at ``|2m − 10|`` (level 5 is the identity);
    for the other ops, whose ranges start where timm's do, it is the level itself.
    """
    if magnitude_map not in MAGNITUDE_MAPS:
        raise ValueError(f"magnitude_map={magnitude_map!r}: choose from {', '.join(MAGNITUDE_MAPS)}")
    levels = torch.tensor(space.magnitudes, dtype=torch.float64)
    rows = [(2 * levels - MAX_MAGNITUDE).abs() if magnitude_map == "seed" and op in SIGNED_OPS else levels
            for op in space.ops]
    return torch.stack(rows)


class PolicyAugment(BatchTransform):
    """Augment a batch under given sub-policies: image ``i`` gets the ops ``ops[i]`` (``(n, L, 2)`` tokens).

    ``apply_`` reads the per-image tokens from :attr:`tokens` (set before each call); the random parts (geometric
    signs, interpolation when ``'random'``, Cutout centres) come from the generator, through
    :func:`rat.augment.ops.apply_ops_`, the same batched base RandAugment uses. ``magnitude_map`` says how a level
    becomes an op's argument (:func:`timm_magnitudes`); geometric ops fill uncovered pixels with ``fill``, Cutout
    paints ``cutout_fill``.
    """

    def __init__(self, space: PolicySpace, *, magnitude_map: str = "seed", fill: Sequence[float] = (0.0, 0.0, 0.0),
                 cutout_fill: Sequence[float] = CUTOUT_FILLS["seed"], interpolation: str = "bicubic"):
        self.fill = check_fill_and_interpolation(fill, interpolation)
        self.cutout_fill = check_fill_and_interpolation(cutout_fill, interpolation)
        self.space = space
        self.interpolation = interpolation
        self.levels = timm_magnitudes(space, magnitude_map)
        self.tokens: torch.Tensor | None = None

    def apply_(self, out: torch.Tensor, gen: torch.Generator) -> None:
        if self.tokens is None or self.tokens.shape[0] != out.shape[0]:
            raise ValueError("PolicyAugment: set .tokens to one (L, 2) sub-policy per image before augmenting")
        for layer in range(self.tokens.shape[1]):
            ops = self.tokens[:, layer, 0]
            apply_ops_(out, self.space.implementations, ops, self.levels[ops, self.tokens[:, layer, 1]], gen,
                       fill=self.fill, cutout_fill=self.cutout_fill, interpolation=self.interpolation)


def images_per_policy(batch_size: int, batch_fraction: float) -> int:
    """K, the images each policy augments of a batch of ``batch_size``: the batch, or ``max(1, round(fraction·B))``."""
    return batch_size if batch_fraction == 1.0 else max(1, round(batch_fraction * batch_size))

