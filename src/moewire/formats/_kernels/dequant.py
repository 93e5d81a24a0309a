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

from moewire.formats._kernels.access import block_tile
from moewire.formats._kernels.consts import (
    E8M0_BIAS,
    E8M0_NAN_BYTE,
    F32_NAN_BITS,
    KIND_BF16,
    KIND_FP8,
    KIND_MXFP8,
    KIND_NVFP4,
)
from moewire.formats._kernels.elements import (
    decode_bf16,
    decode_e2m1,
    decode_e4m3,
    encode_bf16,
    exp2i,
)

OUT_FP32: tl.constexpr = tl.constexpr(0)
OUT_BF16: tl.constexpr = tl.constexpr(1)
OUT_FP16: tl.constexpr = tl.constexpr(2)


@triton.jit
def _store_out(out_row, idx, v, mask, OUT: tl.constexpr, HW: tl.constexpr):
    if OUT == OUT_BF16 and not HW:
        # integer round to nearest even: the interpreter's fp32 -> bf16 cast truncates
        b = encode_bf16(v).to(tl.int16)
        tl.store(out_row.to(tl.pointer_type(tl.int16)) + idx, b, mask=mask)
    else:
        tl.store(out_row + idx, v.to(out_row.dtype.element_ty), mask=mask)


@triton.jit
def _e8m0_value(b):
    """e8m0 byte (int32) -> fp32 ``2**(b-127)``; 0xFF -> NaN."""
    bits = tl.where(
        b == E8M0_NAN_BYTE, F32_NAN_BITS, exp2i(b - E8M0_BIAS).to(tl.int32, bitcast=True)
    )
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def decode_chunk(
    row_ptr,
    c,
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
    """Chunk ``c`` of one row (``NBLK`` scale blocks; bf16: ``BLKP`` values) -> fp32
    values, their indices in the row and the in-row mask, exactly as the torch reference
    dequantizes (the one decoder of every kernel that reads wire rows)."""
    if KIND == KIND_BF16:
        idx = c * BLKP + tl.arange(0, BLKP)
        m = idx < H
        b = tl.load(row_ptr.to(tl.pointer_type(tl.uint16)) + idx, mask=m, other=0)
        v = decode_bf16(b.to(tl.int32))
    else:
        blk, idx, bm, m = block_tile(c, H, NB, NBLK, BLKP, FULL)
        if KIND == KIND_FP8 or KIND == KIND_MXFP8:  # noqa: SIM109 (constexpr test in @jit)
            vals = decode_e4m3(tl.load(row_ptr + idx, mask=m, other=0), HW)
            if KIND == KIND_FP8:
                s_ptr = (row_ptr + scale_off).to(tl.pointer_type(tl.float32))
                scale = tl.load(s_ptr + blk, mask=bm, other=0.0)
            else:
                sb = tl.load(row_ptr + scale_off + blk, mask=bm, other=0).to(tl.int32)
                scale = _e8m0_value(sb)
            v = vals * scale[:, None]
        else:
            HALF: tl.constexpr = BLKP // 2
            j = tl.arange(0, HALF)
            byte = tl.load(row_ptr + blk[:, None] * HALF + j[None, :], mask=bm[:, None], other=0)
            byte = byte.to(tl.int32)
            # element 2j is the low nibble, 2j+1 the high one
            codes = tl.reshape(tl.join(byte & 0xF, byte >> 4), [NBLK, BLKP])
            vals = decode_e2m1(codes)
            sb = tl.load(row_ptr + scale_off + blk, mask=bm, other=0)
            if KIND == KIND_NVFP4:
                v = (vals * decode_e4m3(sb, HW)[:, None]) * inv_g
            else:
                v = vals * _e8m0_value(sb.to(tl.int32))[:, None]
    return v, idx, m


@triton.jit
def dequant_kernel(
    rows_ptr,
    srt,
    out_ptr,
    sot,
    H,
    NB,
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
    v, idx, m = decode_chunk(
        rows_ptr + n * srt, c, H, NB, scale_off, inv_g, KIND, NBLK, BLKP, FULL, HW
    )
    _store_out(out_ptr + n * sot, idx, v, m, OUT, HW)
