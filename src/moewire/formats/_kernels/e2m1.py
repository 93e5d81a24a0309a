"""The pack kernel's e2m1 formats (nvfp4, mxfp4): one chunk of blocks of a token quantized
and stored, read one value at a time (:func:`quant_e2m1_blocks`) or as bf16 words
(:func:`quant_e2m1_words`: the two values of a word give one packed byte). On the word path
``PAIRS`` (GPU only) encodes with ``fp4_pairs.py``'s inline PTX instead of the integer
encoder; both give the same bytes. The recipes are ``recipes.py``'s.

Shape legend: ``NB`` scale blocks per token, ``NBLK`` blocks per chunk, ``BLKP`` values
per block.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moewire.formats._kernels.access import load_x, split_words, words_amax_bits
from moewire.formats._kernels.consts import (
    E2M1_MAX_EXP,
    E2M1_MAX_MANT,
    E4M3_NAN_BYTE,
    E8M0_NAN_BYTE,
    F32_INF_BITS,
    KIND_NVFP4,
)
from moewire.formats._kernels.elements import encode_e2m1, encode_e2m1_mag, exp2i
from moewire.formats._kernels.fp4_pairs import max_u16x2, mxfp4_bytes_hw, nvfp4_bytes_hw
from moewire.formats._kernels.recipes import mx_scale, nvfp4_scale


@triton.jit
def quant_e2m1_words(
    tile,
    row_ptr,
    scale_off,
    g,
    inv_g,
    KIND: tl.constexpr,
    NBLK: tl.constexpr,
    HW: tl.constexpr,
    PAIRS: tl.constexpr,
):
    w, widx, m, blk, bm = tile
    if PAIRS:
        # |x| as bf16 bits, two per word; their lane-wise max is the block's amax (integer
        # order is magnitude order; a NaN is above Inf, so it propagates)
        a = w & 0x7FFF7FFF
        mm = tl.reduce(tl.reduce(a, 2, max_u16x2), 1, max_u16x2)
        amax_bits = tl.maximum(mm & 0xFFFF, (mm >> 16) & 0xFFFF) << 16
    else:
        lo, hi = split_words(w)
        amax_bits = words_amax_bits(lo, hi, False)
    if KIND == KIND_NVFP4:
        bad = amax_bits >= F32_INF_BITS
        keep = tl.where(bad, 0, -1)[:, None, None]
        sb, out = nvfp4_scale(amax_bits, g, inv_g, HW)
        k = out[:, None, None]
        sb = tl.where(bad, E4M3_NAN_BYTE, sb).to(tl.uint8)
        if PAIRS:
            k6 = tl.broadcast_to(k * 0.015625, w.shape)  # exact: the launcher checked g
            byte = nvfp4_bytes_hw(a, w, k6, tl.broadcast_to(keep, w.shape))
        else:
            byte = _e2m1_bytes(w, lo * k, hi * k, keep, True)
    else:
        bad, b, n = mx_scale(amax_bits, E2M1_MAX_EXP, E2M1_MAX_MANT)
        keep = tl.where(bad, 0, -1)[:, None, None]
        sb = tl.where(bad, E8M0_NAN_BYTE, b).to(tl.uint8)
        if PAIRS:
            # 2**n as bf16 bits (b <= 253 for a finite amax: n >= -126)
            k2 = (tl.where(n >= -126, (n + 127) << 7, 0x40) * 0x10001)[:, None, None]
            byte = mxfp4_bytes_hw(
                a, w, tl.broadcast_to(k2, w.shape), tl.broadcast_to(keep, w.shape)
            )
        else:
            k = exp2i(n)[:, None, None]
            # |x| * 2**n <= 6 by the choice of b: no saturation needed
            byte = _e2m1_bytes(w, lo * k, hi * k, keep, False)
    tl.store(row_ptr + widx, byte, mask=m)
    tl.store(row_ptr + scale_off + blk, sb, mask=bm)


@triton.jit
def _e2m1_bytes(w, plo, phi, keep, SAT: tl.constexpr):
    """Packed e2m1 bytes of words ``w`` from the scaled values of their low and high halves
    (integer encoder, exact everywhere); the products' signs are the inputs' (the scale is
    >= 0): bf16 sign bits 15 and 31 -> 3 and 7. ``keep``: 0 for a non-finite block."""
    code_lo = encode_e2m1_mag(plo, SAT)
    code_hi = encode_e2m1_mag(phi, SAT)
    sign = w.to(tl.uint32, bitcast=True) & 0x80008000
    code = (code_lo + (code_hi << 4)).to(tl.uint32, bitcast=True)
    byte = code | (sign >> 12) | (sign >> 24)
    return byte.to(tl.uint8) & keep.to(tl.uint8)


@triton.jit
def quant_e2m1_blocks(
    x_ptr,
    t,
    sxt,
    sxh,
    row_ptr,
    c,
    NB,
    scale_off,
    g,
    inv_g,
    KIND: tl.constexpr,
    NBLK: tl.constexpr,
    BLKP: tl.constexpr,
    HW: tl.constexpr,
):
    HALF: tl.constexpr = BLKP // 2
    blk = c * NBLK + tl.arange(0, NBLK)
    bm = blk < NB
    x = load_x(
        x_ptr, t, sxt, sxh, blk[:, None] * BLKP + tl.arange(0, BLKP)[None, :], bm[:, None], HW
    )
    amax_bits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
    if KIND == KIND_NVFP4:
        bad = amax_bits >= F32_INF_BITS
        sb, out = nvfp4_scale(amax_bits, g, inv_g, HW)
        codes = encode_e2m1(x * out[:, None])
        sb = tl.where(bad, E4M3_NAN_BYTE, sb).to(tl.uint8)
    else:
        bad, b, n = mx_scale(amax_bits, E2M1_MAX_EXP, E2M1_MAX_MANT)
        codes = encode_e2m1(x * exp2i(n)[:, None])
        sb = tl.where(bad, E8M0_NAN_BYTE, b).to(tl.uint8)
    packed = pack_e2m1_codes(codes, bad, NBLK, HALF)
    j = tl.arange(0, HALF)
    tl.store(row_ptr + blk[:, None] * HALF + j[None, :], packed, mask=bm[:, None])
    tl.store(row_ptr + scale_off + blk, sb, mask=bm)


@triton.jit
def pack_e2m1_codes(codes, bad, NBLK: tl.constexpr, HALF: tl.constexpr):
    """e2m1 codes ``[NBLK, 2*HALF]`` -> bytes ``[NBLK, HALF]`` (element ``2j`` in the low
    nibble), zero for the ``bad`` (non-finite) blocks."""
    lo, hi = tl.split(tl.reshape(codes, [NBLK, HALF, 2]))
    return (lo | (hi << 4)).to(tl.uint8) & tl.where(bad, 0, 0xFF).to(tl.uint8)[:, None]
