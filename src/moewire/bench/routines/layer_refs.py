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
    (on CUDA; fp8 only where ``torch._scaled_grouped_mm`` runs)."""
    ex = layer.local_experts
    plan = stage.plan_device(ids_NK, ex.first_expert, ex.num_local)
    two_i, h = ex.shape_2IH
    p, dev = plan.num_pairs, ids_NK.device
    a = torch.randn(p, h, device=dev).to(torch.bfloat16)
    w13 = torch.randn(ex.num_local, two_i, h, device=dev).to(torch.bfloat16) * h**-0.5
    w2 = torch.randn(ex.num_local, h, two_i // 2, device=dev).to(torch.bfloat16)
    offs = plan.offsets_L

    def ffn16():
        gate, up = torch._grouped_mm(a, w13.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=offs)

    if not ctx.is_cuda:  # on CPU torch's grouped GEMM is a loop of mm: no reference
        return {}
    out = {"bf16": ctx.time(ffn16, iters, warmup)}
    if torch.cuda.get_device_capability(dev)[0] >= 9:
        from moewire.formats.fp8 import FP8Format

        q = FP8Format()
        a8, sa = q.quantize(a.float())
        w13q, s13 = q.quantize(w13.reshape(-1, h).float())
        w2q, s2 = q.quantize(w2.reshape(-1, two_i // 2).float())
        w13q, w2q = w13q.reshape(w13.shape), w2q.reshape(w2.shape)
        s13, s2, sa = s13.reshape(ex.num_local, -1), s2.reshape(ex.num_local, -1), sa.flatten()
        h8 = torch._scaled_grouped_mm(
            a8, w13q.transpose(-2, -1), sa, s13, offs=offs, out_dtype=torch.bfloat16
        )
        a2, s2a = stage.swiglu(h8, plan, fp8=True)

        def ffn8():
            torch._scaled_grouped_mm(
                a8, w13q.transpose(-2, -1), sa, s13, offs=offs, out_dtype=torch.bfloat16
            )
            return torch._scaled_grouped_mm(
                a2, w2q.transpose(-2, -1), s2a, s2, offs=offs, out_dtype=torch.bfloat16
            )

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
