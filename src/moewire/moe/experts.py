"""This rank's experts: SwiGLU FFNs applied to received wire rows, summed per row.

Each expert ``e`` computes ``y = (silu(g) * u) @ w2[e].T`` with ``[g | u] = a @ w13[e].T``
(gate rows, then up rows). The stage runs on the device without a host sync
(``moe/stage.py``): the ``(row, k)`` pairs are sorted by local expert on the device, the
received rows are gathered and decoded straight into the first GEMM's A operand, then:

- ``grouped``: two ``torch._grouped_mm`` (bf16; CUTLASS on Hopper, a per-group ``mm`` on
  CPU) around one SwiGLU kernel. Every wire format is decoded to bf16 by the gather kernel.
- ``fp8``, weights with one fp32 scale per output channel (float weights are quantized so
  at load): two rowwise fp8 GEMMs (``torch._scaled_grouped_mm``, CUDA sm90+; at decode
  sizes the small-M Triton kernel) around one SwiGLU + per-row fp8 quantization kernel.
  ``fp8`` wire rows are the A operand as they are (payload and per-row scale); every
  other format is decoded and quantized with the ``fp8`` recipe in the gather kernel (one
  read of the rows, one write of e4m3 ``[P, H]``: never a bf16 copy).
- ``fp8``, e4m3 weights with 128x128 block scales (a DeepSeek-V3 checkpoint's
  ``weight_scale_inv``, kept as they are: no bf16 copy, no requantization): DeepSeek-V3's
  own recipe, two block-scaled fp8 grouped GEMMs (``moe/block_fp8.py``, one Triton kernel
  each, the fp32 partial sum of every 128 input channels scaled by its activation and
  weight block scales) around one SwiGLU + 1x128 quantization kernel; activations carry
  one fp32 scale per 128 values (the ``fp8_block128`` recipe). ``fp8_block128`` wire rows
  are the A operand as they are; every other format is decoded and quantized per 128
  values in the gather kernel (one read of the rows, one write of e4m3 ``[P, H]``).
  ``hidden`` and ``intermediate`` must be multiples of 128. One weight block-scaled and
  the other per channel works too: each GEMM (and the quantization of its A operand)
  follows its weight's scales.
- ``loop`` / ``fp8_loop``: the oracles: one matmul pair per expert (host-side counts),
  bf16, or fp8 computed in fp32 (e4m3 products are exact in fp32; rowwise scales applied
  after the sum, block scales to each 128-channel partial sum, as the kernels do); any
  device. Without the Triton backend (CPU), ``fp8`` runs its block-scaled GEMMs as this
  oracle math; its rowwise GEMMs need CUDA (``torch._scaled_grouped_mm``).

The weighted expert outputs are added per row in fp32 in ``k`` order
(``((0 + c_0) + c_1) + ...`` over the row's local experts, ``c_k = w_k * y_k``), gathered,
deterministic on every device, and rounded once to the combine dtype.

Shape legend: ``N`` received rows, ``R`` row bytes, ``H`` hidden, ``I`` intermediate,
``L`` local experts, ``K`` top-k, ``P = N*K`` sorted pairs (the upper bound of the local
pairs), ``O`` a weight's output channels.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from moewire.formats import WireSpec
from moewire.formats.fp8 import FP8Format
from moewire.moe.block_fp8 import block_gemm, check_block_dims, scaled_mm
from moewire.moe.stage import (
    DevicePlan,
    gather_bf16,
    gather_fp8,
    grouped_gemm,
    plan_device,
    quantize_fp8_blocks,
    quantize_fp8_rows,
    swiglu_torch,
    unpermute,
)
from moewire.moe.stage import swiglu as stage_swiglu
from moewire.moe.weights import dequantize_block_weight

#: Compute paths of the local experts; ``auto`` picks ``grouped`` where torch has it.
EXPERT_IMPLS = ("auto", "loop", "grouped", "fp8", "fp8_loop")
#: Paths with e4m3 weights and activations (every wire format: ``fp8`` rows, or with
#: block-scaled weights ``fp8_block128`` rows, as they are; the others quantized by the
#: gather, per row or per 128 values).
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


@functools.lru_cache(maxsize=64)
def resolve_impl(impl: str, device: torch.device) -> str:
    """``auto`` -> ``grouped`` where ``torch._grouped_mm`` runs (CUDA sm90+, or CPU in recent
    torch), else ``loop``; other names are checked and returned unchanged. Cached: the
    layer asks on every forward, and the device capability query costs host time."""
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"experts must be one of {EXPERT_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if device.type == "cuda":
        ok = hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(device)[0] >= 9
    else:
        ok = device.type == "cpu" and _grouped_mm_runs_on_cpu()
    return "grouped" if ok else "loop"


def quantize_fp8_weight(w_LOK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel e4m3 weights: ``[L, O, K]`` -> e4m3 ``[L, O, K]``, fp32 ``[L, O]``."""
    l, o, k = w_LOK.shape
    q, s = _FP8.quantize(w_LOK.reshape(l * o, k).float())
    return q.reshape(l, o, k), s.reshape(l, o)


class LocalExperts(nn.Module):
    """The ``L`` experts this rank hosts: global ids ``[first_expert, first_expert + L)``.

    The weights are kept in the precision of the compute path, once: bf16 for ``loop`` /
    ``grouped``; for ``fp8`` / ``fp8_loop`` e4m3 with their fp32 scales, per output
    channel or per 128x128 block as given (float weights: per output channel), no bf16
    copy beside them.

    Args:
        w13_L2IH: ``[L, 2I, H]`` gate rows then up rows: float (stored as bf16, or quantized
            per output channel for the fp8 paths), or float8_e4m3fn with ``w13_scale``.
        w2_LHI: ``[L, H, I]``, the same dtypes.
        first_expert: global id of local expert 0.
        fp8: keep e4m3 weights for the fp8 paths (else bf16).
        w13_scale / w2_scale: fp32 scales of e4m3 weights: per output channel ``[L, O]``
            (dequantized weight ``q * s``) or per 128x128 block ``[L, ceil(O/128),
            ceil(K/128)]`` (DeepSeek-V3's ``weight_scale_inv``: kept as they are for the
            fp8 paths, which then need ``H`` and ``I`` multiples of 128; dequantized once
            to bf16 for the bf16 paths).
        num_experts: ``E`` of the whole layer (default ``L``): the GEMMs expect
            ``N * K / E`` rows per local expert when they pick a kernel.
    """

    def __init__(
        self,
        w13_L2IH: torch.Tensor,
        w2_LHI: torch.Tensor,
        first_expert: int,
        *,
        fp8: bool,
        w13_scale: torch.Tensor | None = None,
        w2_scale: torch.Tensor | None = None,
        num_experts: int | None = None,
    ) -> None:
        super().__init__()
        self.first_expert = first_expert
        self.num_local = w13_L2IH.shape[0]
        self.num_experts = num_experts or self.num_local
        self.fp8 = fp8
        if fp8 and any(s is not None and s.dim() == 3 for s in (w13_scale, w2_scale)):
            check_block_dims(w13_L2IH.shape[2], w13_L2IH.shape[1] // 2)
        for name, w, s in (("w13", w13_L2IH, w13_scale), ("w2", w2_LHI, w2_scale)):
            q, scale = _weight_in_precision(name, w, s, fp8=fp8)
            if fp8:
                self.register_buffer(f"{name}_fp8", q)
                self.register_buffer(f"{name}_scale", scale)
            else:
                self.register_buffer(f"{name}_{'L2IH' if name == 'w13' else 'LHI'}", q)

    @property
    def device(self) -> torch.device:
        return (self.w13_fp8 if self.fp8 else self.w13_L2IH).device

    @property
    def shape_2IH(self) -> tuple[int, int]:
        """``(2I, H)`` of the w13 weights."""
        w = self.w13_fp8 if self.fp8 else self.w13_L2IH
        return w.shape[1], w.shape[2]

    def forward(
        self,
        spec: WireSpec,
        rows_NR: torch.Tensor,
        topk_ids_NK: torch.Tensor,
        topk_weights_NK: torch.Tensor,
        impl: str,
        dtype: torch.dtype = torch.float32,
        valid: tuple[torch.Tensor, int] | None = None,
        *,
        backend: str | None = None,
    ) -> torch.Tensor:
        """Apply the local experts to received rows, without a host sync (``grouped`` and
        ``fp8``; the ``loop`` oracles read the per-expert counts on the host).

        Args:
            spec: the rows' layout (any format).
            rows_NR: uint8 ``[N, R]`` received rows.
            topk_ids_NK: ``[N, K]`` int global expert ids (ids outside this rank's range,
                invalid ones included, select no local expert).
            topk_weights_NK: ``[N, K]`` fp32 weights.
            impl: ``loop``, ``grouped``, ``fp8`` or ``fp8_loop`` (see the module docstring).
            dtype: of the result, float32 or bfloat16 (the combine dtype).
            valid: padded batches: ``(valid_W, T)``, rows ``T`` per rank of which the first
                ``valid_W[rank]`` are real tokens; the others select no expert (their
                outputs are zeros). See :func:`moewire.moe.stage.plan_device`.
            backend: of the stage's steps: ``"triton"`` (CUDA, or CPU under
                ``TRITON_INTERPRET=1``), ``"torch"``, or None (triton on CUDA).

        Returns:
            ``[N, H]`` of ``dtype``: for each row, the weighted sum of its local experts'
            outputs in ``k`` order in fp32, rounded once (zeros without a local expert).
        """
        if impl not in EXPERT_IMPLS[1:]:
            raise ValueError(f"experts must be one of {EXPERT_IMPLS[1:]}, got {impl!r}")
        if (impl in FP8_IMPLS) != self.fp8:
            raise ValueError(
                f"experts={impl!r} needs {'fp8' if impl in FP8_IMPLS else 'bf16'} weights; "
                f"these experts keep {'fp8' if self.fp8 else 'bf16'} ones"
            )
        n = rows_NR.shape[0]
        if n == 0:
            return torch.zeros((0, spec.hidden), dtype=dtype, device=rows_NR.device)
        plan = plan_device(
            topk_ids_NK, self.first_expert, self.num_local, self.num_experts, backend, valid
        )
        if impl in FP8_IMPLS:
            a_PH, scale_P = gather_fp8(spec, rows_NR, plan, backend, block=_blocks(self.w13_scale))
            if impl == "fp8":
                y_PH = _ffn_fp8(self, a_PH, scale_P, plan, backend)
            else:
                y_PH = _ffn_fp8_loop(self, a_PH, scale_P, plan)
        else:
            a_PH = gather_bf16(spec, rows_NR, plan, backend)
            y_PH = (_ffn_grouped if impl == "grouped" else _ffn_loop)(self, a_PH, plan)
        return unpermute(y_PH, plan, topk_weights_NK, dtype, backend)


def _weight_in_precision(
    name: str, w: torch.Tensor, scale: torch.Tensor | None, *, fp8: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight in the path's precision: bf16, or e4m3 with its fp32 scales (per output
    channel ``[L, O]`` or per 128x128 block ``[L, O/128, C/128]``, kept as given; float
    weights are quantized per output channel)."""
    if w.dtype == torch.float8_e4m3fn:
        s = scale.float()
        if fp8:
            return w.contiguous(), s.contiguous()
        if s.dim() == 2:  # per output channel
            return (w.float() * s[:, :, None]).to(torch.bfloat16).contiguous(), None
        return dequantize_block_weight(w, s).contiguous(), None
    if fp8:
        return quantize_fp8_weight(w)
    return w.to(torch.bfloat16).contiguous(), None


def _ffn_loop(ex: LocalExperts, a_PH: torch.Tensor, plan: DevicePlan) -> torch.Tensor:
    y_PH = torch.zeros_like(a_PH)
    for e, sl in plan.host_groups():
        h = torch.mm(a_PH[sl], ex.w13_L2IH[e].t())
        y_PH[sl] = torch.mm(swiglu_torch(h), ex.w2_LHI[e].t())
    return y_PH


def _check_gemm_dims(ex: LocalExperts, itemsize: int, what: str) -> None:
    two_i, h = ex.shape_2IH
    align = GEMM_ALIGN_BYTES // itemsize
    if h % align or (two_i // 2) % align:
        raise ValueError(
            f"experts={what!r} needs hidden and intermediate to be multiples of {align} "
            f"({GEMM_ALIGN_BYTES}-byte rows), got hidden={h}, intermediate={two_i // 2}"
        )


def _ffn_grouped(ex: LocalExperts, a_PH: torch.Tensor, plan: DevicePlan) -> torch.Tensor:
    _check_gemm_dims(ex, 2, "grouped")
    h_P2I = grouped_gemm(a_PH, ex.w13_L2IH, plan)
    a2_PI, _ = stage_swiglu(h_P2I, plan, fp8=False)
    return grouped_gemm(a2_PI, ex.w2_LHI, plan)


def _blocks(scale: torch.Tensor) -> bool:
    """Whether an fp8 weight's scales are per 128x128 block (else per output channel)."""
    return scale.dim() == 3


def _fp8_gemm(a, sa, w, sw, plan: DevicePlan, backend: str | None) -> torch.Tensor:
    if _blocks(sw):
        return block_gemm(a, sa, w, sw, plan, backend=backend)
    return grouped_gemm(a, w, plan, sa, sw, backend=backend)


def _ffn_fp8(
    ex: LocalExperts,
    a_PH: torch.Tensor,
    scale_P: torch.Tensor,
    plan: DevicePlan,
    backend: str | None,
) -> torch.Tensor:
    _check_gemm_dims(ex, 1, "fp8")
    h_P2I = _fp8_gemm(a_PH, scale_P, ex.w13_fp8, ex.w13_scale, plan, backend)
    blocks = _blocks(ex.w2_scale)
    a2_PI, s2_P = stage_swiglu(h_P2I, plan, fp8=True, block=blocks, backend=backend)
    return _fp8_gemm(a2_PI, s2_P, ex.w2_fp8, ex.w2_scale, plan, backend)


def _ffn_fp8_loop(
    ex: LocalExperts, a_PH: torch.Tensor, scale_P: torch.Tensor, plan: DevicePlan
) -> torch.Tensor:
    quantize = quantize_fp8_blocks if _blocks(ex.w2_scale) else quantize_fp8_rows
    y_PH = torch.zeros(a_PH.shape, dtype=torch.bfloat16, device=a_PH.device)
    for e, sl in plan.host_groups():
        h = scaled_mm(a_PH[sl], scale_P[sl], ex.w13_fp8[e], ex.w13_scale[e])
        a2, s2 = quantize(swiglu_torch(h.to(torch.bfloat16)))
        y_PH[sl] = scaled_mm(a2, s2, ex.w2_fp8[e], ex.w2_scale[e]).to(torch.bfloat16)
    return y_PH
