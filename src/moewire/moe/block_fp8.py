"""The block-scaled fp8 GEMMs of the expert stage (DeepSeek-V3's recipe, as DeepEP +
DeepGEMM run it): e4m3 weights with one fp32 scale per 128x128 block (a checkpoint's
``weight_scale_inv``, kept as it is) times e4m3 activations with one fp32 scale per row per
128 input channels (the ``fp8_block128`` wire format's own scales).

- :func:`block_gemm`: the grouped GEMM over a device plan, one launch of
  ``block_grouped_gemm_kernel`` (``_kernels/gemm_block.py``), no host sync; elsewhere (no
  Triton backend) the oracle math below, per expert (host counts).
- :func:`scaled_mm`: one expert's product in fp32 (the ``fp8_loop`` oracle): e4m3 products
  are exact in fp32; per K block of 128, ``(a_kb @ w_kb.T) * sa[:, kb] * sw[nb, kb]`` added
  in ``kb`` order (the kernel's math up to the order of each block's fp32 sum), or with
  rowwise scales ``(a @ w.T) * sa * sw`` after the sum.

Shape legend: ``P`` rows (sorted pairs), ``C`` input channels, ``N`` output channels,
``L`` experts, ``B`` scale blocks of 128 (``C/128`` for activations).
"""

from __future__ import annotations

import torch

from moewire.constants import FP8_BLOCK128, ceil_div
from moewire.formats._launch import arg_key, launcher
from moewire.formats.spec import pick_backend
from moewire.moe.stage import SMALL_M_ROWS, DevicePlan, small_m_block

#: Tiles of the block GEMM per row tile ``BLOCK_M``: (BLOCK_N, GROUP_M, num_warps,
#: num_stages, SWAP). BLOCK_K is 128 (one scale per K step). 16-64 rows (few per expert)
#: multiply the transposed tile so that the weights fill the tensor core's 64-row side;
#: 128 rows is the prefill tile, the best of five on one H100 at DeepSeek-R1 dims with 64
#: experts (BENCHMARKS.md, "block-scaled fp8 GEMM"): 256 columns or 4 warps ran 2-4x slower.
BLOCK_FP8_TILES = {
    16: (128, 8, 4, 4, True),
    32: (128, 8, 4, 4, True),
    64: (128, 8, 4, 3, True),
    128: (128, 8, 8, 4, False),
}
#: The prefill row tile (more than ``SMALL_M_ROWS`` expected rows per expert).
LARGE_BLOCK_M = 128


def block_m_for(rows_per_expert: float) -> int:
    """The row tile for ``rows_per_expert`` expected rows per expert: the small-M tiles of
    ``stage.small_m_block`` up to ``SMALL_M_ROWS``, else :data:`LARGE_BLOCK_M`."""
    return small_m_block(rows_per_expert) if rows_per_expert <= SMALL_M_ROWS else LARGE_BLOCK_M


def check_block_dims(hidden: int, intermediate: int) -> None:
    """``ValueError`` unless ``hidden`` and ``intermediate`` are multiples of 128 (the
    block-scaled fp8 path's scale blocks)."""
    if hidden % FP8_BLOCK128 or intermediate % FP8_BLOCK128:
        raise ValueError(
            f"block-scaled fp8 experts need hidden and intermediate to be multiples of "
            f"{FP8_BLOCK128}, got hidden={hidden}, intermediate={intermediate}"
        )


def scaled_mm(
    a_MC: torch.Tensor, sa: torch.Tensor, w_NC: torch.Tensor, sw: torch.Tensor
) -> torch.Tensor:
    """One expert's fp8 product in fp32 ``[M, N]``: block scales (``sa [M, C/128]``, ``sw
    [ceil(N/128), C/128]``) per K block in ``kb`` order, or rowwise scales (``sa [M]``,
    ``sw [N]``) after the sum."""
    if sw.dim() == 1:
        return (torch.mm(a_MC.float(), w_NC.float().t()) * sa[:, None]) * sw[None, :]
    n = w_NC.shape[0]
    sw_NB = sw.repeat_interleave(FP8_BLOCK128, 0)[:n]
    acc = torch.zeros((a_MC.shape[0], n), dtype=torch.float32, device=a_MC.device)
    for kb in range(a_MC.shape[1] // FP8_BLOCK128):
        k = slice(kb * FP8_BLOCK128, (kb + 1) * FP8_BLOCK128)
        part = torch.mm(a_MC[:, k].float(), w_NC[:, k].float().t())
        acc = acc + (part * sa[:, kb, None]) * sw_NB[None, :, kb]
    return acc


def _check(a_PC, sa, w_LNC, sw, rowwise: bool) -> None:
    p, c = a_PC.shape
    l, n, c2 = w_LNC.shape
    want_sa = (p,) if rowwise else (p, c // FP8_BLOCK128)
    want_sw = (l, n) if rowwise else (l, ceil_div(n, FP8_BLOCK128), c // FP8_BLOCK128)
    if c != c2 or c % FP8_BLOCK128:
        raise ValueError(f"block_gemm: a [P, {c}] and w [L, N, {c2}] need one C, a multiple "
                         f"of {FP8_BLOCK128}")  # fmt: skip
    if tuple(sa.shape) != want_sa or tuple(sw.shape) != want_sw:
        raise ValueError(
            f"block_gemm: scales must be {list(want_sa)} and {list(want_sw)} (rowwise="
            f"{rowwise}), got {list(sa.shape)} and {list(sw.shape)}"
        )
    for name, t, dt in (("a", a_PC, torch.float8_e4m3fn), ("w", w_LNC, torch.float8_e4m3fn),
                        ("sa", sa, torch.float32), ("sw", sw, torch.float32)):  # fmt: skip
        if t.dtype != dt or not t.is_contiguous():
            raise TypeError(f"block_gemm: {name} must be contiguous {dt}, got {t.dtype} with "
                            f"strides {t.stride()}")  # fmt: skip


def _block_gemm_torch(a_PC, sa, w_LNC, sw, plan: DevicePlan, out: torch.Tensor) -> None:
    """The oracle math per expert (reads the group ends on the host)."""
    for e, sl in plan.host_groups():
        out[sl] = scaled_mm(a_PC[sl], sa[sl], w_LNC[e], sw[e]).to(out.dtype)


def block_gemm(
    a_PC: torch.Tensor,
    sa: torch.Tensor,
    w_LNC: torch.Tensor,
    sw: torch.Tensor,
    plan: DevicePlan,
    *,
    rowwise: bool = False,
    block_m: int | None = None,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``out[p] = a[p] @ w[e(p)].T`` over the plan's groups, bf16 ``[P, N]``; rows past the
    local pairs (``plan.offsets_L[-1]``, on the device) are not written.

    Args:
        a_PC: float8_e4m3fn ``[P, C]``, contiguous, ``C`` a multiple of 128.
        sa: fp32 ``[P, C/128]`` (one scale per row per 128 channels), or ``[P]`` with
            ``rowwise``.
        w_LNC: float8_e4m3fn ``[L, N, C]``, contiguous.
        sw: fp32 ``[L, ceil(N/128), C/128]`` (per 128x128 block), or ``[L, N]`` with
            ``rowwise``.
        plan: the device plan (``offsets_L``: the groups' ends; ``rows_per_expert`` picks
            the row tile).
        rowwise: per-row x per-output-channel scales, applied after the K loop (the
            rowwise fp8 GEMM's math, for comparison with ``torch._scaled_grouped_mm``).
        block_m: the row tile, a key of :data:`BLOCK_FP8_TILES` (None: by
            :func:`block_m_for`).
        out: bf16 ``[P, N]`` to write into (None: a new, uninitialized one).
        backend: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (the
            oracle math per expert, with a host sync) or None (triton on CUDA).
    """
    _check(a_PC, sa, w_LNC, sw, rowwise)
    p, c = a_PC.shape
    l, n, _ = w_LNC.shape
    if out is None:
        out = torch.empty((p, n), dtype=torch.bfloat16, device=a_PC.device)
    if pick_backend(backend, a_PC.device) != "triton":
        _block_gemm_torch(a_PC, sa, w_LNC, sw, plan, out)
        return out
    from moewire.moe._kernels.gemm_block import block_grouped_gemm_kernel

    bm = block_m or block_m_for(plan.rows_per_expert)
    bn, group_m, warps, stages, swap = BLOCK_FP8_TILES[bm]
    hw = a_PC.is_cuda
    mt = ceil_div(p, bm) + l
    raw = torch.float8_e4m3fn if hw else torch.uint8  # the interpreter has no fp8 dtype
    args = (a_PC.view(raw), sa, w_LNC.view(raw), sw, plan.offsets_L,
            out if hw else out.view(torch.int16), n, c, l, mt)  # fmt: skip
    if p and l:
        launcher(
            block_grouped_gemm_kernel, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=FP8_BLOCK128,
            GROUP_M=group_m, LP=max(16, 1 << (l - 1).bit_length()), ROWWISE=rowwise,
            SWAP=swap, HW=hw, num_warps=warps, num_stages=stages,
        )((mt * ceil_div(n, bn),), arg_key(*args), *args)  # fmt: skip
    return out
