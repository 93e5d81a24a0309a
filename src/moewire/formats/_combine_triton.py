"""Triton launchers of the combine codec (``combine.py``); imports ``triton`` at the top,
so only CUDA paths (or ``backend="triton"``) import this module. Kernels:
``_kernels/combine.py``; the plans are cached on the codec's spec with the wire formats'.

Shape legend: ``T`` tokens, ``H`` hidden, ``R`` row bytes, ``X`` received rows, ``W`` sources.
"""

from __future__ import annotations

import torch

from moewire.constants import ceil_div
from moewire.formats import _triton as _fmt
from moewire.formats._kernels.combine import decode_sum_kernel, nvfp4_dyn_pack_kernel
from moewire.formats._tiles import _layout, _next_pow2

#: decode_sum's values per block where one scale covers the whole row (fp8).
_ROW_SCALE_BLOCK = 32
#: Values one decode_sum program handles per source.
_CHUNK_VALUES = 1024
_OUT = {torch.float32: 0, torch.bfloat16: 1}


def _pack_plan(spec, hw: bool) -> tuple[tuple, dict]:
    """(scalar arguments, constexprs) of a row-scaled pack launch (cached on the spec)."""
    _, plans = _layout.plans(spec)
    plan = plans.get(("row_scaled", hw))
    if plan is None:
        nb = spec.sections["scales"].numel
        nbp = _next_pow2(nb)
        sec = spec.sections
        scalars = (nb, sec["scales"].offset, sec["g"].offset, spec.row_bytes)
        warps = max(1, min(16, nbp * spec.wire_format.block // 512))
        consts = dict(NBP=nbp, HW=hw, num_warps=warps)
        plan = plans["row_scaled", hw] = (scalars, consts)
    return plan


def pack_row_scaled(spec, x_TH: torch.Tensor, rows_TR: torch.Tensor) -> torch.Tensor:
    """Row-scaled (dynamic global scale) rows of ``x_TH`` (bf16/fp32 ``[T, H]``) into
    ``rows_TR`` (uint8 ``[T, R]``, unit stride along the row); returns ``rows_TR``."""
    _fmt._check_device(x_TH, "partial")
    t = x_TH.shape[0]
    if t == 0:
        return rows_TR
    target = rows_TR if _fmt._aligned(rows_TR) else torch.empty_like(rows_TR).contiguous()
    scalars, consts = _pack_plan(spec, x_TH.is_cuda and _fmt._HW_E4M3)
    nvfp4_dyn_pack_kernel[(t,)](
        x_TH, x_TH.stride(0), x_TH.stride(1), target, target.stride(0), *scalars, **consts
    )
    if target is not rows_TR:
        rows_TR.copy_(target)
    return rows_TR


def _decode_plan(codec, dtype: torch.dtype, w: int, hw: bool) -> tuple[int, tuple, dict]:
    """(programs per token, scalar arguments, constexprs) of a decode_sum launch (cached on
    the codec's spec)."""
    spec = codec.spec
    _, plans = _layout.plans(spec)
    plan = plans.get(("decode_sum", dtype, w, hw))
    if plan is None:
        fmt = spec.wire_format
        h = codec.hidden
        blk = fmt.block if fmt.block > 1 else _ROW_SCALE_BLOCK
        nb = ceil_div(h, blk)
        nblk = min(_next_pow2(nb), max(1, _CHUNK_VALUES // blk))
        g_off = spec.sections["g"].offset if codec.row_scaled else 0
        scalars = (h, nb, spec.sections["scales"].offset, g_off)
        consts = dict(
            KIND=int(fmt.row_scaled_kind if codec.row_scaled else fmt.kind),
            NBLK=nblk,
            BLK=blk,
            NSRC=w,
            OUT=_OUT[dtype],
            HW=hw,
            num_warps=4,
            enable_fp_fusion=False,
        )
        plan = plans["decode_sum", dtype, w, hw] = (ceil_div(nb, nblk), scalars, consts)
    return plan


def decode_sum(codec, rows_XR: torch.Tensor, index_TW: torch.Tensor, dtype) -> torch.Tensor:
    """See :meth:`moewire.formats.combine.CombineCodec.decode_sum`."""
    _fmt._check_device(rows_XR, "rows")
    t, w = index_TW.shape
    out = torch.empty((t, codec.hidden), dtype=dtype, device=rows_XR.device)
    if t == 0:
        return out
    if rows_XR.shape[0] == 0 or w == 0:
        return out.zero_()
    if not (_fmt._aligned(rows_XR) and rows_XR.stride(1) == 1):
        rows_XR = rows_XR.clone(memory_format=torch.contiguous_format)
    index_TW = index_TW.to(rows_XR.device).contiguous()
    grid_y, scalars, consts = _decode_plan(codec, dtype, w, rows_XR.is_cuda and _fmt._HW_E4M3)
    decode_sum_kernel[(t, grid_y)](
        rows_XR, rows_XR.stride(0), index_TW, out, out.stride(0), *scalars, **consts
    )
    return out
