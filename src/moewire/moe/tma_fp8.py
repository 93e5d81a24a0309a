"""The persistent TMA rowwise-fp8 grouped GEMM (``_kernels/gemm_tma.py``): the prefill GEMM
of the fp8 experts where it is faster than ``torch._scaled_grouped_mm``.

:func:`tma_gemm` computes what ``torch._scaled_grouped_mm(a, w.transpose(-2, -1), sa, sw,
offs=plan.offsets_L, out_dtype=torch.bfloat16)`` does (and :func:`block_fp8.scaled_mm`
with rowwise scales, the ``fp8_loop`` oracle, per expert): one launch, no host sync, rows
past the local pairs not written.

Shape legend: ``P`` rows (sorted pairs), ``C`` input channels, ``N`` output channels,
``L`` experts.
"""

from __future__ import annotations

import functools

import torch

from moewire.constants import ceil_div
from moewire.moe.stage import DevicePlan

#: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages[, WS]) of the kernel.
TMA_TILE = (128, 256, 128, 8, 8, 3)


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def tma_fits(c: int, n: int, tile: tuple = TMA_TILE) -> bool:
    """Whether ``C`` and ``N`` fit the tile (whole K steps and column tiles)."""
    return c % tile[2] == 0 and n % tile[1] == 0


def tma_gemm(
    a_PC: torch.Tensor,
    sa_P: torch.Tensor,
    w_LNC: torch.Tensor,
    sw_LN: torch.Tensor,
    plan: DevicePlan,
    *,
    tile: tuple | None = None,
    num_progs: int | None = None,
) -> torch.Tensor:
    """bf16 ``[P, N]``: ``out[p] = (a[p] @ w[e(p)].T) * sa[p] * sw[e(p)]`` over the plan's
    groups (rows past ``plan.offsets_L[-1]`` unwritten). ``a`` float8_e4m3fn ``[P, C]``,
    ``w`` ``[L, N, C]``, both contiguous; ``sa`` fp32 ``[P]``, ``sw`` fp32 ``[L, N]``; ``C``
    and ``N`` fitting ``tile`` (:func:`tma_fits`). Triton on CUDA, or on CPU under
    ``TRITON_INTERPRET=1`` (``num_progs`` then defaults to 4)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from moewire.moe._kernels.gemm_tma import tma_grouped_gemm_kernel

    bm, bn, bk, group_m, warps, stages, *ws = tile or TMA_TILE
    p, c = a_PC.shape
    l, n, _ = w_LNC.shape
    if not tma_fits(c, n, (bm, bn, bk)):
        raise ValueError(f"tma_gemm: C={c} and N={n} must be multiples of {bk} and {bn}")
    hw = a_PC.is_cuda
    out = torch.empty((p, n), dtype=torch.bfloat16, device=a_PC.device)
    if not (p and l):
        return out
    raw = torch.float8_e4m3fn if hw else torch.uint8  # the interpreter has no fp8 dtype
    a_desc = TensorDescriptor(a_PC.view(raw), [p, c], [c, 1], [bm, bk])
    w_desc = TensorDescriptor(w_LNC.view(raw).view(l * n, c), [l * n, c], [c, 1], [bn, bk])
    progs = num_progs or (_num_sms(a_PC.device.index or 0) if hw else 4)
    progs = min(progs, (ceil_div(p, bm) + l) * (n // bn))
    tma_grouped_gemm_kernel[(progs,)](
        a_desc, sa_P, w_desc, sw_LN, plan.offsets_L, out if hw else out.view(torch.int16),
        n, c, l, progs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m,
        LP=max(16, 1 << (l - 1).bit_length()), HW=hw, WS=bool(ws and ws[0]), num_warps=warps,
        num_stages=stages,
    )  # fmt: skip
    return out
