"""Routine ``layer`` of ``moewire bench``: the whole expert-parallel MoE layer, per stage.

Cases, the all-bf16 layer first (the baseline of the speedup column):

- ``bf16 rows, bf16 experts``: no quantization anywhere;
- ``nvfp4 rows, bf16 experts``: 4-bit rows on the wire, dequantized, bf16 grouped GEMM;
- ``fp8 rows quantized after dispatch, fp8 experts``: vLLM's path before PR 30014, on Hopper
  (bf16 rows travel, the receiver quantizes to fp8, ``quantize="after"``);
- ``fp8 rows quantized before dispatch, fp8 experts``: PR 30014's change, on Hopper;
  the fp8 GEMM consumes the wire rows directly.
- ``fp8 rows + fp8 experts + fp8 combine``: the same with the partial outputs quantized
  to fp8 for the return trip (``combine_wire="fp8"``, the combine with the best measured
  accuracy, BENCHMARKS.md "combine accuracy"); its SQNR column is its accuracy row.

The fp8 cases run only where ``torch._scaled_grouped_mm`` does (CUDA, sm90+). Each
iteration times the stages pack, dispatch, experts (routing included, and for
``quantize="after"`` the receiver's quantization) and combine through the layer's stage
hook, and the whole forward; reported times are medians, slowest rank.
Peak GPU memory per rank is ``torch.cuda.max_memory_allocated`` over the timed forwards.
All experts share one random weight set (broadcast views), so the global weights of a
DeepSeek-R1 layer are never materialized; routing is random, so the load is uneven as in
real serving.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist

from moewire.bench.comm_bench import calibrated_global_scale, rank_inputs, token_counts
from moewire.bench.data import sqnr_db
from moewire.bench.presets import ModelShape
from moewire.bench.runner import BenchContext

STAGES = ("pack", "dispatch", "experts", "combine")


class StageTimer:
    """Collects per-stage times of a layer's forward (CUDA events or perf_counter)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.pending: list[tuple[str, object, object]] = []
        self.samples: dict[str, list[float]] = defaultdict(list)

    @contextmanager
    def __call__(self, stage: str):
        if self.cuda:
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            yield
            b.record()
            self.pending.append((stage, a, b))
        else:
            t0 = time.perf_counter()
            yield
            self.pending.append((stage, t0, time.perf_counter()))

    def flush(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        for stage, a, b in self.pending:
            dt = a.elapsed_time(b) / 1e3 if self.cuda else b - a
            self.samples[stage].append(dt)
        self.pending.clear()


def fp8_skip_reason(ctx: BenchContext) -> str | None:
    """Why the fp8 cases do not run here (None where they do)."""
    if not ctx.is_cuda:
        return "fp8 cases skipped: torch._scaled_grouped_mm needs CUDA sm90+ (running on CPU)"
    major, minor = torch.cuda.get_device_capability(ctx.device)
    if major < 9:
        return (
            f"fp8 cases skipped: torch._scaled_grouped_mm needs sm90+, this GPU is sm{major}{minor}"
        )
    return None


def layer_cases(ctx: BenchContext) -> list[tuple[str, dict]]:
    cases = [
        ("bf16 rows, bf16 experts", {"wire": "bf16", "experts": "auto"}),
        ("nvfp4 rows, bf16 experts", {"wire": "nvfp4", "experts": "auto"}),
    ]
    if fp8_skip_reason(ctx) is None:
        cases += [
            (
                "fp8 after dispatch (pre-PR-30014 path), fp8 experts",
                {"wire": "fp8", "experts": "fp8", "quantize": "after"},
            ),
            (
                "fp8 before dispatch, fp8 experts",
                {"wire": "fp8", "experts": "fp8", "quantize": "before"},
            ),
            (
                "fp8 rows + fp8 experts + fp8 combine",
                {"wire": "fp8", "experts": "fp8", "quantize": "before", "combine_wire": "fp8"},
            ),
        ]
    return cases


def layer_config(shape: ModelShape):
    """The :class:`moewire.MoEConfig` of a shape preset (validated)."""
    from moewire.moe import MoEConfig

    group_kw = {}
    if shape.router == "deepseek_v3":
        group_kw = {
            "n_group": shape.n_group,
            "topk_group": shape.topk_group,
            "routed_scaling_factor": shape.routed_scaling_factor,
        }
    return MoEConfig(
        shape.hidden,
        shape.intermediate,
        shape.num_experts,
        shape.top_k,
        router=shape.router,
        renormalize=shape.renormalize,
        **group_kw,
    )


def run_layer(ctx: BenchContext, shape: ModelShape) -> list[dict]:
    from moewire.moe import EPMoE

    args = ctx.args
    cfg = layer_config(shape)
    gen = torch.Generator().manual_seed(args.seed)
    h, i, e = shape.hidden, shape.intermediate, shape.num_experts
    w13 = (torch.randn(1, 2 * i, h, generator=gen) / h**0.5).to(torch.bfloat16).to(ctx.device)
    w2 = (torch.randn(1, h, i, generator=gen) / i**0.5).to(torch.bfloat16).to(ctx.device)
    w13, w2 = w13.expand(e, 2 * i, h), w2.expand(e, h, i)
    bias = torch.zeros(e, device=ctx.device) if shape.router == "deepseek_v3" else None
    iters = max(3, args.iters // (1 if ctx.is_cuda else 4))
    warmup = max(1, args.warmup // (1 if ctx.is_cuda else 3))
    records = []
    cases = layer_cases(ctx)
    for tokens in args.tokens:
        counts = token_counts(tokens, ctx.world_size, args.skew)
        x, logits = rank_inputs(shape, counts[ctx.rank], ctx.rank, args.seed, ctx.device)
        g = calibrated_global_scale(ctx, x)
        base = None
        outputs = {}
        for label, kw in cases:
            ctx.progress(f"layer T={tokens} {label}")
            layer = EPMoE(
                cfg,
                ctx.group,
                comm="allgather",
                routing="logits",
                global_scale=g if kw["wire"] == "nvfp4" else None,
                **kw,
            )
            layer.load_experts(w13, w2, router_bias=bias)
            outputs[label] = layer(x, logits)
            timer = StageTimer(ctx.is_cuda)
            layer.stage_timer = timer
            if ctx.is_cuda:
                torch.cuda.reset_peak_memory_stats(ctx.device)
            total = ctx.time(lambda m=layer, x=x, lg=logits: m(x, lg), iters, warmup)
            spread = ctx.spread()
            timer.flush()
            peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.is_cuda else None
            layer.stage_timer = None
            stages = {}
            for s in STAGES:
                vals = timer.samples.get(s, [])[warmup:]
                stages[s] = ctx.max_over_ranks(statistics.median(vals)) if vals else 0.0
            if base is None:
                base = total
            peak_max = None
            if peak is not None:
                pt = torch.tensor([peak], device=ctx.device, dtype=torch.float64)
                dist.all_reduce(pt, op=dist.ReduceOp.MAX, group=ctx.group)
                peak_max = float(pt.item())
            ref = outputs[cases[0][0]].float()
            sq = sqnr_db(ref, outputs[label].float()) if ref.numel() else math.inf
            sq = -ctx.max_over_ranks(-sq)  # the worst rank
            records.append(
                {
                    "routine": "layer",
                    "case": label,
                    "baseline": label == cases[0][0],
                    "tokens": tokens,
                    "bytes_per_token": layer.spec.row_bytes,
                    **{f"{s}_us": stages[s] * 1e6 for s in STAGES},
                    "time_us": total * 1e6,
                    **spread,
                    "speedup": base / total,
                    "peak_mem_GB": peak_max / 1e9 if peak_max is not None else None,
                    "sqnr_vs_bf16_db": sq,
                    "iters": iters,
                    "warmup": warmup,
                }
            )
            del layer
    return records
