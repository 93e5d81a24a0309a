"""Kernels of the combine codec (``moewire.formats.combine``): the dynamic-nvfp4 pack and
the fused dequantize + sum of received combine rows.

- ``nvfp4_dyn_pack_kernel``, grid ``(T,)``: program ``t`` loads the whole row ``t`` as
  ``[NBP, 16]`` (``NBP`` = blocks padded to a power of two), takes the row amax, computes
  ``g_t = 2688 / max(amax, 1e-4)`` (``NVFP4_GLOBAL_NUMERATOR``, ``COMBINE_NVFP4_AMAX_FLOOR``)
  and ``1/g_t`` (correctly rounded), then runs the static nvfp4 recipe per block with
  ``g = g_t`` and writes the complete row: payload, scales, ``g_t`` and the zero padding.
- ``decode_sum_kernel``, grid ``(T, n_chunks)``: program ``(t, c)`` dequantizes ``NBLK``
  blocks of ``BLK`` values of every source's row of token ``t`` (``index[t, s]``, -1 =
  none) and adds them in fp32 in source order, then stores once (fp32 or bf16). Launched
  with FMA contraction off, so ``acc + v * s`` rounds twice like the torch reference.

Shape legend: ``T`` tokens, ``H`` hidden, ``NB`` blocks per row, ``NBP`` padded blocks,
``NBLK`` blocks per program, ``BLK`` values per block, ``W`` sources.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moewire.formats._kernels.access import load_x, zero_fill
from moewire.formats._kernels.consts import (
    COMBINE_NVFP4_AMAX_FLOOR,
    E4M3_NAN_BYTE,
    F32_INF_BITS,
    F32_NAN_BITS,
    KIND_FP8,
    KIND_MXFP8,
    KIND_NVFP4_DYN,
    NVFP4_BLOCK,
    NVFP4_GLOBAL_NUMERATOR,
)
from moewire.formats._kernels.dequant import _e8m0_value, _store_out
from moewire.formats._kernels.e2m1 import pack_e2m1_codes
from moewire.formats._kernels.elements import (
    canonical_nan_bits,
    decode_e2m1,
    decode_e4m3,
    encode_e2m1,
)
from moewire.formats._kernels.recipes import nvfp4_scale


@triton.jit
def nvfp4_dyn_pack_kernel(
    x_ptr,
    sxt,
    sxh,
    rows_ptr,
    srt,
    NB,
    scale_off,
    g_off,
    row_bytes,
    NBP: tl.constexpr,
    HW: tl.constexpr,
):
    """One program: row ``t``, every byte of it."""
    HALF: tl.constexpr = NVFP4_BLOCK // 2
    t = tl.program_id(0).to(tl.int64)
    row_ptr = rows_ptr + t * srt
    blk = tl.arange(0, NBP)
    bm = blk < NB
    idx = blk[:, None] * NVFP4_BLOCK + tl.arange(0, NVFP4_BLOCK)[None, :]
    x = load_x(x_ptr, t, sxt, sxh, idx, bm[:, None], HW)
    blk_bits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
    row_bits = tl.max(blk_bits, axis=0)
    row_bad = row_bits >= F32_INF_BITS
    amax = row_bits.to(tl.float32, bitcast=True)
    a = tl.where(row_bad, 1.0, tl.maximum(amax, COMBINE_NVFP4_AMAX_FLOOR))
    one = tl.full([NBP], 1.0, tl.float32)
    g = tl.math.div_rn(tl.full([NBP], NVFP4_GLOBAL_NUMERATOR, tl.float32), one * a)
    inv_g = tl.math.div_rn(one, g)
    bad = (blk_bits >= F32_INF_BITS) | row_bad
    sb, out = nvfp4_scale(blk_bits, g, inv_g, HW)
    packed = pack_e2m1_codes(encode_e2m1(x * out[:, None]), bad, NBP, HALF)
    tl.store(row_ptr + blk[:, None] * HALF + tl.arange(0, HALF)[None, :], packed, mask=bm[:, None])
    tl.store(row_ptr + scale_off + blk, tl.where(bad, E4M3_NAN_BYTE, sb).to(tl.uint8), mask=bm)
    g_bits = tl.where(row_bad, F32_NAN_BITS, canonical_nan_bits(g))
    first = blk == 0
    tl.store((row_ptr + g_off).to(tl.pointer_type(tl.int32)) + blk * 0, g_bits, mask=first)
    zero_fill(row_ptr, NB * HALF, scale_off)
    zero_fill(row_ptr, scale_off + NB, g_off)
    zero_fill(row_ptr, g_off + 4, row_bytes)


@triton.jit
def decode_sum_kernel(
    rows_ptr,
    srt,
    index_ptr,
    out_ptr,
    sot,
    H,
    NB,
    scale_off,
    g_off,
    KIND: tl.constexpr,
    NBLK: tl.constexpr,
    BLK: tl.constexpr,
    NSRC: tl.constexpr,
    OUT: tl.constexpr,
    HW: tl.constexpr,
):
    """One program: ``NBLK`` blocks of token ``t``, summed over its ``NSRC`` sources."""
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    blk = c * NBLK + tl.arange(0, NBLK)
    bm = blk < NB
    idx = blk[:, None] * BLK + tl.arange(0, BLK)[None, :]
    m = bm[:, None] & (idx < H)
    acc = tl.zeros([NBLK, BLK], tl.float32)
    HALF: tl.constexpr = BLK // 2
    j = tl.arange(0, HALF)
    for src in tl.static_range(NSRC):
        r = tl.load(index_ptr + t * NSRC + src)
        # a block of the scalar test: triton 3.9's interpreter rejects a block mask combined
        # with a scalar one ("mask has unsupported dtype")
        valid = (tl.zeros([NBLK], r.dtype) + r) >= 0
        row_ptr = rows_ptr + tl.maximum(r, 0) * srt
        lm = m & valid[:, None]
        if KIND == KIND_FP8 or KIND == KIND_MXFP8:  # noqa: SIM109 (constexpr test in @jit)
            vals = decode_e4m3(tl.load(row_ptr + idx, mask=lm, other=0), HW)
            if KIND == KIND_FP8:
                scale = tl.load((row_ptr + scale_off).to(tl.pointer_type(tl.float32)))
                v = vals * scale
            else:
                sb = tl.load(row_ptr + scale_off + blk, mask=bm & valid, other=0).to(tl.int32)
                v = vals * _e8m0_value(sb)[:, None]
        else:
            byte = tl.load(
                row_ptr + blk[:, None] * HALF + j[None, :],
                mask=bm[:, None] & valid[:, None],
                other=0,
            ).to(tl.int32)
            vals = decode_e2m1(tl.reshape(tl.join(byte & 0xF, byte >> 4), [NBLK, BLK]))
            sb = tl.load(row_ptr + scale_off + blk, mask=bm & valid, other=0)
            if KIND == KIND_NVFP4_DYN:
                g = tl.load((row_ptr + g_off).to(tl.pointer_type(tl.float32)) + blk * 0)
                inv_g = tl.math.div_rn(tl.full([NBLK], 1.0, tl.float32), g)
                v = (vals * decode_e4m3(sb, HW)[:, None]) * inv_g[:, None]
            else:
                v = vals * _e8m0_value(sb.to(tl.int32))[:, None]
        # an absent source adds +0.0, which leaves acc unchanged (acc is never -0.0)
        acc = acc + tl.where(valid[:, None], v, 0.0)
    _store_out(out_ptr + t * sot, idx, acc, m, OUT, HW)
