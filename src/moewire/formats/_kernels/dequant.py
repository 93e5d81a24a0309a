"""Unpack + dequantize: wire rows ``[N, R]`` -> activations ``[N, H]`` (fp32, bf16 or fp16).

Grid ``(N, n_chunks)``: program ``(n, c)`` reads ``NBLK`` scale blocks of row ``n`` (payload
and scale bytes) and writes their ``NBLK * block`` values, computed in fp32 exactly as the
torch reference does and rounded once to the output dtype. Rows are 16-byte aligned (the
launcher guarantees it).

Shape legend: ``N`` rows, ``H`` hidden, ``R`` row bytes, ``NB`` scale blocks per row,
``NBLK`` blocks per program, ``BLKP`` values per block padded to a power of two.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moewire.formats._kernels.elements import (
    decode_bf16,
    decode_e2m1,
    decode_e4m3,
    encode_bf16,
    exp2i,
)
from moewire.formats._kernels.pack import KIND_BF16, KIND_FP8, KIND_MXFP8, KIND_NVFP4

OUT_FP32: tl.constexpr = tl.constexpr(0)
OUT_BF16: tl.constexpr = tl.constexpr(1)
OUT_FP16: tl.constexpr = tl.constexpr(2)


@triton.jit
def _store_out(out_row, idx, v, mask, OUT: tl.constexpr):
    if OUT == OUT_BF16:
        # integer round to nearest even: the interpreter's fp32 -> bf16 cast truncates
        tl.store(
            out_row.to(tl.pointer_type(tl.int16)) + idx, encode_bf16(v).to(tl.int16), mask=mask
        )
    elif OUT == OUT_FP16:
        tl.store(out_row + idx, v.to(tl.float16), mask=mask)
    else:
        tl.store(out_row + idx, v, mask=mask)


@triton.jit
def _e8m0_value(b):
    """e8m0 byte (int32) -> fp32 ``2**(b-127)``; 0xFF -> NaN."""
    return tl.where(b == 0xFF, 0x7FC00000, exp2i(b - 127).to(tl.int32, bitcast=True)).to(
        tl.float32, bitcast=True
    )


@triton.jit
def dequant_kernel(
    rows_ptr,
    srt,
    out_ptr,
    sot,
    H,
    NB,
    blk_len,
    scale_off,
    inv_g,
    KIND: tl.constexpr,
    NBLK: tl.constexpr,
    BLKP: tl.constexpr,
    FULL: tl.constexpr,
    OUT: tl.constexpr,
    HW: tl.constexpr,
):
    """One program: ``NBLK`` blocks of one row."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    row_ptr = rows_ptr + n * srt
    out_row = out_ptr + n * sot
    if KIND == KIND_BF16:
        i = c * BLKP + tl.arange(0, BLKP)
        m = i < H
        b = tl.load(row_ptr.to(tl.pointer_type(tl.int16)) + i, mask=m, other=0)
        _store_out(out_row, i, decode_bf16(b.to(tl.int32) & 0xFFFF), m, OUT)
    elif KIND == KIND_FP8 or KIND == KIND_MXFP8:  # noqa: SIM109 (constexpr test in @jit)
        blk = c * NBLK + tl.arange(0, NBLK)
        col = tl.arange(0, BLKP)
        idx = blk[:, None] * blk_len + col[None, :]
        bm = blk < NB
        m = bm[:, None]
        if not FULL:
            m = m & (col[None, :] < blk_len)
        vals = decode_e4m3(tl.load(row_ptr + idx, mask=m, other=0).to(tl.int32), HW)
        if KIND == KIND_FP8:
            s_ptr = (row_ptr + scale_off).to(tl.pointer_type(tl.float32))
            scale = tl.load(s_ptr + blk, mask=bm, other=0.0)
        else:
            scale = _e8m0_value(tl.load(row_ptr + scale_off + blk, mask=bm, other=0).to(tl.int32))
        _store_out(out_row, idx, vals * scale[:, None], m, OUT)
    else:
        HALF: tl.constexpr = BLKP // 2
        blk = c * NBLK + tl.arange(0, NBLK)
        j = tl.arange(0, HALF)
        bm = blk < NB
        byte = tl.load(row_ptr + blk[:, None] * HALF + j[None, :], mask=bm[:, None], other=0)
        byte = byte.to(tl.int32)
        vals = decode_e2m1(tl.join(byte & 0xF, byte >> 4))  # [NBLK, HALF, 2]: low nibble first
        sb = tl.load(row_ptr + scale_off + blk, mask=bm, other=0).to(tl.int32)
        if KIND == KIND_NVFP4:
            v = (vals * decode_e4m3(sb, HW)[:, None, None]) * inv_g
        else:
            v = vals * _e8m0_value(sb)[:, None, None]
        k2 = tl.arange(0, 2)
        idx = blk[:, None, None] * BLKP + j[None, :, None] * 2 + k2[None, None, :]
        _store_out(out_row, idx, v, bm[:, None, None], OUT)
