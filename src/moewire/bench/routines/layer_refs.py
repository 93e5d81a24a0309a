"""Hardware references of ``moewire bench layer``, timed in the same run as the layer.

- ``bare GEMMs``: the expert stage's two grouped GEMMs alone (``torch._grouped_mm``, bf16;
  ``torch._scaled_grouped_mm``, fp8 rowwise), plus a torch SwiGLU between them, on
  operands already sorted and contiguous, with this rank's routing histogram of the batch:
  what the stage is made of, without gathering, decoding or summing.
- ``weights read``: the bytes of the local experts the batch hits over the copy bandwidth
  measured in the run: what a layer bound by reading its weights (decode) cannot beat.

Shape legend: ``T`` tokens, ``N`` rows received, ``K`` top-k, ``P = N*K`` pairs, ``L``
local experts, ``H`` hidden, ``I`` intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moewire.moe import stage
from moewire.moe.experts import quantize_fp8_weight


def copy_bandwidth(ctx, nbytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device ``copy_`` of ``nbytes`` (read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    return 2 * nbytes / ctx.time(lambda: dst.copy_(src), 10, 2)


def local_pairs(ids_NK: torch.Tensor, first: int, num_local: int) -> tuple[int, int]:
    """``(pairs that hit a local expert, local experts hit)`` (host values)."""
    local = ids_NK.flatten().long() - first
    local = local[(local >= 0) & (local < num_local)]
    return local.numel(), int(torch.unique(local).numel())


def flops(pairs: int, hidden: int, inter: int) -> float:
    """Multiply-adds x 2 of the SwiGLU FFN over ``pairs`` (row, expert) pairs."""
    return 2.0 * pairs * 3 * hidden * inter


def bare_gemm_times(ctx, layer, ids_NK: torch.Tensor, iters: int, warmup: int) -> dict:
    """Seconds of the bare grouped GEMMs on this rank's pairs: ``{"bf16": t, "fp8": t}``
    (on CUDA; fp8 only where ``torch._scaled_grouped_mm`` runs). torch's grouped GEMMs
    (``stage.grouped_gemm(..., small=False)``) on sorted contiguous operands; bf16 with a
    torch SwiGLU between them, fp8 the two GEMMs alone."""
    if not ctx.is_cuda:  # on CPU torch's grouped GEMM is a loop of mm: no reference
        return {}
    ex = layer.local_experts
    plan = stage.plan_device(ids_NK, ex.first_expert, ex.num_local)
    two_i, h = ex.shape_2IH
    dev = ids_NK.device
    a = torch.randn(plan.num_pairs, h, device=dev).to(torch.bfloat16)
    w13 = torch.randn(ex.num_local, two_i, h, device=dev).to(torch.bfloat16) * h**-0.5
    w2 = torch.randn(ex.num_local, h, two_i // 2, device=dev).to(torch.bfloat16)

    def ffn16():
        gate, up = stage.grouped_gemm(a, w13, plan, small=False).chunk(2, dim=-1)
        return stage.grouped_gemm(F.silu(gate) * up, w2, plan, small=False)

    out = {"bf16": ctx.time(ffn16, iters, warmup)}
    if torch.cuda.get_device_capability(dev)[0] >= 9:
        a8, sa = stage.quantize_fp8_rows(a)
        (w13q, s13), (w2q, s2) = quantize_fp8_weight(w13), quantize_fp8_weight(w2)
        h8 = stage.grouped_gemm(a8, w13q, plan, sa, s13, small=False)
        a2, s2a = stage.swiglu(h8, plan, fp8=True)

        def ffn8():
            stage.grouped_gemm(a8, w13q, plan, sa, s13, small=False)
            return stage.grouped_gemm(a2, w2q, plan, s2a, s2, small=False)

        out["fp8"] = ctx.time(ffn8, iters, warmup)
    return out


def received_ids(ctx, layer, logits_TE: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The expert ids of every row this rank receives with ``allgather`` (every rank's
    tokens, in rank order), routed as the layer routes them."""
    from moewire.comm._collectives import all_gather
    from moewire.moe import route

    m = max(counts)
    pad = torch.zeros((m, logits_TE.shape[1]), dtype=torch.float32, device=logits_TE.device)
    pad[: logits_TE.shape[0]] = logits_TE.float()
    out = torch.empty((ctx.world_size * m, pad.shape[1]), dtype=pad.dtype, device=pad.device)
    all_gather(out, pad, ctx.group)
    rows = torch.cat([out[r * m : r * m + c] for r, c in enumerate(counts)])
    ids, _ = route(layer.config, rows, layer.router_bias_E)
    return ids
