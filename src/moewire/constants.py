"""Every magic number of the wire formats, named once (see WIRE_FORMATS.md)."""

from __future__ import annotations

from enum import IntEnum

#: Largest finite magnitude of e4m3 (``float8_e4m3fn``).
E4M3_MAX = 448.0
#: Byte of an e4m3 NaN as written on the wire (positive quiet NaN).
E4M3_NAN_BYTE = 0x7F

#: Largest magnitude of e2m1 (FP4).
E2M1_MAX = 6.0
#: Magnitudes of the eight e2m1 codes 0..7 (bit 3 is the sign).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

#: e8m0 exponent bias: byte ``b`` means ``2**(b - 127)``.
E8M0_BIAS = 127
#: e8m0 byte meaning NaN.
E8M0_NAN_BYTE = 0xFF
#: Largest finite e8m0 byte a quantizer writes.
E8M0_MAX_BYTE = 254

#: fp32(1/6), bit pattern 0x3E2AAAAB: step 2 of the nvfp4 scale.
RCP6_BITS = 0x3E2AAAAB

#: Floor of the per-token / per-block amax of the DeepSeek-style fp8 formats.
FP8_AMAX_FLOOR = 1e-4

#: Block sizes.
NVFP4_BLOCK = 16
MX_BLOCK = 32
FP8_BLOCK128 = 128


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints, in integer arithmetic."""
    return -(-a // b)


#: Every section of a row starts at a multiple of this many bytes; rows are padded to it too.
ROW_ALIGN = 16

#: nvfp4 global scale from a calibrated amax: ``g = NVFP4_GLOBAL_NUMERATOR / amax``.
NVFP4_GLOBAL_NUMERATOR = E4M3_MAX * E2M1_MAX  # 2688

#: Swizzled scale tile of the NVFP4 GEMM kernels: 128 rows x 4 scale columns.
SWIZZLE_ROWS = 128
SWIZZLE_COLS = 4

#: Floor of the per-row amax of the dynamic nvfp4 combine codec (``g_t = 2688 / max(amax,
#: floor)``): keeps ``g_t`` finite and every intermediate of the scale math a normal fp32.
COMBINE_NVFP4_AMAX_FLOOR = 1e-4


class Kind(IntEnum):
    """Kernel ids: the recipe a Triton kernel compiles, passed as a ``tl.constexpr`` (each
    format's is its class attribute ``kind``)."""

    BF16 = 0
    FP8 = 1  # fp8 and fp8_block128: an fp32 scale per block
    MXFP8 = 2
    NVFP4 = 3
    MXFP4 = 4
    NVFP4_DYN = 5  # the combine codec's nvfp4, its global scale stored in the row
