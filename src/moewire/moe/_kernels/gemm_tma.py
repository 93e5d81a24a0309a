"""A persistent rowwise-fp8 grouped GEMM fed by TMA: ``out[p] = a[p] @ w[e(p)].T``.

The prefill kernel of the fp8 experts: A is e4m3 ``[P, C]`` with one fp32 scale per row
(``sa [P]``), W is e4m3 ``[L, N, C]`` with one fp32 scale per output channel
(``sw [L, N]``), out is bf16 ``[P, N]``, ``(acc * sa) * sw`` rounded once, the rowwise fp8
GEMM's math (``torch._scaled_grouped_mm``, the ``fp8_loop`` oracle).

``NUM_PROGS`` programs (one per SM) walk the output tiles of every expert: each reads the
experts' row counts from the device offsets (no host sync), takes the tiles ``pid``,
``pid + NUM_PROGS``, ... of the ``GROUP_M``-swizzled order (``_tile_of``), and finds each
tile's expert and first row as ``block_grouped_gemm_kernel`` does (``_expert_of``). The
operand tiles come through tensor descriptors (TMA on Hopper: no address arithmetic in the
K loop, and the loads of the next tile overlap this tile's epilogue). A tile's rows past
its expert's end read the next expert's rows (or TMA's zeros past ``P``): they reach only
outputs that are masked out of the store. Rows past ``offsets[-1]`` are never written.

Under the interpreter the descriptors are over uint8 views and the tiles are widened
exactly to fp32 (``_e4m3_tile``).

Shape legend: ``P`` rows (sorted pairs), ``C`` input channels, ``N`` output channels,
``L`` experts, ``LP`` ``L`` padded to a power of two.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moewire.formats._kernels.dequant import OUT_BF16, _store_out
from moewire.moe._kernels.gemm_block import _e4m3_tile, _tile_of


@triton.jit
def _tile_counts(offs_ptr, L, BLOCK_M: tl.constexpr, LP: tl.constexpr):
    """The experts' first rows, end rows, and the prefix sum of their row tiles."""
    le = tl.arange(0, LP)
    ends = tl.load(offs_ptr + le, mask=le < L, other=0)
    starts = tl.load(offs_ptr + le - 1, mask=(le > 0) & (le < L), other=0)
    tiles = tl.where(le < L, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    return starts, ends, tl.cumsum(tiles, axis=0), tiles


@triton.jit
def tma_grouped_gemm_kernel(
    a_desc,
    sa_ptr,
    w_desc,
    sw_ptr,
    offs_ptr,
    out_ptr,
    N,
    C,
    L,
    NUM_PROGS,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    LP: tl.constexpr,
    HW: tl.constexpr,
    WS: tl.constexpr = False,
):
    """The tiles ``pid, pid + NUM_PROGS, ...`` (see the module docstring): ``a_desc`` over
    ``a [P, C]``, ``w_desc`` over ``w`` viewed ``[L * N, C]`` (blocks ``[BLOCK_M, BLOCK_K]``
    and ``[BLOCK_N, BLOCK_K]``), ``out [P, N]`` bf16 (an int16 view without ``HW``); ``N``
    a multiple of ``BLOCK_N``, ``C`` of ``BLOCK_K``. ``WS``: Triton's warp specialization
    of the tile loop (producer and consumer warps)."""
    starts, ends, last, tiles = _tile_counts(offs_ptr, L, BLOCK_M, LP)
    le = tl.arange(0, LP)
    MT = tl.sum(tiles, axis=0)
    NT = N // BLOCK_N
    KB = C // BLOCK_K
    for t in tl.range(tl.program_id(0), MT * NT, NUM_PROGS, flatten=not WS, warp_specialize=WS):
        tile, nt = _tile_of(t, MT, NT, GROUP_M)
        e = tl.sum((last <= tile).to(tl.int32), axis=0)
        here = le == e
        first_tile = tl.sum(tl.where(here, last - tiles, 0), axis=0)
        m0 = tl.sum(tl.where(here, starts, 0), axis=0) + (tile - first_tile) * BLOCK_M
        end = tl.sum(tl.where(here, ends, 0), axis=0)
        n0 = nt * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for kb in range(0, KB):
            a = _e4m3_tile(a_desc.load([m0, kb * BLOCK_K]), HW)
            w = _e4m3_tile(w_desc.load([e * N + n0, kb * BLOCK_K]), HW)
            acc = tl.dot(a, w.T, acc, max_num_imprecise_acc=BLOCK_K)
        rows = m0 + tl.arange(0, BLOCK_M)
        rm = rows < end
        cols = n0 + tl.arange(0, BLOCK_N)
        sa = tl.load(sa_ptr + rows, mask=rm, other=0.0)
        sw = tl.load(sw_ptr + e * N + cols)
        acc = (acc * sa[:, None]) * sw[None, :]
        o = rows.to(tl.int64)[:, None] * N + cols[None, :]
        _store_out(out_ptr, o, acc, rm[:, None], OUT_BF16, HW)
