"""How the pack kernels read ``x`` and write a row's tail: activations one value at a time
or as int32 words of two bf16 values (``WORDS``), the zero padding between sections and the
extras' bytes (see ``pack.py``).

Shape legend: ``NB`` scale blocks per token, ``NBLK`` blocks per chunk, ``P`` word quads
per block (``[NBLK, P, 4]`` word tiles), ``NW`` words per token.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moewire.formats._kernels.consts import ROW_ALIGN
from moewire.formats._kernels.elements import decode_bf16


@triton.jit
def load_x(x_ptr, t, sxt, sxh, idx, mask, HW: tl.constexpr):
    ptr = x_ptr + t * sxt + idx * sxh
    if x_ptr.dtype.element_ty == tl.bfloat16 and not HW:
        # bf16 -> fp32 from the bits (the interpreter's cast mishandles bf16 subnormals)
        b = tl.load(ptr.to(tl.pointer_type(tl.uint16)), mask=mask, other=0)
        x = decode_bf16(b.to(tl.int32))
    else:
        x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def block_tile(c, H, NB, NBLK: tl.constexpr, BLKP: tl.constexpr, FULL: tl.constexpr):
    """Chunk ``c`` of ``NBLK`` blocks of ``BLKP`` values: ``(blk, idx, bm, m)``, the block
    indices, the values' indices in the row, the blocks' mask and the values' mask (without
    ``FULL``, fp8's one block of ``H`` values padded to ``BLKP``, also ``idx < H``)."""
    blk = c * NBLK + tl.arange(0, NBLK)
    idx = blk[:, None] * BLKP + tl.arange(0, BLKP)[None, :]
    bm = blk < NB
    m = bm[:, None]
    if not FULL:
        m = m & (idx < H)
    return blk, idx, bm, m


@triton.jit
def absmax(a, b):
    # |.| max that propagates NaN (as torch's amax): a block with a NaN is non-finite
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def load_words(
    x_ptr,
    t,
    sxt,
    c,
    NB,
    NW,
    NBLK: tl.constexpr,
    P: tl.constexpr,
    FULL: tl.constexpr,
    PMAJ: tl.constexpr,
):
    """Chunk ``c`` of bf16 ``x[t]`` as int32 words ``[NBLK, P, 4]`` (block ``blk``: words
    ``4P*blk ..``), or ``[P, NBLK, 4]`` with ``PMAJ``: the same words, the block axis second,
    so that Triton spreads consecutive lanes along a block (coalesced loads and stores) rather
    than across blocks; the block reductions then cross lanes. Returns the tile
    ``(w, widx, m, blk, bm)``: the words, their index in the row, their mask, the chunk's
    block indices and the blocks' mask (a chunk past the last block loads nothing)."""
    blk = c * NBLK + tl.arange(0, NBLK)
    bm = blk < NB
    if PMAJ:
        widx = (
            tl.arange(0, P)[:, None, None] * 4
            + blk[None, :, None] * (4 * P)
            + tl.arange(0, 4)[None, None, :]
        )
    else:
        widx = (
            blk[:, None, None] * (4 * P)
            + tl.arange(0, P)[None, :, None] * 4
            + tl.arange(0, 4)[None, None, :]
        )
    m = per_block(bm, PMAJ)
    if not FULL:  # fp8: one block of NW words, padded to 4P
        m = m & (widx < NW)
    w = tl.load((x_ptr + t * sxt).to(tl.pointer_type(tl.int32)) + widx, mask=m, other=0)
    return w, widx, m, blk, bm


@triton.jit
def per_block(v, PMAJ: tl.constexpr):
    """``[NBLK]`` -> broadcastable against a word tile (see :func:`load_words`)."""
    r = v[None, :, None] if PMAJ else v[:, None, None]
    return r


@triton.jit
def split_words(w):
    """int32 words of two bf16 values -> the low and high values as fp32 (exact)."""
    lo = (w << 16).to(tl.float32, bitcast=True)
    hi = (w & -65536).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def words_amax_bits(lo, hi, PMAJ: tl.constexpr):
    """Bits of each block's largest ``|x|`` (``[NBLK]``; a NaN if the block has one)."""
    a = absmax(tl.abs(lo), tl.abs(hi))
    a = tl.reduce(a, 2, absmax)
    a = tl.reduce(a, 0, absmax) if PMAJ else tl.reduce(a, 1, absmax)
    return a.to(tl.int32, bitcast=True)


@triton.jit
def zero_fill(row_ptr, lo, hi):
    i = lo + tl.arange(0, ROW_ALIGN)  # padding gaps are shorter than ROW_ALIGN bytes
    tl.store(row_ptr + i, tl.zeros([ROW_ALIGN], tl.uint8), mask=i < hi)


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
def copy_extras(
    row_ptr, t, extras, NUM_EXTRAS: tl.constexpr, EBLOCK: tl.constexpr, EITER: tl.constexpr
):
    """The first ``NUM_EXTRAS`` extras of row ``t``; ``extras``: a tuple of
    ``(ptr, row stride, offset in the row, nbytes, span incl. padding)``, one per extra."""
    for k in tl.static_range(NUM_EXTRAS):
        e = extras[k]
        _copy_extra(row_ptr, t, e[0], e[1], e[2], e[3], e[4], EBLOCK, EITER)
