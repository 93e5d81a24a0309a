"""The distributed parts of ``moewire check``, run on every rank of an initialized group.

Every rank regenerates every other rank's inputs from one seed that rank 0 draws fresh and
broadcasts, so each rank can build the exact expected result locally.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moewire.formats import FORMATS, WireSpec, format_class, nvfp4_global_scale
from moewire.testing.data import heavy_tailed
from moewire.testing.reference import dispatch_reference

F32 = torch.float32

HIDDEN, INTER, EXPERTS, TOP_K = 256, 64, 8, 2


def _shared_seed() -> int:
    box = [int(torch.randint(0, 2**31 - 1, ()).item())]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _inputs(seed: int, rank: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 7919 * rank)
    x = (heavy_tailed(t, HIDDEN, generator=gen) * 2).to(torch.bfloat16)
    return x, torch.randn(t, EXPERTS, generator=gen)


def _nan_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def _invariance(seed: int) -> str:
    from moewire.comm import make_comm
    from moewire.moe.config import MoEConfig
    from moewire.moe.routing import route

    rank, world = dist.get_rank(), dist.get_world_size()
    counts = [(seed + 3 * r) % 9 for r in range(world)]  # uneven, may be zero
    cfg = MoEConfig(HIDDEN, INTER, EXPERTS, TOP_K)
    inputs = [_inputs(seed, r, counts[r]) for r in range(world)]
    ids = [route(cfg, lg)[0] for _, lg in inputs]
    n = 0
    for fmt in FORMATS:
        g = nvfp4_global_scale(32.0) if format_class(fmt).needs_global_scale else None
        spec = WireSpec(
            fmt, HIDDEN, global_scale=g, extras={"router_logits": (torch.float32, EXPERTS)}
        )
        for backend in ("allgather", "alltoall", "grouped"):
            comm = make_comm(backend, None, num_experts=EXPERTS, spec=spec)
            x, lg = inputs[rank]
            recv, _ = comm.dispatch(spec.pack(x, router_logits=lg), ids[rank])
            want = dispatch_reference(  # pack(allgather(x))
                spec,
                [(xr, {"router_logits": lr}) for xr, lr in inputs],
                backend,
                rank=rank,
                ids=ids,
                num_experts=EXPERTS,
            )
            if not torch.equal(recv, want):
                raise AssertionError(f"{fmt}/{backend}: received rows differ from pack(gather(x))")
            if not _nan_equal(
                spec.dequantize(recv, torch.float32), spec.dequantize(want, torch.float32)
            ):
                raise AssertionError(f"{fmt}/{backend}: dequantized values differ")
            n += 1
    return f"{n} format x backend cases bitwise, counts {counts}"


def _layer(seed: int) -> str:
    from moewire.moe import EPMoE, MoEConfig

    rank, world = dist.get_rank(), dist.get_world_size()
    counts = [5 + (seed + r) % 7 for r in range(world)]
    cfg = MoEConfig(HIDDEN, INTER, EXPERTS, TOP_K)
    gen = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5).to(torch.bfloat16)
    w2 = (torch.randn(EXPERTS, HIDDEN, INTER, generator=gen) / INTER**0.5).to(torch.bfloat16)
    inputs = [_inputs(seed, r, counts[r]) for r in range(world)]
    x_all = torch.cat([x for x, _ in inputs])
    l_all = torch.cat([lg for _, lg in inputs])
    start = sum(counts[:rank])
    worst = 0.0
    n = 0
    for wire in ("bf16", "fp8", "nvfp4", "mxfp4"):
        g = nvfp4_global_scale(32.0) if format_class(wire).needs_global_scale else None
        ref = EPMoE(cfg, None, wire=wire, comm="local", global_scale=g, combine_dtype=F32)
        ref.load_experts(w13, w2)
        y_ref = ref(x_all, l_all)[start : start + counts[rank]].float()
        for comm in ("allgather", "alltoall", "grouped"):
            outs = []
            for quantize in ("before", "after"):
                layer = EPMoE(
                    cfg,
                    None,
                    wire=wire,
                    comm=comm,
                    global_scale=g,
                    quantize=quantize,
                    combine_dtype=F32,
                )
                layer.load_experts(w13, w2)
                outs.append(layer(*inputs[rank]))
            if not torch.equal(outs[0], outs[1]):
                raise AssertionError(f"{wire}/{comm}: quantize='before' != 'after'")
            y = outs[0].float()
            # The sharded sum differs from the unsharded one only in the association of the
            # K fp32 terms per token (then one bf16 rounding of the output): bound it by
            # 2 bf16 ulps of the output's magnitude.
            tol = 2 * 2.0**-8 * (y_ref.abs() + 1e-3)
            if not bool(((y - y_ref).abs() <= tol).all()):
                err = float(((y - y_ref).abs() / (y_ref.abs() + 1e-3)).max())
                raise AssertionError(f"{wire}/{comm}: sharded != unsharded (rel err {err:.2e})")
            worst = max(worst, float(((y - y_ref).abs()).max()))
            n += 1
    return f"{n} wire x comm cases; before == after bitwise; max |sharded - unsharded| {worst:.2e}"


def run_dist_check(what: str) -> str:
    return {"invariance": _invariance, "layer": _layer}[what](_shared_seed())
