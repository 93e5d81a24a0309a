"""Element codes in ``@triton.jit`` form: e4m3, e2m1, e8m0 and bf16, bit-exact to
``moewire.formats.elements`` (WIRE_FORMATS.md, "Element codes").

Every encoder works on the fp32 bit pattern with integer operations or exact fp32
additions (no float->fp8/bf16 cast), so it gives the same bytes on the GPU and under
Triton's CPU interpreter, whose fp32->fp8 and fp32->bf16 casts truncate instead of
rounding to nearest even. With ``HW=True`` (GPU only) the e4m3 encoder/decoder use the
GPU's ``cvt`` instructions instead (round to nearest even, after the same explicit clamp),
which cost far fewer instructions; the tests run both paths on the GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moewire.formats._kernels.consts import (
    BF16_NAN_BITS,
    E2M1_MAX,
    E2M1_MAX_BITS,
    E4M3_MAX,
    E4M3_MAX_BITS,
    E4M3_NAN_BYTE,
    E8M0_MAX_BYTE,
    F32_INF_BITS,
    F32_NAN_BITS,
)


@triton.jit
def encode_e4m3(v, HW: tl.constexpr):
    """fp32 -> e4m3 byte (uint8): clamp to +-448, round to nearest even, NaN -> 0x7F;
    the sign of zero and of values that round to zero is kept."""
    if HW:
        q = tl.clamp(v, -E4M3_MAX, E4M3_MAX).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        q = tl.where(v != v, E4M3_NAN_BYTE, q)
    else:
        bits = v.to(tl.int32, bitcast=True)
        a = tl.minimum(bits & 0x7FFFFFFF, E4M3_MAX_BITS)  # |v| <= 448 (Inf too; NaN below)
        # |v| >= 2**-6 (e4m3 normal): keep 3 of fp32's 23 mantissa bits, round the other 20
        # to nearest even, then rebias the exponent from 127 to 7 (120 << 3 in code units).
        normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - 960
        # |v| < 2**-6 (e4m3 subnormal): code = round_half_even(|v| * 2**9), 0..8, from the
        # fp32 significand; shifts of 25+ give 0, so the shift is capped at 30.
        e = a >> 23
        mant = (a & 0x7FFFFF) | tl.where(e > 0, 0x800000, 0)
        shift = tl.minimum(141 - tl.maximum(e, 1), 30)
        q = mant >> shift
        rem = mant - (q << shift)
        half = 1 << (shift - 1)
        q += ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
        q = tl.where(a < 0x3C800000, q, normal) | ((bits >> 24) & 0x80)
        q = tl.where((bits & 0x7FFFFFFF) > F32_INF_BITS, E4M3_NAN_BYTE, q).to(tl.uint8)
    return q


@triton.jit
def decode_e4m3(q, HW: tl.constexpr):
    """e4m3 byte (uint8) -> fp32; 0x7F / 0xFF are NaN."""
    if HW:
        v = q.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        code = q.to(tl.int32)
        mag = code & 0x7F
        normal = (mag + 960) << 20  # (exp + 120) << 23 | mantissa << 20
        sub = ((mag & 7).to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True)  # m * 2**-9
        b = tl.where(mag >= 8, normal, sub)
        b = tl.where(mag == E4M3_NAN_BYTE, F32_NAN_BITS, b) | ((code & 0x80) << 24)
        v = b.to(tl.float32, bitcast=True)
    return v


@triton.jit
def encode_e2m1(v):
    """fp32 -> e2m1 code in an int32 (0..15): saturate at 6, ties to the even code,
    sign bit 3 = signbit(v) (NaN gives some code; callers replace non-finite blocks).

    ``|v|`` (at most 6) is rounded in fp32 to the e2m1 grid by adding
    ``M = 2**(e' + 22)``, ``e' = max(e, 0)`` (``e`` its unbiased exponent): the sum's spacing
    is ``2**(e' - 1)``, the grid's spacing in that binade (0.5 below 2, 1 in [2, 4), 2 in
    [4, 6]), and fp32 addition rounds to nearest even, which is ties to the even code
    (.25 -> 0, .75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4). The sum is
    ``M + k * spacing`` with ``k = bits(sum) - bits(M)``, and the code is ``k + 2 * e'``."""
    bits = v.to(tl.int32, bitcast=True)
    a = tl.minimum(bits & 0x7FFFFFFF, E2M1_MAX_BITS)  # saturate |v| at 6
    m = tl.maximum(a & 0x7F800000, 0x3F800000) + (22 << 23)  # bits of M; e' = (m >> 23) - 149
    q = (a.to(tl.float32, bitcast=True) + m.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True)
    return (q - m + (m >> 22) - 298) | ((bits >> 28) & 8)


@triton.jit
def encode_e2m1_mag(v, SAT: tl.constexpr):
    """``|v|`` -> e2m1 magnitude code (int32, 0..7), the same rounding as
    :func:`encode_e2m1` in fewer instructions (float min/max instead of integer masks).
    ``SAT``: saturate at 6 (without it, ``|v| <= 6`` must hold: MX blocks, by the scale
    rule). NaN gives some code; callers replace non-finite blocks."""
    a = tl.abs(v)
    if SAT:
        a = tl.minimum(a, E2M1_MAX)
    m = (tl.maximum(a, 1.0).to(tl.int32, bitcast=True) & 0x7F800000) + (22 << 23)
    q = (a + m.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True)
    return q - m + (m >> 22) - 298


@triton.jit
def decode_e2m1(code):
    """e2m1 code (int32, low 4 bits) -> fp32 (code 8 is -0.0)."""
    mag = code & 7
    normal = (((mag >> 1) + 126) << 23) | ((mag & 1) << 22)  # 1, 1.5, 2, 3, 4, 6
    b = tl.where(mag >= 2, normal, tl.where(mag == 1, 0x3F000000, 0)) | ((code & 8) << 28)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def exp2i(k):
    """Exact fp32 ``2**k`` for int32 ``k`` in [-127, 127] (``2**-127`` is subnormal)."""
    return tl.where(k >= -126, (k + 127) << 23, 0x00400000).to(tl.float32, bitcast=True)


@triton.jit
def mx_scale_byte(amax_bits, E_ELEM: tl.constexpr, M_ELEM: tl.constexpr):
    """OCP MX scale byte (int32) of blocks with finite ``amax`` given as fp32 bits.

    ``E_ELEM`` / ``M_ELEM``: frexp exponent and fp32 mantissa field of the element's
    largest value (448: 9 / 0x600000; 6: 3 / 0x400000). From ``amax = 2**(e-127) * 1.f``,
    the smallest ``E`` with ``amax <= M * 2**E`` is ``e - 126 - E_ELEM + (f > f_M)``; a
    subnormal ``amax`` is normalized exactly through an int -> fp32 conversion."""
    e = amax_bits >> 23
    f = amax_bits & 0x7FFFFF
    fb = f.to(tl.float32).to(tl.int32, bitcast=True)  # exact: f < 2**23
    sub = e == 0
    e = tl.where(sub, (fb >> 23) - 149, e)
    f = tl.where(sub, fb & 0x7FFFFF, f)
    b = e + 1 - E_ELEM + (f > M_ELEM).to(tl.int32)
    b = tl.minimum(tl.maximum(b, 0), E8M0_MAX_BYTE)
    return tl.where(amax_bits == 0, 0, b)


@triton.jit
def encode_bf16(v):
    """fp32 -> bf16 bits in an int32 (0..65535): round to nearest even, every NaN ->
    the canonical 0x7FC0 (as ``moewire.formats.elements.canonical_nan``)."""
    bits = v.to(tl.int32, bitcast=True)
    r = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    return tl.where((bits & 0x7FFFFFFF) > F32_INF_BITS, BF16_NAN_BITS, r)


@triton.jit
def decode_bf16(b):
    """bf16 bits (int32, low 16 bits) -> fp32 (exact)."""
    return (b << 16).to(tl.float32, bitcast=True)


@triton.jit
def canonical_nan_bits(v):
    """fp32 -> bits as int32, with every NaN replaced by 0x7FC00000."""
    bits = v.to(tl.int32, bitcast=True)
    return tl.where((bits & 0x7FFFFFFF) > F32_INF_BITS, F32_NAN_BITS, bits)
