"""The block recipes of the scaled formats (WIRE_FORMATS.md, "Formats"), each once, from a
block's amax given as fp32 bits (NaN propagated): the scale to store and the factor that
scales the block's values before the element encode. Every kernel that quantizes uses
these (pack, the combine codec, the expert stage), so a recipe is written in Triton once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moewire.formats._kernels.consts import (
    E4M3_MAX,
    E8M0_BIAS,
    F32_INF_BITS,
    FP8_AMAX_FLOOR,
    RCP6,
)
from moewire.formats._kernels.elements import (
    canonical_nan_bits,
    decode_e4m3,
    encode_e4m3,
    mx_scale_byte,
)


@triton.jit
def fp8_scale(amax_bits):
    """fp8 / fp8_block128 (and the expert stage's per-row fp8): ``a = max(amax, 1e-4)``
    (NaN kept) -> the factor ``448 / a`` and the stored scale ``a / 448`` as canonical-NaN
    fp32 bits, both correctly rounded."""
    amax = amax_bits.to(tl.float32, bitcast=True)
    a = tl.where(amax_bits > F32_INF_BITS, amax, tl.maximum(amax, FP8_AMAX_FLOOR))
    c = tl.zeros_like(a) + E4M3_MAX
    return tl.math.div_rn(c, a), canonical_nan_bits(tl.math.div_rn(a, c))


@triton.jit
def mx_scale(amax_bits, E_ELEM: tl.constexpr, M_ELEM: tl.constexpr):
    """mxfp8 / mxfp4: ``(bad, b, n)``, the blocks with a NaN or Inf, the scale byte of the
    others (int32; the stored byte is 0xFF where ``bad``) and the exponent ``n = 127 - b``
    of the factor ``2**n`` that scales the block's values."""
    bad = amax_bits >= F32_INF_BITS
    b = mx_scale_byte(tl.where(bad, 0, amax_bits), E_ELEM, M_ELEM)
    return bad, b, tl.full(b.shape, E8M0_BIAS, tl.int32) - b


@triton.jit
def nvfp4_scale(amax_bits, g, inv_g, HW: tl.constexpr):
    """nvfp4 steps 2-4 with global scale ``g`` (scalar or per block) and ``inv_g = 1/g``:
    the e4m3 scale byte ``S`` (uint8, before the non-finite rule) and the factor
    ``out = 0 if S == 0 else 1 / (S * (1/g))``."""
    vmax = amax_bits.to(tl.float32, bitcast=True)
    s = g * (vmax * RCP6)
    sb = encode_e4m3(tl.minimum(s, E4M3_MAX), HW)
    sv = decode_e4m3(sb, HW)
    one = tl.full(sv.shape, 1.0, tl.float32)
    out = tl.where(sv == 0.0, 0.0, tl.math.div_rn(one, sv * inv_g))
    return sb, out
