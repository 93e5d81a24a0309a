"""Element codes shared by the formats: e2m1 (FP4), e4m3 (FP8) and e8m0 (MX scales).

Bit layouts (WIRE_FORMATS.md, "Element codes"):

- e2m1: 4 bits, sign in bit 3, magnitude code 0..7 for ``0, .5, 1, 1.5, 2, 3, 4, 6``.
  Two codes per byte: element ``2j`` in the low nibble, ``2j+1`` in the high nibble.
- e4m3: ``torch.float8_e4m3fn`` bits; values are clamped to ``[-448, 448]`` before the
  round-to-nearest-even cast and NaN is written as ``0x7F``.
- e8m0: one byte ``b`` meaning ``2**(b-127)``; ``0xFF`` is NaN.

All functions are pure torch, vectorized, and run on any device.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from moewire.constants import (
    E2M1_VALUES,
    E4M3_MAX,
    E4M3_NAN_BYTE,
    E8M0_BIAS,
    E8M0_MAX_BYTE,
    E8M0_NAN_BYTE,
)


# A value lands in code i+1 when it is above (or, for the ties that go up to an even code,
# at) E2M1_BOUNDS[i]. Those ties (.75 -> 1, 1.75 -> 2, 3.5 -> 4) are written as "strictly above
# the next float below", so one strict bucketize implements round-half-to-even.
def _f32_below(v: float) -> float:
    """The largest fp32 value below ``v``."""
    return float(np.nextafter(np.float32(v), np.float32(0)))


_E2M1_BOUNDS = (0.25, _f32_below(0.75), 1.25, _f32_below(1.75), 2.5, _f32_below(3.5), 5.0)
_E2M1_DECODE = tuple(E2M1_VALUES) + tuple(-v for v in E2M1_VALUES)

_tables: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    key = (name, device)
    t = _tables.get(key)
    if t is None:
        t = torch.tensor(values, dtype=torch.float32, device=device)
        _tables[key] = t
    return t


def encode_e2m1(v: torch.Tensor) -> torch.Tensor:
    """fp32 values -> e2m1 codes (uint8 in 0..15), saturating, ties to the even code.

    The sign bit is ``signbit(v)``, so ``-0.0`` and negatives that round to zero give ``0x8``.
    NaN maps to an unspecified code; formats replace non-finite blocks before calling this.
    """
    assert v.dtype == torch.float32
    bounds = _table("e2m1_bounds", _E2M1_BOUNDS, v.device)
    mag = torch.bucketize(v.abs().contiguous(), bounds, out_int32=True).to(torch.uint8)
    return mag | (torch.signbit(v).to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (uint8, low 4 bits used) -> fp32 values."""
    table = _table("e2m1_decode", _E2M1_DECODE, codes.device)
    return table[(codes & 0xF).long()]


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """``[..., 2n]`` e2m1 codes -> ``[..., n]`` bytes (element 2j low nibble, 2j+1 high)."""
    lo = codes[..., 0::2]
    hi = codes[..., 1::2]
    return lo | (hi << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` bytes -> ``[..., 2n]`` e2m1 codes (inverse of :func:`pack_e2m1`)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def encode_e4m3(v: torch.Tensor) -> torch.Tensor:
    """fp32 values -> e4m3 bytes (uint8): clamp to +-448, round to nearest even, NaN -> 0x7F."""
    assert v.dtype == torch.float32
    q = v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.where(torch.isnan(v), E4M3_NAN_BYTE, q)


def decode_e4m3(b: torch.Tensor) -> torch.Tensor:
    """e4m3 bytes (uint8 or float8_e4m3fn) -> fp32 (0x7F and 0xFF are NaN)."""
    if b.dtype == torch.uint8:
        b = b.view(torch.float8_e4m3fn)
    return b.to(torch.float32)


def exp2i(k: torch.Tensor) -> torch.Tensor:
    """Exact fp32 ``2**k`` for integer ``k`` in ``[-127, 127]`` (``2**-127`` is subnormal)."""
    k = k.to(torch.int32)
    normal = (k + 127).clamp(min=1) << 23
    bits = torch.where(k >= -126, normal, torch.full_like(k, 0x00400000))
    return bits.view(torch.float32)


def decode_e8m0(b: torch.Tensor) -> torch.Tensor:
    """e8m0 bytes (uint8) -> fp32 ``2**(b-127)``; ``0xFF`` -> NaN."""
    b = b.to(torch.int32)
    v = exp2i((b - E8M0_BIAS).clamp(max=127))
    return torch.where(b == E8M0_NAN_BYTE, torch.nan, v)


def mx_scale_byte(amax: torch.Tensor, elem_max: float) -> torch.Tensor:
    """OCP MX scale byte of blocks with the given fp32 ``amax`` (>= 0, finite).

    ``E`` is the smallest integer with ``amax <= elem_max * 2**E``, computed exactly from the
    frexp decomposition; the byte is ``clamp(E + 127, 0, 254)``, and 0 for an all-zero block.
    """
    m_elem, e_elem = math.frexp(elem_max)  # elem_max = m_elem * 2**e_elem, m_elem in [.5, 1)
    m, e = torch.frexp(amax)
    big_e = e - e_elem + (m > m_elem).to(torch.int32)
    b = (big_e + E8M0_BIAS).clamp(0, E8M0_MAX_BYTE)
    return torch.where(amax == 0, 0, b).to(torch.uint8)


def div_rn(a: torch.Tensor | float, b: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 ``a / b``.

    Both operands are made fp32 tensors on ``like``'s device first: torch turns a division by
    a Python scalar into a multiplication by its reciprocal on CUDA, and ``scalar / tensor``
    into ``reciprocal(tensor) * scalar`` everywhere, which rounds twice.
    """
    a = a if isinstance(a, torch.Tensor) else torch.full_like(like, a, dtype=torch.float32)
    b = b if isinstance(b, torch.Tensor) else torch.full_like(like, b, dtype=torch.float32)
    return torch.div(a, b)


def canonical_nan(v: torch.Tensor) -> torch.Tensor:
    """Replace every NaN of an fp32 or bf16 tensor by the positive quiet NaN
    (``0x7FC00000`` / ``0x7FC0``), so rows are byte-deterministic: torch's kernels produce
    NaNs with different bit patterns on different code paths and devices."""
    bits = {torch.float32: (torch.int32, 0x7FC00000), torch.bfloat16: (torch.int16, 0x7FC0)}
    int_dtype, nan_bits = bits[v.dtype]
    return torch.where(torch.isnan(v), nan_bits, v.view(int_dtype)).view(v.dtype)


def as_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast an activation tensor to fp32 (a no-op for fp32 input)."""
    return x if x.dtype == torch.float32 else x.to(torch.float32)
