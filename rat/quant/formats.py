"""Number formats of simulated post-training quantization: INT(b), POT(b) and FLOAT(b) with an e/m split.

Every format is signed and symmetric with zero-point 0: a tensor ``x`` with per-tensor ``scale`` becomes
``scale * q(x / scale)``, where ``q`` rounds to the nearest value of the format's grid and saturates at its largest
magnitude ``max_value`` (the scale of a tensor whose calibrated absolute maximum is ``a`` is ``a / max_value``):

* ``INT(b)``, 2 ≤ b ≤ 16: the integers ``-(2^(b-1) - 1) .. 2^(b-1) - 1`` (narrow range, so the grid is symmetric);
  brevitas' ``IntQuant`` does the rounding (round half to even) and clamping.
* ``POT(b)``, 2 ≤ b ≤ 8: zero and the signed powers of two ``±2^0 .. ±2^-(2^(b-1) - 2)`` (one sign bit, ``2^(b-1)``
  magnitude codes one of which is zero); rounded to the nearest grid value. Written here: no library offers
  power-of-two *value* quantization (brevitas' power-of-two restricts the *scale*, not the values).
* ``FLOAT(b, e)``, 3 ≤ b ≤ 8: 1 sign bit, ``e`` exponent bits (bias ``2^(e-1) - 1``), ``m = b - 1 - e`` mantissa
  bits, subnormals; brevitas' ``FloatQuant`` (minifloat) does the rounding. E4M3 and E5M2 follow the OCP FP8
  formats, i.e. torch's ``float8_e4m3fn`` (max 448, no infinities) and ``float8_e5m2`` (max 57344, IEEE-style);
  every other e/m split uses all its codes for finite numbers (brevitas' default for minifloats).

Biases (:func:`quantize_bias`) are quantized at the scale of the layer's accumulator, ``s_in * s_w`` (input scale
times weight scale), as the seed does: on an INT32 grid for INT (the seed's), as bfloat16 (16 bits, 8 exponent bits,
the seed's bias format for FLOAT) for FLOAT and POT. For POT the seed clamps the bias at ``±1 * s_in * s_w`` (its
POT ``qmax``), i.e. at the largest single product of the layer, which cuts every bias larger than that; rat uses
bfloat16 instead, the format a power-of-two accumulator needs for its dynamic range (a deviation, docs/quant.md).

Rounding passes gradients straight through (brevitas' ``RoundSte``; the same for POT), so attacks on a quantized
model get BPDA gradients, the usual choice for quantized networks.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from fractions import Fraction
from functools import cache, lru_cache

import torch
from brevitas.core.bit_width.float import ComputeMaxMantissa
from brevitas.core.function_wrapper import TensorClamp
from brevitas.core.function_wrapper.clamp import FloatClamp
from brevitas.core.quant.float import FloatQuant
from brevitas.core.quant.int_base import IntQuant
from brevitas.core.utils import StatelessBuffer
from brevitas.utils.float_quant_utils import get_max_available_float
from torch import nn

__all__ = ["BIAS_FORMATS", "BIT_RANGES", "FORMATS", "QuantFormat", "fake_quantize", "grid_levels", "parse_format",
           "quantize_bias", "same_grid_as", "sweep_grid"]

FORMATS = ("INT", "POT", "FLOAT")
BIT_RANGES = {"INT": (2, 16), "POT": (2, 8), "FLOAT": (3, 8)}
# OCP FP8 special values (the mantissa codes that the all-ones exponent spends on NaN / infinity), as torch's
# float8_e4m3fn and float8_e5m2 define them.
_OCP_SPECIALS = {(4, 3): (("111",), None), (5, 2): (("01", "11", "10"), ("00",))}


class FormatError(ValueError):
    """A format that does not exist (unknown name, bits out of range, invalid exponent/mantissa split)."""


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """A number format: ``kind`` in :data:`FORMATS`, total ``bits``, and for FLOAT the exponent bits ``exp_bits``.

    Build one with :func:`parse_format` or the constructor; both check the ranges.
    """

    kind: str
    bits: int
    exp_bits: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FORMATS:
            raise FormatError(f"unknown format {self.kind!r}: use one of {', '.join(FORMATS)}")
        lo, hi = BIT_RANGES[self.kind]
        if not lo <= self.bits <= hi:
            raise FormatError(f"{self.kind} takes {lo} to {hi} bits, got {self.bits}")
        if self.kind == "FLOAT":
            if not 1 <= self.exp_bits <= self.bits - 1:
                raise FormatError(f"FLOAT{self.bits} needs 1 to {self.bits - 1} exponent bits (1 sign bit, the rest "
                                  f"mantissa), got e={self.exp_bits}")
        elif self.exp_bits:
            raise FormatError(f"{self.kind} has no exponent/mantissa split: drop the exponent bits")

    @property
    def man_bits(self) -> int:
        """Mantissa bits (FLOAT only)."""
        return self.bits - 1 - self.exp_bits if self.kind == "FLOAT" else 0

    @property
    def name(self) -> str:
        """``INT8``, ``POT4``, ``FLOAT8_E4M3``: what :func:`parse_format` reads back."""
        if self.kind == "FLOAT":
            return f"FLOAT{self.bits}_E{self.exp_bits}M{self.man_bits}"
        return f"{self.kind}{self.bits}"

    @property
    def max_value(self) -> float:
        """Largest magnitude of the grid in units of the scale."""
        if self.kind == "INT":
            return float(2 ** (self.bits - 1) - 1)
        if self.kind == "POT":
            return 1.0
        return float(_float_max(self.exp_bits, self.man_bits))


def parse_format(text: str) -> QuantFormat:
    """Read ``int8``, ``pot4``, ``float8_e4m3`` (also ``float8e4m3``, ``e4m3``, ``e5m2``) into a :class:`QuantFormat`.

    Raises:
        FormatError: an unknown format, bits out of range or an e/m split that does not add up to ``bits - 1``.
    """
    spec = text.strip().upper().replace("-", "_")
    short = re.fullmatch(r"E(\d+)M(\d+)", spec)
    if short:
        exp, man = int(short.group(1)), int(short.group(2))
        return QuantFormat("FLOAT", exp + man + 1, exp)
    match = re.fullmatch(r"(INT|POT|FLOAT)(\d+)(?:_?E(\d+)(?:M(\d+))?)?", spec)
    if match is None:
        raise FormatError(f"unknown format {text!r}: write INT<b> (2-16), POT<b> (2-8) or FLOAT<b>_E<e>M<m> (3-8 "
                          "bits, e + m = b - 1), e.g. int8, pot4, float8_e4m3")
    kind, bits = match.group(1), int(match.group(2))
    if kind != "FLOAT":
        if match.group(3) is not None:
            raise FormatError(f"{kind} has no exponent/mantissa split: write {kind}{bits}")
        return QuantFormat(kind, bits)
    if match.group(3) is None:
        raise FormatError(f"FLOAT{bits} needs its exponent/mantissa split, e.g. FLOAT{bits}_E{min(4, bits - 2)}M"
                          f"{bits - 1 - min(4, bits - 2)}")
    exp = int(match.group(3))
    if match.group(4) is not None and exp + int(match.group(4)) != bits - 1:
        raise FormatError(f"invalid split E{exp}M{match.group(4)} for FLOAT{bits}: e + m must be {bits - 1} (one bit "
                          "is the sign)")
    return QuantFormat(kind, bits, exp)


def sweep_grid(kinds: tuple[str, ...] = FORMATS) -> list[QuantFormat]:
    """Every format of the sweep: INT 2–16, POT 2–8, FLOAT 3–8 with every exponent width 1..b-1."""
    grid: list[QuantFormat] = []
    for kind in kinds:
        lo, hi = BIT_RANGES[kind]
        for bits in range(lo, hi + 1):
            if kind == "FLOAT":
                grid.extend(QuantFormat(kind, bits, e) for e in range(1, bits))
            else:
                grid.append(QuantFormat(kind, bits))
    return grid


@cache
def grid_levels(fmt: QuantFormat) -> frozenset[Fraction]:
    """The format's non-negative grid values divided by ``max_value``, exactly (two formats with the same levels
    quantize every tensor identically)."""
    if fmt.kind == "INT":
        top = 2 ** (fmt.bits - 1) - 1
        return frozenset(Fraction(k, top) for k in range(top + 1))
    if fmt.kind == "POT":
        return frozenset([Fraction(0)] + [Fraction(1, 2 ** j) for j in range(2 ** (fmt.bits - 1) - 1)])
    exp, man = fmt.exp_bits, fmt.man_bits
    bias = 2 ** (exp - 1) - 1
    values = [Fraction(k, 2 ** man) * Fraction(2) ** (1 - bias) for k in range(2 ** man)]  # zero and subnormals
    values += [(1 + Fraction(k, 2 ** man)) * Fraction(2) ** (e - bias) for e in range(1, 2 ** exp) for k in
               range(2 ** man)]
    top = Fraction(fmt.max_value)
    return frozenset(v / top for v in values if v <= top)


def same_grid_as(fmt: QuantFormat, earlier: Sequence[QuantFormat]) -> QuantFormat | None:
    """The first format of ``earlier`` with ``fmt``'s grid (e.g. FLOAT<b>_E1 = INT<b>, FLOAT<b>_E<b-1>M0 = POT<b>),
    or None."""
    levels = grid_levels(fmt)
    return next((other for other in earlier if other != fmt and grid_levels(other) == levels), None)


def _float_max(exp_bits: int, man_bits: int) -> float:
    nan, inf = _OCP_SPECIALS.get((exp_bits, man_bits), (None, None))
    return float(get_max_available_float(exp_bits, man_bits, 2 ** (exp_bits - 1) - 1, nan, inf, True))


@cache
def _float_quant(exp_bits: int, man_bits: int) -> FloatQuant:
    """brevitas' minifloat quantizer for one e/m split, at scale 1 (the caller divides by its own scale)."""
    def const(value: float) -> StatelessBuffer:
        return StatelessBuffer(torch.tensor(float(value)))

    return FloatQuant(
        signed=True, exponent_bit_width_impl=const(exp_bits), mantissa_bit_width_impl=const(man_bits),
        exponent_bias_impl=const(2 ** (exp_bits - 1) - 1),
        float_clamp_impl=FloatClamp(TensorClamp(), signed=True, max_available_float=_float_max(exp_bits, man_bits)),
        input_view_impl=nn.Identity(), compute_max_mantissa=ComputeMaxMantissa())


@lru_cache(maxsize=1)
def _int_quant() -> IntQuant:
    return IntQuant(narrow_range=True, signed=True, input_view_impl=nn.Identity())


def _pot_round(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest value of {0, ±2^0, ..., ±2^-(2^(b-1)-2)} (x already divided by the scale), straight-through gradient."""
    min_exp = -(2 ** (bits - 1) - 2)
    mag = x.detach().abs().clamp(max=1.0)
    low = torch.exp2(torch.floor(torch.log2(mag.clamp(min=2.0 ** min_exp))))
    # between 2^k and 2^(k+1) the midpoint is 1.5 * 2^k; below the smallest level, half of it rounds to zero
    q = torch.where(mag >= 1.5 * low, 2 * low, low).clamp(max=1.0)
    q = torch.where(mag < 2.0 ** (min_exp - 1), torch.zeros_like(q), q)
    q = torch.sign(x.detach()) * q
    return x + (q - x).detach()


BIAS_FORMATS = {"INT": "INT32", "POT": "BF16", "FLOAT": "BF16"}


def quantize_bias(bias: torch.Tensor, scale: torch.Tensor | float, kind: str) -> torch.Tensor:
    """``scale * q(bias / scale)`` with ``q`` the bias format of ``kind`` (:data:`BIAS_FORMATS`): INT32 (narrow
    range, brevitas' ``IntQuant``) or bfloat16 (torch's cast: 8 exponent bits, 7 mantissa bits, round half to even).

    Args:
        bias: A layer's bias.
        scale: The layer's accumulator scale, input scale times weight scale.
        kind: The layer's format family (``QuantFormat.kind``).
    """
    scale = torch.as_tensor(scale, dtype=bias.dtype, device=bias.device)
    if BIAS_FORMATS[kind] == "INT32":
        zero = torch.zeros((), dtype=bias.dtype, device=bias.device)
        return _int_quant()(scale, zero, torch.tensor(32.0, dtype=bias.dtype, device=bias.device), bias)
    scaled = bias / scale
    return (scaled + (scaled.to(torch.bfloat16).to(bias.dtype) - scaled).detach()) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor | float, fmt: QuantFormat) -> torch.Tensor:
    """``scale * q(x / scale)``: ``x`` rounded to the format's grid at ``scale`` (a float tensor like ``x``).

    Args:
        x: Any float tensor.
        scale: Per-tensor scale (> 0): the calibrated absolute maximum divided by ``fmt.max_value``.
        fmt: The number format.
    """
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    if fmt.kind == "INT":
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        bits = torch.tensor(float(fmt.bits), dtype=x.dtype, device=x.device)
        return _int_quant()(scale, zero, bits, x)
    if fmt.kind == "POT":
        return scale * _pot_round(x / scale, fmt.bits)
    quant = _float_quant(fmt.exp_bits, fmt.man_bits)
    return quant(x / scale)[0] * scale
