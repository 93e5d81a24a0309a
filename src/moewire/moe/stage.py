"""The host-sync-free expert stage: plan on the device, then fused steps around the GEMMs.

    rows_NR ─plan─▶ sorted pairs ─gather+decode─▶ a_PH ─GEMM─▶ h_P2I ─swiglu(+fp8)─▶ a2_PI
            ─GEMM─▶ y_PH ─unpermute (sum_k w_k y_k in k order)─▶ partial_NH

Every step is a device op with shapes known on the host: the ``N*K`` (row, k) pairs are
sorted by local expert (non-local pairs last), so buffers are sized by the upper bound
``P = N*K`` and the number of local pairs stays on the device (the grouped GEMMs read it
from their offsets; the fused kernels skip the rows past it). No ``.item()``, ``.tolist()``,
``nonzero`` or ``bincount``: the stage can be captured in a CUDA graph.

On CUDA the steps are the Triton kernels of ``_kernels/stage.py``; elsewhere (and as their
oracle) the torch functions of the same name below, which compute the same values.

Shape legend: ``N`` received rows, ``K`` top-k, ``P = N*K`` pairs, ``L`` local experts,
``H`` hidden, ``I`` intermediate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moewire.constants import FP8_BLOCK128, ceil_div
from moewire.formats import WireSpec
from moewire.formats._launch import arg_key, launcher
from moewire.formats.fp8 import FP8Block128Format, FP8Format
from moewire.formats.spec import pick_backend

_FP8 = FP8Format()
_FP8_BLOCK = FP8Block128Format()
#: Values of the unpermute kernel's column tile.
_UNPERMUTE_BLOCK = 1024


@dataclass(frozen=True)
class DevicePlan:
    """The ``(row, k)`` pairs of ``N`` received rows sorted by local expert, on the device.

    Attributes:
        row_P: int32 ``[P]``, the received row of each sorted pair (local pairs first, in
            expert order, stable: row order within an expert; then the non-local pairs).
        offsets_L: int32 ``[L]``, the end of each local expert's pairs (``_grouped_mm``'s
            ``offs``); ``offsets_L[-1]`` is the number of local pairs.
        count_1: int32 ``[1]``, the number of local pairs.
        inv_NK: int32 ``[N, K]``, the sorted position of pair ``(n, k)``, -1 if non-local.
        rows_per_expert: the local pairs per local expert expected with uniform routing,
            ``N * K / E`` (a host value: what the GEMMs pick their kernel by).
    """

    row_P: torch.Tensor
    offsets_L: torch.Tensor
    count_1: torch.Tensor
    inv_NK: torch.Tensor
    rows_per_expert: float

    @property
    def num_pairs(self) -> int:
        """``P``, the upper bound of the local pairs."""
        return self.row_P.numel()

    def host_groups(self) -> list[tuple[int, slice]]:
        """``(local expert, its sorted pairs)`` of every expert with pairs, read on the host
        (one host sync: the per-expert oracles only)."""
        ends = self.offsets_L.tolist()
        bounds = zip([0, *ends[:-1]], ends, strict=True)
        return [(e, slice(lo, hi)) for e, (lo, hi) in enumerate(bounds) if hi > lo]


def plan_device(
    topk_ids_NK: torch.Tensor,
    first_expert: int,
    num_local: int,
    num_experts: int | None = None,
    backend: str | None = None,
    valid: tuple[torch.Tensor, int] | None = None,
) -> DevicePlan:
    """Sort the pairs of ``topk_ids_NK`` (int global expert ids) that fall in
    ``[first_expert, first_expert + num_local)`` by expert, without a host sync. Ids
    outside that range (other ranks' experts, or invalid ones) are never used as an index:
    their pairs are non-local. ``valid``: ``(valid_W, T)`` for padded batches: the rows
    come ``T`` per rank and only the first ``valid_W[rank]`` of each rank's are real (the
    others' pairs are non-local). On CUDA one kernel (``plan_kernel``), bitwise the torch
    ops below."""
    n, k = topk_ids_NK.shape
    dev = topk_ids_NK.device
    per_expert = n * k / (num_experts or num_local)
    if num_local and n and _use_triton(topk_ids_NK, backend):
        return _plan_triton(topk_ids_NK, first_expert, num_local, per_expert, valid)
    if valid is not None:
        topk_ids_NK = torch.where(_real_rows(n, *valid, dev)[:, None], topk_ids_NK, -1)
    local_P = topk_ids_NK.reshape(-1).to(torch.int32) - first_expert
    local_P = torch.where((local_P >= 0) & (local_P < num_local), local_P, num_local)
    key_P, order_P = torch.sort(local_P, stable=True)
    bounds = torch.arange(1, num_local + 1, dtype=torch.int32, device=dev)
    offsets_L = torch.searchsorted(key_P, bounds, out_int32=True)
    count_1 = offsets_L[-1:] if num_local else torch.zeros(1, dtype=torch.int32, device=dev)
    pos_P = torch.arange(n * k, dtype=torch.int32, device=dev)
    inv_P = torch.empty(n * k, dtype=torch.int32, device=dev)
    inv_P.index_copy_(0, order_P, torch.where(key_P < num_local, pos_P, -1))
    row_P = torch.div(order_P, k, rounding_mode="floor").to(torch.int32)
    return DevicePlan(row_P, offsets_L, count_1, inv_P.view(n, k), per_expert)


#: The plan kernel's bins x pairs per program (its one-hot tile) and pairs per count step.
_PLAN_TILE = 8192
_PLAN_SCAN = 2048
#: Up to this many pairs the plan kernel takes 32 pairs per program: measured on one H100
#: (CUDA-graph timed, 64 local experts), 4.1-5.0 us against 9.2-10.9 us with 64 at 8-512
#: pairs and 7.7 against 13.6 us at 2048; at 8192 pairs 64 per program is as fast (20.3 us).
_PLAN_SMALL_P = 4096


def _real_rows(n: int, valid_W: torch.Tensor, t: int, device: torch.device) -> torch.Tensor:
    """bool ``[N]``: row ``n`` (rank ``n // T``, slot ``n % T``) is a real token."""
    pos_N = torch.arange(n, device=device)
    return (pos_N % max(t, 1)) < valid_W.to(device)[pos_N // max(t, 1)]


def _plan_triton(
    topk_ids_NK: torch.Tensor,
    first_expert: int,
    num_local: int,
    per_expert: float,
    valid: tuple[torch.Tensor, int] | None,
) -> DevicePlan:
    """:func:`plan_device` in one launch of ``plan_kernel``."""
    from moewire.moe._kernels.stage import plan_kernel

    n, k = topk_ids_NK.shape
    p, dev = n * k, topk_ids_NK.device
    ids_P = topk_ids_NK.reshape(-1)
    if not ids_P.is_contiguous():
        ids_P = ids_P.contiguous()
    row_P = torch.empty(p, dtype=torch.int32, device=dev)
    offsets_L = torch.empty(num_local, dtype=torch.int32, device=dev)
    inv_P = torch.empty(p, dtype=torch.int32, device=dev)
    bins = 1 << (num_local + 1).bit_length()  # >= num_local + 2
    block = max(16, min(32 if p <= _PLAN_SMALL_P else 64, _PLAN_TILE // bins))
    scan = max(16, min(_PLAN_SCAN, 1 << (p - 1).bit_length()))
    valid_W, t = (ids_P, 1) if valid is None else (valid[0].to(dev), max(valid[1], 1))
    args = (ids_P, p, k, first_expert, num_local, row_P, offsets_L, inv_P, valid_W, t)
    launcher(
        plan_kernel, BLOCK=block, SCAN=scan, LP=bins, HAS_VALID=valid is not None, num_warps=4
    )((ceil_div(p, block),), arg_key(*args), *args)
    return DevicePlan(row_P, offsets_L, offsets_L[-1:], inv_P.view(n, k), per_expert)


def _use_triton(t: torch.Tensor, backend: str | None) -> bool:
    """``backend`` as :meth:`moewire.WireSpec.pack` takes it: ``"torch"``, ``"triton"``
    (CUDA, or CPU under ``TRITON_INTERPRET=1``) or None (triton on CUDA where importable)."""
    return pick_backend(backend, t.device) == "triton"


def quantize_fp8_rows(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``fp8`` quantization (the wire format's math): e4m3 ``[M, K]``, fp32 ``[M]``."""
    q, s = _FP8.quantize(x_MK.float())
    return q, s.reshape(-1)


def quantize_fp8_blocks(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp8_block128`` quantization (1x128 blocks, the wire format's math): e4m3
    ``[M, K]``, fp32 ``[M, K/128]``."""
    return _FP8_BLOCK.quantize(x_MK.float())


def gather_bf16(
    spec: WireSpec, rows_NR: torch.Tensor, plan: DevicePlan, backend: str | None = None
) -> torch.Tensor:
    """The first GEMM's bf16 A operand ``[P, H]``: row ``p`` is received row ``row_P[p]``
    dequantized (rows past the local pairs are left unwritten)."""
    p, h = plan.num_pairs, spec.hidden
    if not _use_triton(rows_NR, backend):
        return spec.dequantize(rows_NR.index_select(0, plan.row_P), torch.bfloat16, backend="torch")
    from moewire.formats._triton import decoder
    from moewire.moe._kernels.stage import gather_decode_kernel

    d = decoder(spec, rows_NR.device.type)
    out = torch.empty((p, h), dtype=torch.bfloat16, device=rows_NR.device)
    if p:
        args = (rows_NR, rows_NR.stride(0), plan.row_P, plan.count_1, out, h, d.nb,
                d.scale_off, d.inv_g)  # fmt: skip
        launcher(
            gather_decode_kernel, KIND=d.kind, NBLK=d.nblk, BLKP=d.blkp, FULL=d.full,
            HW=d.hw, num_warps=d.num_warps,
        )((p, d.n_chunks), arg_key(*args), *args)  # fmt: skip
    return out


def gather_fp8(
    spec: WireSpec,
    rows_NR: torch.Tensor,
    plan: DevicePlan,
    backend: str | None = None,
    *,
    block: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp8 GEMMs' A operand: e4m3 ``[P, H]`` and fp32 scales ``[P]`` (rowwise), or with
    ``block`` ``[P, H/128]`` (one per 128 values, ``H`` a multiple of 128).

    Rows of the format of that recipe (``fp8``; with ``block``, ``fp8_block128``) are
    consumed as they are (their payload and scales, gathered), and so are ``fp8`` rows with
    ``block`` (the row's scale repeated for each of its 128-value blocks: the same values,
    no requantization); every other format is decoded to fp32 and quantized with the recipe
    in one kernel (bitwise ``FP8Format.quantize(spec.dequantize(rows, float32))``, or
    ``FP8Block128Format``'s)."""
    triton = _use_triton(rows_NR, backend)
    fmt = spec.wire_format
    if fmt.rowwise_fp8 or (block and fmt.block128_fp8):
        gather = _gather_fp8_rows if triton else _index_fp8_rows
        return gather(spec, rows_NR, plan, block)
    if not triton:
        x_PH = spec.dequantize(rows_NR.index_select(0, plan.row_P), torch.float32, backend="torch")
        return quantize_fp8_blocks(x_PH) if block else quantize_fp8_rows(x_PH)
    from moewire.formats._triton import decoder
    from moewire.moe._kernels.stage import gather_fp8_block_kernel, gather_fp8_kernel

    d = decoder(spec, rows_NR.device.type)
    p, h = plan.num_pairs, spec.hidden
    q = torch.empty((p, h), dtype=torch.float8_e4m3fn, device=rows_NR.device)
    s_shape = (p, h // FP8_BLOCK128) if block else (p,)
    s = torch.empty(s_shape, dtype=torch.float32, device=rows_NR.device)
    if p:
        args = (rows_NR, rows_NR.stride(0), plan.row_P, plan.count_1, q.view(torch.uint8), s,
                h, d.nb, d.scale_off, d.inv_g)  # fmt: skip
        consts = dict(KIND=d.kind, NBLK=d.nblk, BLKP=d.blkp, FULL=d.full, HW=d.hw,
                      num_warps=d.num_warps)  # fmt: skip
        if block:  # a decode chunk is whole 128-value blocks (``_tiles._chunking``)
            launcher(gather_fp8_block_kernel, **consts)((p, d.n_chunks), arg_key(*args), *args)
        else:
            launcher(gather_fp8_kernel, N_CHUNKS=d.n_chunks, **consts)((p,), arg_key(*args), *args)
    return q, s


def _index_fp8_rows(spec: WireSpec, rows_NR: torch.Tensor, plan: DevicePlan, block: bool) -> tuple:
    """e4m3 rows' payload and scales (``[P]``, or ``[P, H/128]`` with ``block``) in the
    plan's order (torch)."""
    view = spec.unpack(rows_NR)
    idx = plan.row_P.long()
    s = view.scales.index_select(0, idx)
    if block and s.shape[1] == 1:  # fp8 rows: the row's scale for each 128-value block
        s = s.expand(-1, spec.hidden // FP8_BLOCK128).contiguous()
    return view.payload.index_select(0, idx), s if block else s.reshape(-1)


def _gather_fp8_rows(spec: WireSpec, rows_NR: torch.Tensor, plan: DevicePlan, block: bool) -> tuple:
    """:func:`_index_fp8_rows` in one kernel (``gather_fp8_rows_kernel``), local pairs only."""
    from moewire.moe._kernels.stage import gather_fp8_rows_kernel

    p, h, dev = plan.num_pairs, spec.hidden, rows_NR.device
    sec = spec.sections
    ns = sec["scales"].numel
    rep = h // FP8_BLOCK128 if block and ns == 1 else 1  # fp8 rows into the block GEMM
    q = torch.empty((p, h), dtype=torch.float8_e4m3fn, device=dev)
    s = torch.empty((p, ns * rep) if block else (p,), dtype=torch.float32, device=dev)
    if p:
        args = (rows_NR, rows_NR.stride(0), plan.row_P, plan.count_1, q, s, h // 4)
        launcher(
            gather_fp8_rows_kernel, PAY_OFF=sec["payload"].offset, SCALE_OFF=sec["scales"].offset,
            NS=ns, REP=rep, BLOCK=min(1024, 1 << (h // 4 - 1).bit_length()), num_warps=4,
        )((p,), arg_key(*args), *args)  # fmt: skip
    return q, s


def swiglu_torch(h_P2I: torch.Tensor) -> torch.Tensor:
    """``[P, 2I]`` (gate, then up) -> bf16 ``silu(gate) * up`` ``[P, I]``, in fp32."""
    gate, up = h_P2I.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(torch.bfloat16)


def swiglu(
    h_P2I: torch.Tensor,
    plan: DevicePlan,
    *,
    fp8: bool,
    block: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SwiGLU of the first GEMM's output, rounded to bf16; with ``fp8`` quantized per row
    (e4m3 ``[P, I]``, fp32 ``[P]``), with ``block`` too per 128 values (fp32
    ``[P, I/128]``, the ``fp8_block128`` recipe; ``I`` a multiple of 128), in the same
    kernel. Returns ``(a2, scales or None)``."""
    if not _use_triton(h_P2I, backend):
        y = swiglu_torch(h_P2I)
        if not fp8:
            return y, None
        return quantize_fp8_blocks(y) if block else quantize_fp8_rows(y)
    from moewire.moe._kernels.stage import swiglu_kernel

    p, i = h_P2I.shape[0], h_P2I.shape[1] // 2
    dt = torch.float8_e4m3fn if fp8 else torch.bfloat16
    out = torch.empty((p, i), dtype=dt, device=h_P2I.device)
    shape = ((p, i // FP8_BLOCK128) if block else (p,)) if fp8 else (1,)
    s = torch.empty(shape, dtype=torch.float32, device=h_P2I.device)
    if p:
        block_i = max(16, 1 << (i - 1).bit_length())
        args = (h_P2I, plan.count_1, out.view(torch.uint8) if fp8 else out, s, i)
        launcher(
            swiglu_kernel, BLOCK_I=block_i, FP8=fp8, BLOCKS=fp8 and block, HW=h_P2I.is_cuda,
            num_warps=max(1, min(16, block_i // 256)),
        )((p,), arg_key(*args), *args)  # fmt: skip
    return out, (s if fp8 else None)


def unpermute_torch(
    y_PH: torch.Tensor, plan: DevicePlan, weights_NK: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``out[n] = sum_k w[n, k] * y[inv[n, k]]`` over local ``k`` in ``k`` order, fp32,
    rounded once to ``dtype`` (zeros for rows without a local expert)."""
    n, k = plan.inv_NK.shape
    acc = torch.zeros((n, y_PH.shape[1]), dtype=torch.float32, device=y_PH.device)
    for j in range(k):
        live = plan.inv_NK[:, j] >= 0
        y = y_PH.index_select(0, plan.inv_NK[:, j].clamp(min=0).long()).float()
        acc = torch.where(live[:, None], acc + y * weights_NK[:, j : j + 1].float(), acc)
    return acc.to(dtype)


def unpermute(
    y_PH: torch.Tensor,
    plan: DevicePlan,
    weights_NK: torch.Tensor,
    dtype: torch.dtype,
    backend: str | None = None,
) -> torch.Tensor:
    """Un-permute and weighted sum (see :func:`unpermute_torch`), one kernel on CUDA."""
    if not _use_triton(y_PH, backend):
        return unpermute_torch(y_PH, plan, weights_NK, dtype)
    from moewire.moe._kernels.stage import unpermute_kernel

    n, k = plan.inv_NK.shape
    h = y_PH.shape[1]
    out = torch.empty((n, h), dtype=dtype, device=y_PH.device)
    w = weights_NK.float()
    if w.stride(1) != 1:
        w = w.contiguous()
    if n:
        block = min(_UNPERMUTE_BLOCK, 1 << (h - 1).bit_length())
        args = (y_PH, plan.inv_NK, w, w.stride(0), out, h)
        launcher(
            unpermute_kernel, K=k, BLOCK_H=block, OUT=0 if dtype == torch.float32 else 1,
            HW=y_PH.is_cuda, num_warps=4, enable_fp_fusion=False,
        )((n, ceil_div(h, block)), arg_key(*args), *args)  # fmt: skip
    return out


#: Expected rows per expert (``N * K / E``) up to which the GEMMs take the small-M Triton
#: kernel (``_kernels/gemm.py``) instead of torch's grouped GEMMs; by measurement on one
#: H200 (BENCHMARKS.md, "expert stage").
SMALL_M_ROWS = 32
#: Tiles of the small-M kernel per operand kind and row tile (``small_m_block``):
#: (BLOCK_N, BLOCK_K, num_warps, num_stages, SWAP), the best of
#: ``tools/stage_profile.py --sweep``.
SMALL_M_TILES = {
    ("bf16", 16): (128, 128, 4, 3, True),
    ("bf16", 32): (128, 128, 4, 3, True),
    ("bf16", 64): (128, 128, 4, 4, True),
    ("fp8", 16): (128, 256, 4, 3, True),
    ("fp8", 32): (128, 256, 4, 3, True),
    ("fp8", 64): (128, 128, 4, 4, True),
}


def small_m_block(rows_per_expert: float) -> int:
    """The small-M kernel's row tile: a power of two in ``[16, 64]`` holding twice the
    expected rows per expert, so that an expert with more rows than the mean still has its
    weights read once."""
    return min(64, max(16, 1 << max(0, math.ceil(2 * rows_per_expert) - 1).bit_length()))


def grouped_gemm(
    a_PC: torch.Tensor,
    w_LNC: torch.Tensor,
    plan: DevicePlan,
    scale_P: torch.Tensor | None = None,
    scale_LN: torch.Tensor | None = None,
    *,
    small: bool | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``out[p] = a[p] @ w[e(p)].T`` over the plan's groups, bf16 ``[P, N]`` (rows past the
    local pairs unwritten). bf16 operands, or e4m3 with fp32 scales per row and per output
    channel (the rowwise fp8 GEMM). ``small``: the small-M Triton kernel (None: with the
    Triton ``backend`` when the plan expects at most ``SMALL_M_ROWS`` rows per expert),
    else ``torch._grouped_mm`` / ``_scaled_grouped_mm``."""
    p, c = a_PC.shape
    l, n, _ = w_LNC.shape
    if small is None:
        small = plan.rows_per_expert <= SMALL_M_ROWS and _use_triton(a_PC, backend)
    if not small:
        wt = w_LNC.transpose(-2, -1)
        if scale_P is None:
            return torch._grouped_mm(a_PC, wt, offs=plan.offsets_L)
        return torch._scaled_grouped_mm(
            a_PC, wt, scale_P, scale_LN, offs=plan.offsets_L, out_dtype=torch.bfloat16
        )
    from moewire.moe._kernels.gemm import small_grouped_gemm_kernel

    fp8 = scale_P is not None
    out = torch.empty((p, n), dtype=torch.bfloat16, device=a_PC.device)
    block_m = small_m_block(plan.rows_per_expert)
    block_n, block_k, warps, stages, swap = SMALL_M_TILES["fp8" if fp8 else "bf16", block_m]
    hw = a_PC.is_cuda
    raw = torch.uint8 if fp8 else (torch.bfloat16 if hw else torch.int16)
    args = (a_PC.view(raw), scale_P if fp8 else a_PC, w_LNC.view(raw),
            scale_LN if fp8 else w_LNC, plan.offsets_L, out if hw else out.view(torch.int16),
            n, c)  # fmt: skip
    launcher(
        small_grouped_gemm_kernel, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, FP8=fp8,
        HW=hw, SWAP=swap, num_warps=warps, num_stages=stages,
    )((ceil_div(n, block_n), l), arg_key(*args), *args)  # fmt: skip
    return out
