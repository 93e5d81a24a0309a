"""Fused quantize + pack: activations ``x [T, H]`` -> complete wire rows ``[T, R]``, one pass.

A token's blocks are cut into chunks of ``NBLK`` blocks; one program quantizes ``GROUP``
consecutive chunks of one token (reading each value once, writing its payload and scale
bytes), and the program of the last chunk also writes the rest of row ``t``: the zero
padding after the payload and after the scales, and up to :data:`MAX_EXTRAS` extras (their
bytes verbatim, then zeros up to the next section). Every byte of the row is written
exactly once.

Rows are 16-byte aligned (the launcher guarantees it), so fp32 scales and bf16 payloads are
stored through typed pointers at their section offsets.

Two ways to read ``x``. The general one loads ``x[t, i]`` one value at a time (any dtype, any
strides). With ``WORDS`` (bfloat16 ``x`` with unit column stride and 4-byte aligned rows,
the common case, chosen by the launcher) the block formats read ``x`` as int32 words of two
bf16 values, shaped ``[NBLK, P, 4]`` (``P`` = words per block / 4), so that a thread holds
whole runs of a scale block (for the fp4 formats' small blocks, whole blocks: the absmax is a
reduction in registers), and the two values of a word give one packed byte (fp4) or one
e4m3 pair (fp8) without reshuffling values between threads. The e4m3 formats can use the
tile ``[P, NBLK, 4]`` instead (``PMAJ``): Triton then puts consecutive lanes along a block,
which coalesces their loads and stores (the block reductions cross lanes). Same fp32
operations, same bytes.

On the GPU (``PAIRS``) the fp4 formats' word path encodes two values per instruction where
it can, in inline PTX (``fp4_pairs.py``); the integer encoder of ``elements.py``
(interpreter, ``HW=False``) gives the same bytes, and the GPU tests compare both with the
torch reference.

Files: ``access.py`` (reading ``x``, the row's tail), ``recipes.py`` (the block recipes),
``e4m3.py`` / ``e2m1.py`` (each family's chunk quantizers), ``fp4_pairs.py`` (the PTX
pair encoders); this file holds the kernels.

Shape legend: ``T`` tokens, ``H`` hidden, ``R`` row bytes, ``NB`` scale blocks per token,
``NBLK`` blocks per chunk, ``GROUP`` chunks per program, ``BLKP`` values per block padded
to a power of two.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moewire.formats._kernels.access import copy_extras, load_words, load_x, zero_fill
from moewire.formats._kernels.consts import KIND_BF16, KIND_FP8, KIND_MXFP8
from moewire.formats._kernels.e2m1 import quant_e2m1_blocks, quant_e2m1_words
from moewire.formats._kernels.e4m3 import quant_e4m3_blocks, quant_e4m3_words
from moewire.formats._kernels.elements import encode_bf16

#: Extras written by the pack kernel itself; more go through :func:`extras_kernel`.
MAX_EXTRAS = 4


@triton.jit
def _quant_bf16(x_ptr, t, sxt, sxh, row_ptr, c, H, BLKP: tl.constexpr, HW: tl.constexpr):
    i = c * BLKP + tl.arange(0, BLKP)
    m = i < H
    x = load_x(x_ptr, t, sxt, sxh, i, m, HW)
    tl.store(row_ptr.to(tl.pointer_type(tl.int16)) + i, encode_bf16(x).to(tl.int16), mask=m)


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
    n_groups,
    g,
    inv_g,
    pads,
    extras,
    KIND: tl.constexpr,
    NBLK: tl.constexpr,
    BLKP: tl.constexpr,
    FULL: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    NUM_EXTRAS: tl.constexpr,
    EBLOCK: tl.constexpr,
    EITER: tl.constexpr,
    HW: tl.constexpr,
    WORDS: tl.constexpr,
    CHUNK_FAST: tl.constexpr,
    GROUP: tl.constexpr,
    DEPTH: tl.constexpr,
    PMAJ: tl.constexpr,
    PAIRS: tl.constexpr,
):
    """Program ``(t, p)``: chunks ``p * GROUP ..`` (``GROUP`` chunks of NBLK blocks each) of
    token ``t``; the program of the last chunk also writes the token's tail bytes (one
    thread block fewer per token). On the word path the program loads its next chunk (or
    next two: ``DEPTH``) before it quantizes the current one, so loads are in flight
    during the arithmetic. ``PMAJ``: the word tiles' block axis second (e4m3 formats only;
    see ``access.load_words``). ``PAIRS``: the fp4 formats' pair encoders (GPU only; the
    launcher decides, see ``_triton._pair_encoders``).
    ``CHUNK_FAST``: the grid is ``(n_groups, T)`` (consecutive programs walk along one row;
    the launcher keeps ``T`` within the grid's second dimension); otherwise ``(T, n_groups)``.
    ``pads``: ``(lo, hi, lo, hi)``, the zero bytes after the payload and after the scales;
    ``extras``: :data:`MAX_EXTRAS` tuples ``(ptr, stride, offset, nbytes, span)``, the first
    ``NUM_EXTRAS`` used (``access.copy_extras``)."""
    if CHUNK_FAST:
        grp = tl.program_id(0)
        t = tl.program_id(1).to(tl.int64)
    else:
        t = tl.program_id(0).to(tl.int64)
        grp = tl.program_id(1)
    row_ptr = rows_ptr + t * srt
    c0 = grp * GROUP
    if WORDS:
        NW = H // 2
        P: tl.constexpr = BLKP // 8
        # tile: the chunk to quantize now; nxt, nxt2: the next ones, already loading
        tile = load_words(x_ptr, t, sxt, c0, NB, NW, NBLK, P, FULL, PMAJ)
        if DEPTH > 1 and GROUP > 1:
            nxt = load_words(x_ptr, t, sxt, c0 + 1, NB, NW, NBLK, P, FULL, PMAJ)
        for i in tl.static_range(GROUP):
            if DEPTH > 1 and i + 2 < GROUP:
                nxt2 = load_words(x_ptr, t, sxt, c0 + i + 2, NB, NW, NBLK, P, FULL, PMAJ)
            elif DEPTH == 1 and i + 1 < GROUP:
                nxt = load_words(x_ptr, t, sxt, c0 + i + 1, NB, NW, NBLK, P, FULL, PMAJ)
            if KIND == KIND_FP8 or KIND == KIND_MXFP8:  # noqa: SIM109 (constexpr test)
                quant_e4m3_words(tile, row_ptr, scale_off, KIND, NBLK, HW, PMAJ)
            else:
                quant_e2m1_words(tile, row_ptr, scale_off, g, inv_g, KIND, NBLK, HW, PAIRS)
            if i + 1 < GROUP:
                tile = nxt
            if DEPTH > 1 and i + 2 < GROUP:
                nxt = nxt2
    else:
        for i in tl.static_range(GROUP):
            c = c0 + i
            if KIND == KIND_BF16:
                _quant_bf16(x_ptr, t, sxt, sxh, row_ptr, c, H, BLKP, HW)
            elif KIND == KIND_FP8 or KIND == KIND_MXFP8:  # noqa: SIM109 (constexpr test)
                quant_e4m3_blocks(
                    x_ptr, t, sxt, sxh, row_ptr, c, H, NB, scale_off, KIND, NBLK, BLKP, FULL, HW
                )
            else:
                quant_e2m1_blocks(
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
                    KIND,
                    NBLK,
                    BLKP,
                    HW,
                )
    if HAS_TAIL:  # noqa: SIM102 (a constexpr test, then a runtime one)
        if grp == n_groups - 1:
            zero_fill(row_ptr, pads[0], pads[1])
            zero_fill(row_ptr, pads[2], pads[3])
            copy_extras(row_ptr, t, extras, NUM_EXTRAS, EBLOCK, EITER)


@triton.jit
def extras_kernel(
    rows_ptr,
    srt,
    extras,
    NUM_EXTRAS: tl.constexpr,
    EBLOCK: tl.constexpr,
    EITER: tl.constexpr,
):
    """Grid ``(T,)``: extras beyond the first :data:`MAX_EXTRAS`, in groups of that many."""
    t = tl.program_id(0).to(tl.int64)
    copy_extras(rows_ptr + t * srt, t, extras, NUM_EXTRAS, EBLOCK, EITER)
