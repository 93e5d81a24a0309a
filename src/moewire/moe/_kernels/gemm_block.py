"""A block-scaled fp8 grouped GEMM (DeepSeek-V3's recipe): ``out[p] = a[p] @ w[e(p)].T``.

A is e4m3 ``[P, C]`` with one fp32 scale per row per 128 input channels (``sa [P, C/128]``,
the ``fp8_block128`` wire format's scales), W is e4m3 ``[L, N, C]`` with one fp32 scale per
128x128 block (``sw [L, ceil(N/128), C/128]``, a checkpoint's ``weight_scale_inv``). Per K
step of 128 the fp32 product of the e4m3 tiles is scaled and added, as DeepGEMM promotes
its fp8 partial sums::

    acc += (dot(a_kb, w_kb.T) * sa[:, kb, None]) * sw[nb, kb]

then ``acc`` is rounded once to bf16. ``ROWWISE`` takes the rowwise fp8 GEMM's scales
instead (``sa [P]``, ``sw [L, N]``) and scales once after the K loop, ``(acc * sa) * sw``,
as ``torch._scaled_grouped_mm`` and ``small_grouped_gemm_kernel`` do.

No host sync: the launcher sizes the grid by an upper bound of the row tiles,
``cdiv(P, BLOCK_M) + L`` (each expert's last tile may be partial), times the column tiles;
each program finds its expert and row tile from the device offsets (the experts' tile
counts ``cdiv(count, BLOCK_M)``, their prefix sum) and programs past the last tile store
nothing. Rows past ``offsets[-1]`` are never written.

``SWAP`` computes the transposed tile ``w_tile @ a_tile.T`` (few rows per expert: the
weights' channels fill the tensor core's 64-row side). On the GPU the tiles are multiplied
as e4m3 by the tensor cores; under the interpreter they are widened to fp32 exactly.

Shape legend: ``P`` rows (sorted pairs), ``C`` input channels, ``N`` output channels,
``L`` experts, ``LP`` ``L`` padded to a power of two.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moewire.formats._kernels.consts import FP8_BLOCK128
from moewire.formats._kernels.dequant import OUT_BF16, _store_out
from moewire.formats._kernels.elements import decode_e4m3


@triton.jit
def _e4m3_tile(v, HW: tl.constexpr):
    """An operand tile as the dot takes it: on the GPU e4m3 as loaded (fp8 pointers, so
    the loads feed the tensor cores through the software pipeline); under the interpreter
    (uint8 views, no fp8 dtype) widened exactly to fp32."""
    if not HW:
        v = decode_e4m3(v, HW)
    return v


@triton.jit
def _tile_of(pid, MT, NT, GROUP_M: tl.constexpr):
    """Program ``pid`` -> (row tile, column tile), ``GROUP_M`` row tiles at a time over all
    column tiles (the programs running together share weight and activation tiles in L2)."""
    per_group = GROUP_M * NT
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(MT - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _expert_of(offs_ptr, L, tile, BLOCK_M: tl.constexpr, LP: tl.constexpr):
    """Row tile ``tile`` -> ``(e, m0, end)``: its expert, first row and the expert's end row
    (``e == L`` past the last tile)."""
    le = tl.arange(0, LP)
    ends = tl.load(offs_ptr + le, mask=le < L, other=0)
    starts = tl.load(offs_ptr + le - 1, mask=(le > 0) & (le < L), other=0)
    tiles = tl.where(le < L, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    last = tl.cumsum(tiles, axis=0)
    e = tl.sum((last <= tile).to(tl.int32), axis=0)
    first_tile = tl.sum(tl.where(le == e, last - tiles, 0), axis=0)
    m0 = tl.sum(tl.where(le == e, starts, 0), axis=0) + (tile - first_tile) * BLOCK_M
    return e, m0, tl.sum(tl.where(le == e, ends, 0), axis=0)


@triton.jit
def block_grouped_gemm_kernel(
    a_ptr,
    sa_ptr,
    w_ptr,
    sw_ptr,
    offs_ptr,
    out_ptr,
    N,
    C,
    L,
    MT,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    LP: tl.constexpr,
    ROWWISE: tl.constexpr,
    SWAP: tl.constexpr,
    HW: tl.constexpr,
):
    """One ``BLOCK_M x BLOCK_N`` output tile of one expert (see the module docstring):
    ``a [P, C]`` and ``w [L, N, C]`` e4m3, ``out [P, N]`` bf16 (without ``HW`` uint8 and
    int16 views), all row-major; ``C`` a multiple of ``BLOCK_K`` (128 without
    ``ROWWISE``: one scale per K step), ``BLOCK_N`` a multiple of 128; ``MT`` row tiles."""
    NT = tl.cdiv(N, BLOCK_N)
    tile, nt = _tile_of(tl.program_id(0), MT, NT, GROUP_M)
    e, m0, end = _expert_of(offs_ptr, L, tile, BLOCK_M, LP)
    if e < L:
        rows = m0 + tl.arange(0, BLOCK_M)
        rm = rows < end
        cols = nt * BLOCK_N + tl.arange(0, BLOCK_N)
        cm = cols < N
        kk = tl.arange(0, BLOCK_K)
        a_rows = a_ptr + rows.to(tl.int64) * C
        w_cols = w_ptr + (e.to(tl.int64) * N + cols.to(tl.int64)) * C
        KB = C // BLOCK_K
        NBW = tl.cdiv(N, FP8_BLOCK128)
        if SWAP:
            acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for kb in range(0, KB):
            k = kb * BLOCK_K + kk
            # masked rows/columns load anything: they reach only outputs that are not stored
            a = tl.load(a_rows[:, None] + k[None, :], mask=rm[:, None])
            w = tl.load(w_cols[:, None] + k[None, :], mask=cm[:, None])
            a = _e4m3_tile(a, HW)
            w = _e4m3_tile(w, HW)
            if ROWWISE:
                if SWAP:
                    acc = tl.dot(w, tl.trans(a), acc, max_num_imprecise_acc=BLOCK_K)
                else:
                    acc = tl.dot(a, tl.trans(w), acc, max_num_imprecise_acc=BLOCK_K)
            else:
                sa = tl.load(sa_ptr + rows.to(tl.int64) * KB + kb, mask=rm, other=0.0)
                sw_row = sw_ptr + (e * NBW + nt * (BLOCK_N // FP8_BLOCK128)) * KB + kb
                if BLOCK_N == FP8_BLOCK128:  # one weight scale per tile and K step
                    sw = tl.load(sw_row)
                else:
                    nb = tl.arange(0, BLOCK_N) // FP8_BLOCK128  # each column's scale block
                    sw = tl.load(sw_row + nb * KB, mask=cm, other=0.0)
                if SWAP:
                    part = tl.dot(w, tl.trans(a))
                    if BLOCK_N == FP8_BLOCK128:
                        acc += (part * sa[None, :]) * sw
                    else:
                        acc += (part * sa[None, :]) * sw[:, None]
                else:
                    part = tl.dot(a, tl.trans(w))
                    if BLOCK_N == FP8_BLOCK128:
                        acc += (part * sa[:, None]) * sw
                    else:
                        acc += (part * sa[:, None]) * sw[None, :]
        if ROWWISE:
            sa = tl.load(sa_ptr + rows, mask=rm, other=0.0)
            sw = tl.load(sw_ptr + e * N + cols, mask=cm, other=0.0)
            if SWAP:  # noqa: SIM108 (constexpr branch in @jit)
                acc = (acc * sa[None, :]) * sw[:, None]
            else:
                acc = (acc * sa[:, None]) * sw[None, :]
        if SWAP:
            o = rows.to(tl.int64)[None, :] * N + cols[:, None]
            om = rm[None, :] & cm[:, None]
        else:
            o = rows.to(tl.int64)[:, None] * N + cols[None, :]
            om = rm[:, None] & cm[None, :]
        # bf16, or an int16 view rounded to nearest even by integer ops (interpreter)
        _store_out(out_ptr, o, acc, om, OUT_BF16, HW)
