"""The expert stage's fused kernels around the grouped GEMMs (launchers: ``moe/stage.py``).

- :func:`gather_decode_kernel`: received wire rows -> the first GEMM's A operand in expert
  order, decoded to bf16 with the format's own decoder (``decode_chunk``).
- :func:`gather_fp8_kernel`: the same rows -> e4m3 with one fp32 scale per row (the
  ``fp8`` wire recipe applied to the decoded fp32 values), the A operand of the rowwise
  fp8 GEMM.
- :func:`gather_fp8_block_kernel`: the same rows -> e4m3 with one fp32 scale per 128
  values (the ``fp8_block128`` recipe), the A operand of the block-scaled fp8 GEMM.
- :func:`gather_fp8_rows_kernel`: ``fp8`` / ``fp8_block128`` rows' payload and scales
  copied as they are, in expert order (no requantization).
- :func:`swiglu_kernel`: ``[P, 2I]`` (gate, then up) -> ``silu(gate) * up`` rounded to
  bf16, optionally quantized per row (``fp8`` recipe) or per 128 values (``fp8_block128``),
  reading the GEMM output once.
- :func:`unpermute_kernel`: for each received row, ``sum_k w_k * y_k`` over its local
  experts in ``k`` order, gathered (no atomics), written once in the combine dtype.
- :func:`plan_kernel`: the device plan (the pairs sorted by local expert, the groups' ends,
  the inverse map) in one launch, bitwise ``plan_device``'s torch ops.

Rows of the sorted pair order past the number of local pairs (``count``, on the device)
are skipped: their programs store nothing. Shape legend: ``N`` received rows, ``P = N*K``
sorted pairs (the upper bound of the local pairs), ``H`` hidden, ``I`` intermediate,
``K`` top-k.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moewire.formats._kernels.consts import FP8_BLOCK128
from moewire.formats._kernels.dequant import _store_out, decode_chunk
from moewire.formats._kernels.elements import encode_bf16, encode_e4m3
from moewire.formats._kernels.recipes import fp8_scale

OUT_BF16: tl.constexpr = tl.constexpr(1)


@triton.jit
def gather_decode_kernel(
    rows_ptr,
    srt,
    row_P_ptr,
    count_ptr,
    out_ptr,
    H,
    NB,
    scale_off,
    inv_g,
    KIND: tl.constexpr,
    NBLK: tl.constexpr,
    BLKP: tl.constexpr,
    FULL: tl.constexpr,
    HW: tl.constexpr,
):
    """Program ``(p, c)``: chunk ``c`` of received row ``row_P[p]`` -> bf16 ``out[p]``."""
    p = tl.program_id(0)
    count = tl.load(count_ptr)
    r = tl.load(row_P_ptr + p).to(tl.int64)  # every row_P entry is a valid row
    c = tl.program_id(1)
    v, idx, m = decode_chunk(rows_ptr + r * srt, c, H, NB, scale_off, inv_g, KIND, NBLK, BLKP,
                             FULL, HW)  # fmt: skip
    _store_out(out_ptr + p.to(tl.int64) * H, idx, v, m & (idx * 0 + p < count), OUT_BF16, HW)


@triton.jit
def gather_fp8_kernel(
    rows_ptr,
    srt,
    row_P_ptr,
    count_ptr,
    q_ptr,
    s_ptr,
    H,
    NB,
    scale_off,
    inv_g,
    N_CHUNKS: tl.constexpr,
    KIND: tl.constexpr,
    NBLK: tl.constexpr,
    BLKP: tl.constexpr,
    FULL: tl.constexpr,
    HW: tl.constexpr,
):
    """Program ``p``: received row ``row_P[p]`` decoded, then quantized per row (two passes
    over the row: its amax, then the codes)."""
    p = tl.program_id(0)
    count = tl.load(count_ptr)
    r = tl.load(row_P_ptr + p).to(tl.int64)  # every row_P entry is a valid row
    row = rows_ptr + r * srt
    amax_bits = tl.zeros((), tl.int32)
    for c in tl.range(0, N_CHUNKS):
        v, idx, m = decode_chunk(row, c, H, NB, scale_off, inv_g, KIND, NBLK, BLKP, FULL, HW)
        bits = tl.where(m, v.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0)
        amax_bits = tl.maximum(amax_bits, tl.max(tl.reshape(bits, [BLKP * NBLK]), axis=0))
    k, s_bits = fp8_scale(amax_bits)
    q_row = q_ptr + p.to(tl.int64) * H
    for c in tl.range(0, N_CHUNKS):
        v, idx, m = decode_chunk(row, c, H, NB, scale_off, inv_g, KIND, NBLK, BLKP, FULL, HW)
        tl.store(q_row + idx, encode_e4m3(v * k, HW), mask=m & (idx * 0 + p < count))
    tl.store(s_ptr.to(tl.pointer_type(tl.int32)) + p, s_bits)  # s has P entries


@triton.jit
def _quantize_128(v, m, HW: tl.constexpr):
    """fp32 values ``v`` (whole 128-value blocks, any shape) quantized per 128 values with
    the ``fp8_block128`` recipe, the values where ``m [G, 128]`` is False ignored: e4m3
    codes ``[G, 128]`` and the blocks' fp32 scale bits ``[G]``."""
    G: tl.constexpr = v.numel // FP8_BLOCK128
    v = tl.reshape(v, [G, FP8_BLOCK128])
    bits = tl.where(m, v.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0)
    k, s_bits = fp8_scale(tl.max(bits, axis=1))
    return encode_e4m3(v * k[:, None], HW), s_bits


@triton.jit
def gather_fp8_block_kernel(
    rows_ptr,
    srt,
    row_P_ptr,
    count_ptr,
    q_ptr,
    s_ptr,
    H,
    NB,
    scale_off,
    inv_g,
    KIND: tl.constexpr,
    NBLK: tl.constexpr,
    BLKP: tl.constexpr,
    FULL: tl.constexpr,
    HW: tl.constexpr,
):
    """Program ``(p, c)``: chunk ``c`` of received row ``row_P[p]`` decoded, then quantized
    per 128 values with the ``fp8_block128`` recipe (e4m3 ``q[p]``, fp32 ``s[p, H/128]``).
    A chunk holds whole 128-value blocks (``NBLK * BLKP``, or bf16's ``BLKP``, a multiple
    of 128 starting at a multiple of 128: ``H`` is a multiple of 128)."""
    p = tl.program_id(0)
    c = tl.program_id(1)
    count = tl.load(count_ptr)
    r = tl.load(row_P_ptr + p).to(tl.int64)  # every row_P entry is a valid row
    v, idx, m = decode_chunk(rows_ptr + r * srt, c, H, NB, scale_off, inv_g, KIND, NBLK, BLKP,
                             FULL, HW)  # fmt: skip
    G: tl.constexpr = v.numel // FP8_BLOCK128
    m = tl.reshape(m & (idx < H), [G, FP8_BLOCK128])  # ``m`` may be per block: broadcast it
    idx = tl.reshape(idx, [G, FP8_BLOCK128])
    q, s_bits = _quantize_128(v, m, HW)
    tl.store(q_ptr + p.to(tl.int64) * H + idx, q, mask=m & (idx * 0 + p < count))
    blk = c * G + tl.arange(0, G)
    nb = H // FP8_BLOCK128
    s_row = s_ptr.to(tl.pointer_type(tl.int32)) + p.to(tl.int64) * nb
    tl.store(s_row + blk, s_bits, mask=blk < nb)  # s has P rows


@triton.jit
def swiglu_kernel(
    h_ptr,
    count_ptr,
    out_ptr,
    s_ptr,
    I,
    BLOCK_I: tl.constexpr,
    FP8: tl.constexpr,
    BLOCKS: tl.constexpr,
    HW: tl.constexpr,
):
    """Program ``p``: ``silu(h[p, :I]) * h[p, I:]`` in fp32, rounded to bf16; with ``FP8``
    the bf16 values are quantized per row (e4m3 ``out[p]``, fp32 ``s[p]``), with
    ``BLOCKS`` per 128 values (fp32 ``s[p, I/128]``, ``I`` a multiple of 128), the
    ``fp8_block128`` recipe."""
    p = tl.program_id(0)
    i = tl.arange(0, BLOCK_I)
    m = (i < I) & (i * 0 + p < tl.load(count_ptr))
    h_row = h_ptr + p.to(tl.int64) * (2 * I)
    g = tl.load(h_row + i, mask=m, other=0.0).to(tl.float32)
    u = tl.load(h_row + I + i, mask=m, other=0.0).to(tl.float32)
    y = (g / (1.0 + tl.exp(-g))) * u
    out_row = out_ptr + p.to(tl.int64) * I
    if FP8:
        y16 = (encode_bf16(y) << 16).to(tl.float32, bitcast=True)
        s_out = s_ptr.to(tl.pointer_type(tl.int32))
        if BLOCKS:
            G: tl.constexpr = BLOCK_I // FP8_BLOCK128
            mb = tl.reshape(m, [G, FP8_BLOCK128])
            q, s_bits = _quantize_128(y16, mb, HW)
            tl.store(out_row + tl.reshape(i, [G, FP8_BLOCK128]), q, mask=mb)
            b = tl.arange(0, G)
            nb = I // FP8_BLOCK128
            tl.store(s_out + p.to(tl.int64) * nb + b, s_bits, mask=b < nb)
        else:
            bits = tl.where(m, y16.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0)
            k, s_bits = fp8_scale(tl.max(bits, axis=0))
            tl.store(out_row + i, encode_e4m3(y16 * k, HW), mask=m)
            tl.store(s_out + p, s_bits)  # s has P entries
    else:
        _store_out(out_row, i, y, m, OUT_BF16, HW)


@triton.jit
def unpermute_kernel(
    y_ptr,
    inv_ptr,
    w_ptr,
    swn,
    out_ptr,
    H,
    K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    OUT: tl.constexpr,
    HW: tl.constexpr,
):
    """Program ``(n, c)``: ``out[n, cols] = sum_k w[n, k] * y[inv[n, k], cols]`` over the
    ``k`` with ``inv[n, k] >= 0``, added in ``k`` order in fp32 (launched without FMA
    contraction: each term is rounded, then added, as the reference does)."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cm = cols < H
    acc = tl.zeros([BLOCK_H], tl.float32)
    for k in tl.static_range(K):
        p = tl.load(inv_ptr + n * K + k)
        live = cols * 0 + p >= 0
        w = tl.load(w_ptr + n * swn + k)
        y = tl.load(y_ptr + tl.maximum(p, 0).to(tl.int64) * H + cols, mask=cm & live, other=0.0)
        acc = tl.where(live, acc + y.to(tl.float32) * w, acc)
    _store_out(out_ptr + n * H, cols, acc, cm, OUT, HW)


@triton.jit
def _buckets(ids_ptr, idx, P, K, first, num_local, valid_ptr, T, PAD: tl.constexpr,
             HAS_VALID: tl.constexpr):  # fmt: skip
    """The local expert of pairs ``idx`` (``num_local`` for another rank's or an invalid
    id, or a padding row; ``PAD`` past ``P``), as ``plan_device`` computes it: the id cast
    to int32, less ``first``. ``HAS_VALID``: rows come ``T`` per rank, the first
    ``valid[rank]`` of them real."""
    live = idx < P
    e = tl.load(ids_ptr + idx, mask=live, other=0).to(tl.int32) - first
    e = tl.where((e >= 0) & (e < num_local), e, num_local)
    if HAS_VALID:
        n = idx // K
        real = (n % T) < tl.load(valid_ptr + n // T, mask=live, other=0)
        e = tl.where(real, e, num_local)
    return tl.where(live, e, PAD)


@triton.jit
def plan_kernel(
    ids_ptr,
    P,
    K,
    first,
    num_local,
    row_ptr,
    offs_ptr,
    inv_ptr,
    valid_ptr,
    T,
    BLOCK: tl.constexpr,
    SCAN: tl.constexpr,
    LP: tl.constexpr,
    HAS_VALID: tl.constexpr,
):
    """Program ``b``: the sorted positions of pairs ``[b*BLOCK, (b+1)*BLOCK)``, as a stable
    sort by local expert (the other ranks' pairs last) places them: the pairs of lower
    experts, plus the earlier pairs of the same expert. Every program counts all ``P``
    pairs (``SCAN`` at a time; counts are order-free, so the plan is deterministic);
    program 0 also writes the groups' ends. ``LP``: bins, at least ``num_local + 2`` (the
    last is padding). ``HAS_VALID``: padding rows (see ``_buckets``) are non-local."""
    b = tl.program_id(0)
    lo = b * BLOCK
    scan = tl.arange(0, SCAN)
    total = tl.zeros([LP], tl.int32)
    before = tl.zeros([LP], tl.int32)
    for c0 in range(0, P, SCAN):
        idx = c0 + scan
        e = _buckets(ids_ptr, idx, P, K, first, num_local, valid_ptr, T, LP - 1, HAS_VALID)
        total += tl.histogram(e, LP)
        before += tl.histogram(tl.where(idx < lo, e, LP - 1), LP)
    bins = tl.arange(0, LP)
    start = tl.cumsum(total, axis=0) - total + before
    j = tl.arange(0, BLOCK)
    idx = lo + j
    e = _buckets(ids_ptr, idx, P, K, first, num_local, valid_ptr, T, LP - 1, HAS_VALID)
    # rank within the block: the earlier pairs of the same expert
    same = (e[:, None] == e[None, :]) & (j[None, :] < j[:, None])
    rank = tl.sum(same.to(tl.int32), axis=1)
    pos = tl.sum(tl.where(e[:, None] == bins[None, :], start[None, :], 0), axis=1) + rank
    live = idx < P
    tl.store(row_ptr + pos, idx // K, mask=live)
    tl.store(inv_ptr + idx, tl.where(e < num_local, pos, -1), mask=live)
    if b == 0:
        tl.store(offs_ptr + bins, tl.cumsum(total, axis=0), mask=bins < num_local)


@triton.jit
def gather_fp8_rows_kernel(
    rows_ptr,
    stride_r,
    row_ptr,
    count_ptr,
    q_ptr,
    s_ptr,
    W,
    PAY_OFF: tl.constexpr,
    SCALE_OFF: tl.constexpr,
    NS: tl.constexpr,
    REP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program ``p`` (``p < count``): an e4m3 wire row ``row[p]``'s payload (``W`` int32
    words) and its ``NS`` fp32 scales (``fp8``: one, ``fp8_block128``: one per 128 values),
    copied as they are (as bits) to ``q[p]`` and ``s[p]``, each scale written ``REP``
    times (``fp8`` rows for the block-scaled GEMM: the row's scale for each of its 128-value
    blocks, the same values)."""
    p = tl.program_id(0)
    if p < tl.load(count_ptr):
        src = rows_ptr + tl.load(row_ptr + p).to(tl.int64) * stride_r
        words = (src + PAY_OFF).to(tl.pointer_type(tl.int32))
        dst = q_ptr.to(tl.pointer_type(tl.int32)) + p.to(tl.int64) * W
        for c in range(0, W, BLOCK):
            i = c + tl.arange(0, BLOCK)
            tl.store(dst + i, tl.load(words + i, mask=i < W), mask=i < W)
        s_src = (src + SCALE_OFF).to(tl.pointer_type(tl.int32))
        s_dst = s_ptr.to(tl.pointer_type(tl.int32)) + p.to(tl.int64) * (NS * REP)
        for c in tl.static_range(0, NS * REP, BLOCK):
            j = c + tl.arange(0, BLOCK)
            jm = j < NS * REP
            tl.store(s_dst + j, tl.load(s_src + j // REP, mask=jm), mask=jm)
