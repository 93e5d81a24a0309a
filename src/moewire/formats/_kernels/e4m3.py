"""The pack kernel's e4m3 formats (fp8, fp8_block128, mxfp8): one chunk of blocks of a token
quantized and stored, read one value at a time (:func:`quant_e4m3_blocks`) or as bf16
words (:func:`quant_e4m3_words`, two values per word give one e4m3 pair). The recipes are
``recipes.py``'s.

Shape legend: ``NB`` scale blocks per token, ``NBLK`` blocks per chunk, ``BLKP`` values
per block padded to a power of two, ``H`` hidden.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moewire.formats._kernels.access import (
    block_tile,
    load_x,
    per_block,
    split_words,
    words_amax_bits,
)
from moewire.formats._kernels.consts import (
    E4M3_MAX_EXP,
    E4M3_MAX_MANT,
    E8M0_NAN_BYTE,
    KIND_FP8,
)
from moewire.formats._kernels.elements import encode_e4m3, exp2i
from moewire.formats._kernels.recipes import fp8_scale, mx_scale


@triton.jit
def e4m3_pair(lo, hi, HW: tl.constexpr):
    """Two fp32 -> two e4m3 bytes in an int16 (``lo`` in the low byte). ``HW``: one
    ``cvt.rn.satfinite.e4m3x2.f32``; its saturation to +-448 is the clamp of the integer
    encoder, and a NaN product is the GPU's canonical NaN, encoded 0x7F (the tests check
    both paths byte for byte)."""
    if HW:
        q = tl.inline_asm_elementwise(
            "cvt.rn.satfinite.e4m3x2.f32 $0, $2, $1;",
            "=h,r,r",
            [lo, hi],
            dtype=tl.int16,
            is_pure=True,
            pack=1,
        )
    else:
        q = encode_e4m3(lo, False).to(tl.int16) | (encode_e4m3(hi, False).to(tl.int16) << 8)
    return q


@triton.jit
def quant_e4m3_blocks(
    x_ptr,
    t,
    sxt,
    sxh,
    row_ptr,
    c,
    H,
    NB,
    scale_off,
    KIND: tl.constexpr,
    NBLK: tl.constexpr,
    BLKP: tl.constexpr,
    FULL: tl.constexpr,
    HW: tl.constexpr,
):
    blk, idx, bm, m = block_tile(c, H, NB, NBLK, BLKP, FULL)
    x = load_x(x_ptr, t, sxt, sxh, idx, m, HW)
    # amax on the magnitudes' bits: integer order is float order, and NaN (> 0x7F800000)
    # propagates the way torch's amax does.
    amax_bits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
    if KIND == KIND_FP8:
        k, s_bits = fp8_scale(amax_bits)
        q = encode_e4m3(x * k[:, None], HW)
        s_ptr = (row_ptr + scale_off).to(tl.pointer_type(tl.int32))
        tl.store(s_ptr + blk, s_bits, mask=bm)
    else:
        bad, b, n = mx_scale(amax_bits, E4M3_MAX_EXP, E4M3_MAX_MANT)
        q = encode_e4m3(x * exp2i(n)[:, None], HW)
        q = q & tl.where(bad, 0, 0xFF).to(tl.uint8)[:, None]  # non-finite block: zero codes
        sb = tl.where(bad, E8M0_NAN_BYTE, b).to(tl.uint8)
        tl.store(row_ptr + scale_off + blk, sb, mask=bm)
    tl.store(row_ptr + idx, q, mask=m)


@triton.jit
def quant_e4m3_words(
    tile,
    row_ptr,
    scale_off,
    KIND: tl.constexpr,
    NBLK: tl.constexpr,
    HW: tl.constexpr,
    PMAJ: tl.constexpr,
):
    w, widx, m, blk, bm = tile
    lo, hi = split_words(w)
    amax_bits = words_amax_bits(lo, hi, PMAJ)
    if KIND == KIND_FP8:
        k, s_bits = fp8_scale(amax_bits)
        k = per_block(k, PMAJ)
        q = e4m3_pair(lo * k, hi * k, HW)
        s_ptr = (row_ptr + scale_off).to(tl.pointer_type(tl.int32))
        tl.store(s_ptr + blk, s_bits, mask=bm)
    else:
        bad, b, n = mx_scale(amax_bits, E4M3_MAX_EXP, E4M3_MAX_MANT)
        k = per_block(exp2i(n), PMAJ)
        q = e4m3_pair(lo * k, hi * k, HW) & per_block(tl.where(bad, 0, -1).to(tl.int16), PMAJ)
        sb = tl.where(bad, E8M0_NAN_BYTE, b).to(tl.uint8)
        tl.store(row_ptr + scale_off + blk, sb, mask=bm)
    tl.store(row_ptr.to(tl.pointer_type(tl.int16)) + widx, q, mask=m)
