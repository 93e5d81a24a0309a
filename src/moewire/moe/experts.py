"""This rank's experts: SwiGLU FFNs applied to received wire rows, summed per row.

Each expert ``e`` computes ``y = (silu(g) * u) @ w2[e].T`` with ``[g | u] = a @ w13[e].T``
(gate rows, then up rows). The ``(row, k)`` pairs that hit a local expert are sorted by
expert once (stable, so row order within an expert), then one of the compute paths runs:

- ``loop``: one matmul pair per expert, bf16 in, bf16 out; any device. The oracle.
- ``grouped``: the same two GEMMs as ``torch._grouped_mm`` over all local experts at once
  (CUTLASS on Hopper; on CPU, where torch has it, a per-group ``mm``: bitwise the loop).
- ``fp8``: ``fp8`` wire rows go straight into ``torch._scaled_grouped_mm``: the row's e4m3
  payload is the A operand and its fp32 scale the per-row scale; weights are e4m3 with one
  fp32 scale per output channel; the SwiGLU output is re-quantized per row with the same
  ``fp8`` format. Hopper's native "the expert kernel consumes the pre-quantized input";
  CUDA sm90+ only.
- ``fp8_loop``: the ``fp8`` math as a loop in fp32 (e4m3 products are exact in fp32, scales
  applied after the sum, as the kernel does); any device. The oracle of ``fp8``.

Every other wire format (nvfp4/mxfp4 on Hopper, mxfp8, ...) is dequantized to bf16 with
``WireSpec.dequantize`` (the GPU kernel on CUDA) and takes ``loop``/``grouped``.

The weighted expert outputs are added into an fp32 ``[N, H]`` partial sum in ``k`` order
(``((0 + c_0) + c_1) + ...`` over the token's local experts), deterministic on every device.

Shape legend: ``N`` received rows, ``R`` row bytes, ``H`` hidden, ``I`` intermediate,
``L`` local experts, ``K`` top-k, ``M`` (row, local expert) pairs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moewire.formats import WireSpec
from moewire.formats.fp8 import FP8Format

#: Compute paths of the local experts; ``auto`` picks ``grouped`` where torch has it.
EXPERT_IMPLS = ("auto", "loop", "grouped", "fp8", "fp8_loop")
#: Paths that consume ``fp8`` wire rows directly (the wire format must be ``fp8``).
FP8_IMPLS = ("fp8", "fp8_loop")
#: Bytes the grouped GEMMs need their row strides (and so ``H``, ``I``) aligned to.
GEMM_ALIGN_BYTES = 16

_FP8 = FP8Format()


@functools.cache
def _grouped_mm_runs_on_cpu() -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.zeros(2, 8, dtype=torch.bfloat16)
        b = torch.zeros(1, 8, 8, dtype=torch.bfloat16)
        torch._grouped_mm(a, b, offs=torch.tensor([2], dtype=torch.int32))
    except (RuntimeError, NotImplementedError):
        return False
    return True


def resolve_impl(impl: str, device: torch.device) -> str:
    """``auto`` -> ``grouped`` where ``torch._grouped_mm`` runs (CUDA sm90+, or CPU in recent
    torch), else ``loop``; other names are checked and returned unchanged."""
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"experts must be one of {EXPERT_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if device.type == "cuda":
        ok = hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(device)[0] >= 9
    else:
        ok = device.type == "cpu" and _grouped_mm_runs_on_cpu()
    return "grouped" if ok else "loop"


@dataclass(frozen=True)
class ExpertPlan:
    """The ``(row, k)`` pairs routed to local experts, sorted by local expert (stable).

    ``pair_M`` is ``row * K + k``; ``counts`` has one Python int per local expert.
    """

    pair_M: torch.Tensor
    row_M: torch.Tensor
    k_M: torch.Tensor
    weight_M: torch.Tensor
    counts: tuple[int, ...]
    offsets_L: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.pair_M.numel()


def plan_local(
    topk_ids_NK: torch.Tensor,
    topk_weights_NK: torch.Tensor,
    first_expert: int,
    num_local: int,
) -> ExpertPlan:
    """Sort the pairs of ``topk_ids_NK`` (int, global ids already checked in range) that fall
    in ``[first_expert, first_expert + num_local)`` by expert; one host sync for the counts."""
    k = topk_ids_NK.shape[1]
    local = topk_ids_NK.reshape(-1).long() - first_expert
    local = torch.where((local >= 0) & (local < num_local), local, num_local)
    order = torch.sort(local, stable=True)[1]
    counts_all = torch.bincount(local, minlength=num_local + 1)
    counts = tuple(int(c) for c in counts_all[:num_local].tolist())
    pair = order[: sum(counts)]
    offsets = torch.cumsum(counts_all[:num_local], 0).to(torch.int32)
    return ExpertPlan(
        pair_M=pair,
        row_M=pair // k,
        k_M=pair % k,
        weight_M=topk_weights_NK.reshape(-1)[pair].float(),
        counts=counts,
        offsets_L=offsets,
    )


def swiglu(h_M2I: torch.Tensor) -> torch.Tensor:
    """``[M, 2I]`` (gate, then up) -> bf16 ``silu(gate) * up`` ``[M, I]``, computed in fp32."""
    gate, up = h_M2I.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(torch.bfloat16)


def quantize_fp8_rows(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``fp8`` quantization (the wire format's math): e4m3 ``[M, K]``, fp32 ``[M]``."""
    q, s = _FP8.quantize(x_MK.float())
    return q, s.reshape(-1)


def quantize_fp8_weight(w_LOK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel e4m3 weights: ``[L, O, K]`` -> e4m3 ``[L, O, K]``, fp32 ``[L, O]``."""
    l, o, k = w_LOK.shape
    q, s = _FP8.quantize(w_LOK.reshape(l * o, k).float())
    return q.reshape(l, o, k), s.reshape(l, o)


class LocalExperts(nn.Module):
    """The ``L`` experts this rank hosts: global ids ``[first_expert, first_expert + L)``.

    Args:
        w13_L2IH: ``[L, 2I, H]`` float, gate rows then up rows; stored as bf16.
        w2_LHI: ``[L, H, I]`` float; stored as bf16.
        first_expert: global id of local expert 0.
        fp8: also keep per-channel e4m3 copies of the weights (for ``fp8``/``fp8_loop``),
            quantized from the bf16 weights.
    """

    def __init__(
        self, w13_L2IH: torch.Tensor, w2_LHI: torch.Tensor, first_expert: int, *, fp8: bool
    ) -> None:
        super().__init__()
        self.first_expert = first_expert
        self.num_local = w13_L2IH.shape[0]
        self.register_buffer("w13_L2IH", w13_L2IH.to(torch.bfloat16).contiguous())
        self.register_buffer("w2_LHI", w2_LHI.to(torch.bfloat16).contiguous())
        self.fp8 = fp8
        if fp8:
            q13, s13 = quantize_fp8_weight(self.w13_L2IH)
            q2, s2 = quantize_fp8_weight(self.w2_LHI)
            self.register_buffer("w13_fp8", q13)
            self.register_buffer("w13_scale", s13)
            self.register_buffer("w2_fp8", q2)
            self.register_buffer("w2_scale", s2)

    def forward(
        self,
        spec: WireSpec,
        rows_NR: torch.Tensor,
        topk_ids_NK: torch.Tensor,
        topk_weights_NK: torch.Tensor,
        impl: str,
    ) -> torch.Tensor:
        """Apply the local experts to received rows.

        Args:
            spec: the rows' layout (any format; ``fp8`` for the fp8 paths).
            rows_NR: uint8 ``[N, R]`` received rows.
            topk_ids_NK: ``[N, K]`` int global expert ids, already checked to be in ``[0, E)``.
            topk_weights_NK: ``[N, K]`` fp32 weights.
            impl: ``loop``, ``grouped``, ``fp8`` or ``fp8_loop`` (see the module docstring).

        Returns:
            fp32 ``[N, H]``: for each row, the weighted sum of its local experts' outputs
            (zeros for rows without a local expert).
        """
        n = rows_NR.shape[0]
        out_NH = torch.zeros((n, spec.hidden), dtype=torch.float32, device=rows_NR.device)
        plan = plan_local(topk_ids_NK, topk_weights_NK, self.first_expert, self.num_local)
        if plan.num_pairs == 0:
            return out_NH
        rows_MR = rows_NR[plan.row_M]
        if impl in FP8_IMPLS:
            if spec.format != "fp8" or not self.fp8:
                raise ValueError(
                    f"experts={impl!r} consumes 'fp8' wire rows with fp8 weights, got wire "
                    f"format {spec.format!r} (fp8 weights {'on' if self.fp8 else 'off'})"
                )
            view = spec.unpack(rows_MR)
            a_MH, scale_M = view.payload.contiguous(), view.scales.reshape(-1).contiguous()
            y_MH = (_ffn_fp8 if impl == "fp8" else _ffn_fp8_loop)(self, a_MH, scale_M, plan)
        else:
            a_MH = spec.dequantize(rows_MR, torch.bfloat16)
            if impl == "grouped":
                y_MH = _ffn_grouped(self, a_MH, plan)
            elif impl == "loop":
                y_MH = _ffn_loop(self, a_MH, plan)
            else:
                raise ValueError(f"experts must be one of {EXPERT_IMPLS[1:]}, got {impl!r}")
        contrib_MH = y_MH.float() * plan.weight_M[:, None]
        for k in range(topk_ids_NK.shape[1]):
            sel = (plan.k_M == k).nonzero().squeeze(1)
            if sel.numel():
                out_NH.index_add_(0, plan.row_M[sel], contrib_MH[sel])
        return out_NH


def _ffn_loop(ex: LocalExperts, a_MH: torch.Tensor, plan: ExpertPlan) -> torch.Tensor:
    y_MH = torch.empty_like(a_MH)
    start = 0
    for e, c in enumerate(plan.counts):
        if c:
            a = a_MH[start : start + c]
            h = torch.mm(a, ex.w13_L2IH[e].t())
            y_MH[start : start + c] = torch.mm(swiglu(h), ex.w2_LHI[e].t())
        start += c
    return y_MH


def _check_gemm_dims(ex: LocalExperts, itemsize: int, what: str) -> None:
    _, two_i, h = ex.w13_L2IH.shape
    align = GEMM_ALIGN_BYTES // itemsize
    if h % align or (two_i // 2) % align:
        raise ValueError(
            f"experts={what!r} needs hidden and intermediate to be multiples of {align} "
            f"({GEMM_ALIGN_BYTES}-byte rows), got hidden={h}, intermediate={two_i // 2}"
        )


def _ffn_grouped(ex: LocalExperts, a_MH: torch.Tensor, plan: ExpertPlan) -> torch.Tensor:
    _check_gemm_dims(ex, 2, "grouped")
    h_M2I = torch._grouped_mm(a_MH, ex.w13_L2IH.transpose(-2, -1), offs=plan.offsets_L)
    return torch._grouped_mm(swiglu(h_M2I), ex.w2_LHI.transpose(-2, -1), offs=plan.offsets_L)


def _ffn_fp8(
    ex: LocalExperts, a_MH: torch.Tensor, scale_M: torch.Tensor, plan: ExpertPlan
) -> torch.Tensor:
    _check_gemm_dims(ex, 1, "fp8")

    def gemm(a, sa, w, sw):
        return torch._scaled_grouped_mm(
            a, w.transpose(-2, -1), sa, sw, offs=plan.offsets_L, out_dtype=torch.bfloat16
        )

    h_M2I = gemm(a_MH, scale_M, ex.w13_fp8, ex.w13_scale)
    a2_MI, s2_M = quantize_fp8_rows(swiglu(h_M2I))
    return gemm(a2_MI, s2_M, ex.w2_fp8, ex.w2_scale)


def _ffn_fp8_loop(
    ex: LocalExperts, a_MH: torch.Tensor, scale_M: torch.Tensor, plan: ExpertPlan
) -> torch.Tensor:
    def gemm(a, sa, w, sw):
        acc = torch.mm(a.float(), w.float().t())
        return (acc * sa[:, None] * sw[None, :]).to(torch.bfloat16)

    y_MH = torch.empty(a_MH.shape, dtype=torch.bfloat16, device=a_MH.device)
    start = 0
    for e, c in enumerate(plan.counts):
        if c:
            sl = slice(start, start + c)
            h = gemm(a_MH[sl], scale_M[sl], ex.w13_fp8[e], ex.w13_scale[e])
            a2, s2 = quantize_fp8_rows(swiglu(h))
            y_MH[sl] = gemm(a2, s2, ex.w2_fp8[e], ex.w2_scale[e])
        start += c
    return y_MH
