"""``moewire.constants`` as ``tl.constexpr`` values, the form ``@triton.jit`` code can read
from a module's globals (kernel ids, element limits, scale rules, fp32 bit patterns)."""

from __future__ import annotations

import math
import struct

import triton.language as tl

from moewire import constants as c


def _f32_bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def _frexp_fields(v: float) -> tuple[int, int]:
    """(frexp exponent, fp32 mantissa field) of ``v``: 448 -> (9, 0x600000)."""
    m, e = math.frexp(v)
    return e, int((2 * m - 1) * 2**23)


KIND_BF16: tl.constexpr = tl.constexpr(c.Kind.BF16.value)
KIND_FP8: tl.constexpr = tl.constexpr(c.Kind.FP8.value)
KIND_MXFP8: tl.constexpr = tl.constexpr(c.Kind.MXFP8.value)
KIND_NVFP4: tl.constexpr = tl.constexpr(c.Kind.NVFP4.value)
KIND_MXFP4: tl.constexpr = tl.constexpr(c.Kind.MXFP4.value)
KIND_NVFP4_DYN: tl.constexpr = tl.constexpr(c.Kind.NVFP4_DYN.value)

E4M3_MAX: tl.constexpr = tl.constexpr(c.E4M3_MAX)
E4M3_MAX_BITS: tl.constexpr = tl.constexpr(_f32_bits(c.E4M3_MAX))
E4M3_NAN_BYTE: tl.constexpr = tl.constexpr(c.E4M3_NAN_BYTE)
E2M1_MAX: tl.constexpr = tl.constexpr(c.E2M1_MAX)
E2M1_MAX_BITS: tl.constexpr = tl.constexpr(_f32_bits(c.E2M1_MAX))
E8M0_BIAS: tl.constexpr = tl.constexpr(c.E8M0_BIAS)
E8M0_NAN_BYTE: tl.constexpr = tl.constexpr(c.E8M0_NAN_BYTE)
E8M0_MAX_BYTE: tl.constexpr = tl.constexpr(c.E8M0_MAX_BYTE)
#: The MX scale rule's frexp of the element's largest value (see ``mx_scale_byte``).
E4M3_MAX_EXP: tl.constexpr = tl.constexpr(_frexp_fields(c.E4M3_MAX)[0])
E4M3_MAX_MANT: tl.constexpr = tl.constexpr(_frexp_fields(c.E4M3_MAX)[1])
E2M1_MAX_EXP: tl.constexpr = tl.constexpr(_frexp_fields(c.E2M1_MAX)[0])
E2M1_MAX_MANT: tl.constexpr = tl.constexpr(_frexp_fields(c.E2M1_MAX)[1])

#: fp32(1/6), exactly (an fp32 constant in the kernels).
RCP6: tl.constexpr = tl.constexpr(struct.unpack("<f", struct.pack("<I", c.RCP6_BITS))[0])
FP8_AMAX_FLOOR: tl.constexpr = tl.constexpr(c.FP8_AMAX_FLOOR)
COMBINE_NVFP4_AMAX_FLOOR: tl.constexpr = tl.constexpr(c.COMBINE_NVFP4_AMAX_FLOOR)
NVFP4_GLOBAL_NUMERATOR: tl.constexpr = tl.constexpr(c.NVFP4_GLOBAL_NUMERATOR)
NVFP4_BLOCK: tl.constexpr = tl.constexpr(c.NVFP4_BLOCK)
FP8_BLOCK128: tl.constexpr = tl.constexpr(c.FP8_BLOCK128)
ROW_ALIGN: tl.constexpr = tl.constexpr(c.ROW_ALIGN)

#: fp32 bit patterns: +Inf (magnitude bits above it are NaN), the canonical quiet NaN, and
#: bf16's canonical NaN (its top half).
F32_INF_BITS: tl.constexpr = tl.constexpr(_f32_bits(math.inf))
F32_NAN_BITS: tl.constexpr = tl.constexpr(_f32_bits(math.nan))
BF16_NAN_BITS: tl.constexpr = tl.constexpr(_f32_bits(math.nan) >> 16)
