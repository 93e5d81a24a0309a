"""A grouped GEMM for few rows per expert (decode): ``out[p] = a[p] @ w[e(p)].T``.

At decode sizes (a few rows per expert) the layer is bound by reading the expert weights,
and a tile of 64-128 rows wastes most of a tensor-core GEMM's work and bandwidth. Here
program ``(n, e)`` streams ``BLOCK_N`` output channels of expert ``e``'s weights once for
each ``BLOCK_M`` of its rows (one tile in decode), with the rows of the group read from
the device offsets (no host sync; an expert without rows costs one empty program).

``FP8``: activations and weights are e4m3 (uint8 views) with fp32 scales per row and per
output channel, multiplied with fp32 accumulation and scaled after the sum,
``(acc * s_a) * s_w``, as the rowwise fp8 GEMM and the ``fp8_loop`` oracle do: natively on
the GPU's fp8 tensor cores with ``SWAP``, else both widened exactly to fp16 (every e4m3
value is an fp16).

Shape legend: ``P`` rows (sorted pairs), ``C`` input channels, ``N`` output channels,
``L`` experts.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moewire.formats._kernels.dequant import OUT_BF16, _store_out
from moewire.formats._kernels.elements import decode_bf16, decode_e4m3


@triton.jit
def _widen(v, FP8: tl.constexpr, HW: tl.constexpr):
    """An operand tile as the dot takes it. On the GPU: bf16, or e4m3 widened to fp16 (one
    ``cvt`` per pair; every e4m3 value is an fp16, so the products stay exact in the fp32
    sum); under the interpreter (no bf16) fp32 from the raw bits (``v`` is then int16 for
    bf16 operands)."""
    if FP8:
        if HW:  # noqa: SIM108 (constexpr branch in @jit)
            v = v.to(tl.float8e4nv, bitcast=True).to(tl.float16)
        else:
            v = decode_e4m3(v, HW)
    elif not HW:
        v = decode_bf16(v.to(tl.int32) & 0xFFFF)
    return v


@triton.jit
def _operand(v, FP8: tl.constexpr, HW: tl.constexpr, NATIVE: tl.constexpr):
    """An operand tile as the dot takes it: with ``NATIVE`` (the GPU's fp8 tensor cores)
    e4m3 as it is, else as :func:`_widen` makes it."""
    if NATIVE:  # noqa: SIM108 (constexpr branch in @jit)
        v = v.to(tl.float8e4nv, bitcast=True)
    else:
        v = _widen(v, FP8, HW)
    return v


@triton.jit
def small_grouped_gemm_kernel(
    a_ptr,
    sa_ptr,
    w_ptr,
    sw_ptr,
    offs_ptr,
    out_ptr,
    N,
    C,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FP8: tl.constexpr,
    HW: tl.constexpr,
    SWAP: tl.constexpr,
):
    """Program ``(n, e)``: rows ``[offs[e-1], offs[e])`` x output channels
    ``[n*BLOCK_N, (n+1)*BLOCK_N)`` of expert ``e``; ``a [P, C]``, ``w [L, N, C]``,
    ``out [P, N]`` bf16, all row-major (int16 views of the bf16 ones without ``HW``).

    ``SWAP`` computes the transposed tile, ``w_tile @ a_tile.T``: the weights' channels
    fill the tensor core's 64-row side and the few rows its narrow side, so the fp8 path
    multiplies e4m3 natively (no widening) on the GPU."""
    nt = tl.program_id(0)
    e = tl.program_id(1)
    start = tl.where(e > 0, tl.load(offs_ptr + tl.maximum(e - 1, 0)), 0)
    end = tl.load(offs_ptr + e)
    cols = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < N
    w_e = w_ptr + e.to(tl.int64) * N * C
    kk = tl.arange(0, BLOCK_K)
    NATIVE: tl.constexpr = SWAP and FP8 and HW
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rm = rows < end
        if SWAP:
            acc_t = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for k0 in range(0, C, BLOCK_K):
                k = k0 + kk
                km = k < C
                w = tl.load(w_e + cols.to(tl.int64)[:, None] * C + k[None, :],
                            mask=cm[:, None] & km[None, :], other=0)  # fmt: skip
                a = tl.load(a_ptr + rows.to(tl.int64)[None, :] * C + k[:, None],
                            mask=rm[None, :] & km[:, None], other=0)  # fmt: skip
                acc_t = tl.dot(_operand(w, FP8, HW, NATIVE), _operand(a, FP8, HW, NATIVE), acc_t)
            acc = tl.trans(acc_t)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, C, BLOCK_K):
                k = k0 + kk
                km = k < C
                a = tl.load(a_ptr + rows.to(tl.int64)[:, None] * C + k[None, :],
                            mask=rm[:, None] & km[None, :], other=0)  # fmt: skip
                w = tl.load(w_e + cols.to(tl.int64)[None, :] * C + k[:, None],
                            mask=cm[None, :] & km[:, None], other=0)  # fmt: skip
                acc = tl.dot(_widen(a, FP8, HW), _widen(w, FP8, HW), acc)
        if FP8:
            sa = tl.load(sa_ptr + rows, mask=rm, other=0.0)
            sw = tl.load(sw_ptr + e * N + cols, mask=cm, other=0.0)
            acc = (acc * sa[:, None]) * sw[None, :]
        o = rows.to(tl.int64)[:, None] * N + cols[None, :]
        # bf16, or an int16 view rounded to nearest even by integer ops (interpreter)
        _store_out(out_ptr, o, acc, rm[:, None] & cm[None, :], OUT_BF16, HW)
