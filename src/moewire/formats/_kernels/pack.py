"""Fused quantize + pack: activations ``x [T, H]`` -> complete wire rows ``[T, R]``, one pass.

Grid ``(T, n_chunks + has_tail)``. Program ``(t, c)`` with ``c < n_chunks`` reads ``NBLK``
scale blocks of token ``t`` once, and writes their payload and scale bytes; program
``(t, n_chunks)`` writes the rest of row ``t``: the zero padding after the payload and after
the scales, and up to :data:`MAX_EXTRAS` extras (their bytes verbatim, then zeros up to the
next section). Every byte of the row is written exactly once.

Rows are 16-byte aligned (the launcher guarantees it), so fp32 scales and bf16 payloads are
stored through typed pointers at their section offsets.

Shape legend: ``T`` tokens, ``H`` hidden, ``R`` row bytes, ``NB`` scale blocks per token,
``NBLK`` blocks per program, ``BLKP`` values per block padded to a power of two.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moewire.formats._kernels.elements import (
    canonical_nan_bits,
    decode_bf16,
    decode_e4m3,
    encode_bf16,
    encode_e2m1,
    encode_e4m3,
    exp2i,
    mx_scale_byte,
)

KIND_BF16: tl.constexpr = tl.constexpr(0)
KIND_FP8: tl.constexpr = tl.constexpr(1)  # fp8 and fp8_block128: fp32 scale per block
KIND_MXFP8: tl.constexpr = tl.constexpr(2)
KIND_NVFP4: tl.constexpr = tl.constexpr(3)
KIND_MXFP4: tl.constexpr = tl.constexpr(4)
#: Extras written by the pack kernel itself; more go through :func:`extras_kernel`.
MAX_EXTRAS = 4


@triton.jit
def _load_x(x_ptr, t, sxt, sxh, idx, mask, HW: tl.constexpr):
    ptr = x_ptr + t * sxt + idx * sxh
    if x_ptr.dtype.element_ty == tl.bfloat16 and not HW:
        # bf16 -> fp32 from the bits (the interpreter's cast mishandles bf16 subnormals)
        b = tl.load(ptr.to(tl.pointer_type(tl.uint16)), mask=mask, other=0)
        x = decode_bf16(b.to(tl.int32))
    else:
        x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _quant_bf16(x_ptr, t, sxt, sxh, row_ptr, c, H, BLKP: tl.constexpr, HW: tl.constexpr):
    i = c * BLKP + tl.arange(0, BLKP)
    m = i < H
    x = _load_x(x_ptr, t, sxt, sxh, i, m, HW)
    tl.store(row_ptr.to(tl.pointer_type(tl.int16)) + i, encode_bf16(x).to(tl.int16), mask=m)


@triton.jit
def _quant_e4m3_blocks(
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
    blk = c * NBLK + tl.arange(0, NBLK)
    idx = blk[:, None] * BLKP + tl.arange(0, BLKP)[None, :]
    bm = blk < NB
    m = bm[:, None]
    if not FULL:  # fp8: one block of H values, padded to BLKP
        m = m & (idx < H)
    x = _load_x(x_ptr, t, sxt, sxh, idx, m, HW)
    # amax on the magnitudes' bits: integer order is float order, and NaN (> 0x7F800000)
    # propagates the way torch's amax does.
    amax_bits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
    if KIND == KIND_FP8:
        amax = amax_bits.to(tl.float32, bitcast=True)
        a = tl.where(amax_bits > 0x7F800000, amax, tl.maximum(amax, 1e-4))
        k = tl.math.div_rn(tl.full([NBLK], 448.0, tl.float32), a)
        q = encode_e4m3(x * k[:, None], HW)
        s = tl.math.div_rn(a, tl.full([NBLK], 448.0, tl.float32))
        s_ptr = (row_ptr + scale_off).to(tl.pointer_type(tl.int32))
        tl.store(s_ptr + blk, canonical_nan_bits(s), mask=bm)
    else:
        bad = amax_bits >= 0x7F800000
        b = mx_scale_byte(tl.where(bad, 0, amax_bits), 9, 0x600000)  # 448 = 0.875 * 2**9
        q = encode_e4m3(x * exp2i(127 - b)[:, None], HW)
        q = q & tl.where(bad, 0, 0xFF).to(tl.uint8)[:, None]  # non-finite block: zero codes
        tl.store(row_ptr + scale_off + blk, tl.where(bad, 0xFF, b).to(tl.uint8), mask=bm)
    tl.store(row_ptr + idx, q, mask=m)


@triton.jit
def _quant_e2m1_blocks(
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
    rcp6,
    KIND: tl.constexpr,
    NBLK: tl.constexpr,
    BLKP: tl.constexpr,
    HW: tl.constexpr,
):
    HALF: tl.constexpr = BLKP // 2
    blk = c * NBLK + tl.arange(0, NBLK)
    bm = blk < NB
    x = _load_x(
        x_ptr, t, sxt, sxh, blk[:, None] * BLKP + tl.arange(0, BLKP)[None, :], bm[:, None], HW
    )
    amax_bits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
    bad = amax_bits >= 0x7F800000
    if KIND == KIND_NVFP4:
        vmax = amax_bits.to(tl.float32, bitcast=True)
        s = g * (vmax * rcp6)
        sb = encode_e4m3(tl.minimum(s, 448.0), HW)
        sv = decode_e4m3(sb, HW)
        one = tl.full([NBLK], 1.0, tl.float32)
        out = tl.where(sv == 0.0, 0.0, tl.math.div_rn(one, sv * inv_g))
        codes = encode_e2m1(x * out[:, None])
        sb = tl.where(bad, 0x7F, sb).to(tl.uint8)
    else:
        b = mx_scale_byte(tl.where(bad, 0, amax_bits), 3, 0x400000)  # 6 = 0.75 * 2**3
        codes = encode_e2m1(x * exp2i(127 - b)[:, None])
        sb = tl.where(bad, 0xFF, b).to(tl.uint8)
    lo, hi = tl.split(tl.reshape(codes, [NBLK, HALF, 2]))
    packed = (lo | (hi << 4)).to(tl.uint8) & tl.where(bad, 0, 0xFF).to(tl.uint8)[:, None]
    j = tl.arange(0, HALF)
    tl.store(row_ptr + blk[:, None] * HALF + j[None, :], packed, mask=bm[:, None])
    tl.store(row_ptr + scale_off + blk, sb, mask=bm)


@triton.jit
def _zero_fill(row_ptr, lo, hi):
    i = lo + tl.arange(0, 16)  # padding gaps are shorter than 16 bytes
    tl.store(row_ptr + i, tl.zeros([16], tl.uint8), mask=i < hi)


@triton.jit
def _copy_extra(
    row_ptr, t, e_ptr, e_st, off, nbytes, span, EBLOCK: tl.constexpr, EITER: tl.constexpr
):
    src = e_ptr + t * e_st
    # a compile-time trip count: the interpreter cannot iterate over a runtime range
    for it in tl.static_range(EITER):
        i = it * EBLOCK + tl.arange(0, EBLOCK)
        v = tl.load(src + i, mask=i < nbytes, other=0)
        tl.store(row_ptr + off + i, v, mask=i < span)


@triton.jit
def _copy_extras(
    row_ptr,
    t,
    e0_ptr,
    e0_st,
    e0_off,
    e0_nb,
    e0_span,
    e1_ptr,
    e1_st,
    e1_off,
    e1_nb,
    e1_span,
    e2_ptr,
    e2_st,
    e2_off,
    e2_nb,
    e2_span,
    e3_ptr,
    e3_st,
    e3_off,
    e3_nb,
    e3_span,
    NUM_EXTRAS: tl.constexpr,
    EBLOCK: tl.constexpr,
    EITER: tl.constexpr,
):
    if NUM_EXTRAS > 0:
        _copy_extra(row_ptr, t, e0_ptr, e0_st, e0_off, e0_nb, e0_span, EBLOCK, EITER)
    if NUM_EXTRAS > 1:
        _copy_extra(row_ptr, t, e1_ptr, e1_st, e1_off, e1_nb, e1_span, EBLOCK, EITER)
    if NUM_EXTRAS > 2:
        _copy_extra(row_ptr, t, e2_ptr, e2_st, e2_off, e2_nb, e2_span, EBLOCK, EITER)
    if NUM_EXTRAS > 3:
        _copy_extra(row_ptr, t, e3_ptr, e3_st, e3_off, e3_nb, e3_span, EBLOCK, EITER)


@triton.jit
def pack_kernel(
    x_ptr,
    sxt,
    sxh,
    rows_ptr,
    srt,
    H,
    NB,
    scale_off,
    n_chunks,
    g,
    inv_g,
    rcp6,
    pad0_lo,
    pad0_hi,
    pad1_lo,
    pad1_hi,
    e0_ptr,
    e0_st,
    e0_off,
    e0_nb,
    e0_span,
    e1_ptr,
    e1_st,
    e1_off,
    e1_nb,
    e1_span,
    e2_ptr,
    e2_st,
    e2_off,
    e2_nb,
    e2_span,
    e3_ptr,
    e3_st,
    e3_off,
    e3_nb,
    e3_span,
    KIND: tl.constexpr,
    NBLK: tl.constexpr,
    BLKP: tl.constexpr,
    FULL: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    NUM_EXTRAS: tl.constexpr,
    EBLOCK: tl.constexpr,
    EITER: tl.constexpr,
    HW: tl.constexpr,
):
    """One program: NBLK blocks of one token, or (c == n_chunks) that token's tail bytes."""
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    row_ptr = rows_ptr + t * srt
    if c < n_chunks:
        if KIND == KIND_BF16:
            _quant_bf16(x_ptr, t, sxt, sxh, row_ptr, c, H, BLKP, HW)
        elif KIND == KIND_FP8 or KIND == KIND_MXFP8:  # noqa: SIM109 (constexpr test in @jit)
            _quant_e4m3_blocks(
                x_ptr, t, sxt, sxh, row_ptr, c, H, NB, scale_off, KIND, NBLK, BLKP, FULL, HW
            )
        else:
            _quant_e2m1_blocks(
                x_ptr, t, sxt, sxh, row_ptr, c, NB, scale_off, g, inv_g, rcp6, KIND, NBLK, BLKP, HW
            )
    elif HAS_TAIL:
        _zero_fill(row_ptr, pad0_lo, pad0_hi)
        _zero_fill(row_ptr, pad1_lo, pad1_hi)
        _copy_extras(
            row_ptr,
            t,
            e0_ptr,
            e0_st,
            e0_off,
            e0_nb,
            e0_span,
            e1_ptr,
            e1_st,
            e1_off,
            e1_nb,
            e1_span,
            e2_ptr,
            e2_st,
            e2_off,
            e2_nb,
            e2_span,
            e3_ptr,
            e3_st,
            e3_off,
            e3_nb,
            e3_span,
            NUM_EXTRAS,
            EBLOCK,
            EITER,
        )


@triton.jit
def extras_kernel(
    rows_ptr,
    srt,
    e0_ptr,
    e0_st,
    e0_off,
    e0_nb,
    e0_span,
    e1_ptr,
    e1_st,
    e1_off,
    e1_nb,
    e1_span,
    e2_ptr,
    e2_st,
    e2_off,
    e2_nb,
    e2_span,
    e3_ptr,
    e3_st,
    e3_off,
    e3_nb,
    e3_span,
    NUM_EXTRAS: tl.constexpr,
    EBLOCK: tl.constexpr,
    EITER: tl.constexpr,
):
    """Grid ``(T,)``: extras beyond the first :data:`MAX_EXTRAS`, in groups of that many."""
    t = tl.program_id(0).to(tl.int64)
    _copy_extras(
        rows_ptr + t * srt,
        t,
        e0_ptr,
        e0_st,
        e0_off,
        e0_nb,
        e0_span,
        e1_ptr,
        e1_st,
        e1_off,
        e1_nb,
        e1_span,
        e2_ptr,
        e2_st,
        e2_off,
        e2_nb,
        e2_span,
        e3_ptr,
        e3_st,
        e3_off,
        e3_nb,
        e3_span,
        NUM_EXTRAS,
        EBLOCK,
        EITER,
    )
