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
hook, and the whole forward; reported times are medians, slowest rank. The layer is called
with every rank's token count (``counts=``, as a serving engine knows it), so the dispatch
makes no count exchange. With ``--graph`` each case is also captured in a CUDA graph
(``moewire.graphs``), checked bitwise against the eager layer, and its replay timed.

Each token count also gets reference rows, timed in the same run (``layer_refs.py``): the
bare grouped GEMMs of both precisions on this rank's (row, expert) pairs, and the time to
read the weights of the local experts the batch hits at the measured copy bandwidth. The
cases' ``experts / bare`` and ``layer / read`` columns are read off them.
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

from moewire.bench.presets import ModelShape
from moewire.bench.routines import layer_refs
from moewire.bench.routines.comm import rank_batch
from moewire.bench.runner import BenchContext
from moewire.formats import format_class
from moewire.testing.data import sqnr_db

STAGES = ("pack", "dispatch", "experts", "combine")


class StageTimer:
    """Collects per-stage times of a layer's forward (CUDA events or perf_counter)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.pending: list[tuple[str, object, object]] = []
        self.samples: dict[str, list[float]] = defaultdict(list)
        self._free: list = []  # recorded and read events, reused (created once)

    def reserve(self, n: int) -> None:
        """Create ``n`` events up front (the driver creates an event at its first record),
        so that a stage's interval holds no event creation."""
        if self.cuda:
            for _ in range(n - len(self._free)):
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                self._free.append(ev)

    def _event(self):
        return self._free.pop() if self._free else torch.cuda.Event(enable_timing=True)

    @contextmanager
    def __call__(self, stage: str):
        if self.cuda:
            a, b = self._event(), self._event()
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
            if self.cuda:
                self._free += [a, b]
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


#: The fp8 expert cases of routines ``layer`` and ``model`` (where ``fp8_skip_reason`` is None):
#: rows quantized after the dispatch (vLLM before PR 30014) and before it.
FP8_CASES = (
    (
        "fp8 after dispatch (pre-PR-30014 path), fp8 experts",
        {"wire": "fp8", "experts": "fp8", "quantize": "after"},
    ),
    ("fp8 before dispatch, fp8 experts", {"wire": "fp8", "experts": "fp8", "quantize": "before"}),
)


def layer_cases(ctx: BenchContext) -> list[tuple[str, dict]]:
    cases = [
        ("bf16 rows, bf16 experts", {"wire": "bf16", "experts": "auto"}),
        ("nvfp4 rows, bf16 experts", {"wire": "nvfp4", "experts": "auto"}),
    ]
    if fp8_skip_reason(ctx) is None:
        cases += [
            *FP8_CASES,
            (
                "fp8 rows + fp8 experts + fp8 combine",
                {"wire": "fp8", "experts": "fp8", "quantize": "before", "combine_wire": "fp8"},
            ),
        ]
        for fmt in getattr(ctx.args, "fp8_expert_wires", None) or []:
            kw = {"wire": fmt, "experts": "fp8", "quantize": "before"}
            if fmt != "fp8":  # the fp8 rows case above
                cases.append((f"{fmt} rows, fp8 experts", kw))
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


def _ratio(a: float | None, b: float) -> float | None:
    return None if a is None or b <= 0 else a / b


def _case_record(ctx, layer, label, kw, x, logits, counts, iters, warmup) -> dict:
    """Time one case: stages and the whole forward eager (and replayed with ``--graph``)."""
    timer = StageTimer(ctx.is_cuda)
    timer.reserve(2 * len(STAGES) * (iters + warmup + 1))
    layer.stage_timer = timer
    if ctx.is_cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    # every rank's count is known, as an engine's data-parallel metadata has it: no count
    # exchange in the dispatch
    total = ctx.time(lambda m=layer, x=x, lg=logits: m(x, lg, counts=counts), iters, warmup)
    spread = ctx.spread()
    timer.flush()
    layer.stage_timer = None
    peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.is_cuda else None
    rec = {"routine": "layer", "case": label, "time_us": total * 1e6, **spread}
    for s in STAGES:
        vals = timer.samples.get(s, [])[warmup:]
        rec[f"{s}_us"] = ctx.max_over_ranks(statistics.median(vals)) * 1e6 if vals else 0.0
    rec["peak_mem_GB"] = ctx.max_over_ranks(peak) / 1e9 if peak is not None else None
    rec["replay_us"] = rec["replay_b2b_us"] = None
    if getattr(ctx.args, "graph", False) and ctx.is_cuda:
        rec["replay_us"], rec["replay_b2b_us"] = _replay_time(
            ctx, layer, x, logits, counts, iters, warmup
        )
    return rec


#: Calls per timed batch of the back-to-back replay time.
B2B_CALLS = 20
#: Seconds of back-to-back calls before the replay times (at least one batch).
WARM_S = 0.25


def _warm_up(ctx: BenchContext, batch) -> None:
    """Run ``batch`` for about :data:`WARM_S` seconds, the same number of times on every
    rank (the batch holds collectives): a GPU that has idled takes its first calls slower
    (its clocks ramp up), which a serving loop does not see."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    batch()
    torch.cuda.synchronize()
    once = time.perf_counter() - t0
    for _ in range(int(ctx.max_over_ranks(math.ceil(WARM_S / max(once, 1e-6)))) - 1):
        batch()
    torch.cuda.synchronize()


def _replay_time(ctx, layer, x, logits, counts, iters, warmup) -> tuple:
    """The layer captured at the largest count (``moewire.graphs``), checked bitwise against
    the eager layer on the same padded batch, run back to back for :data:`WARM_S` seconds,
    then timed two ways (us, slowest rank): per
    call of ``B2B_CALLS`` calls back to back (a serving loop whose host runs ahead of the
    GPU), then one call with the GPU idle before it (the host's call and launch latency
    included). ``(None, None)`` where it cannot be captured (named in the progress line)."""
    from moewire.graphs import GraphedMoE

    try:
        g = GraphedMoE(layer, max(max(counts), 1), x_dtype=x.dtype)
    except ValueError as err:
        ctx.progress(f"  no graph: {err}")
        return None, None
    y = g(x, logits, counts).clone()
    ref = layer(g.x_MH, g.logits_ME, counts=g.counts, valid_counts=g.valid_W)[: x.shape[0]]
    if not ctx.all_true(torch.equal(y.view(torch.int16), ref.view(torch.int16))):
        raise AssertionError(f"{layer}: CUDA-graph replay differs from the eager layer")

    def batch() -> None:
        for _ in range(B2B_CALLS):
            g(x, logits, counts)

    # warm first: right after the capture the GPU idles in a slower state (one H100: single
    # fp8 calls took about 160 us more then, and as little as back-to-back ones once the
    # GPU had run for a while; BENCHMARKS.md, "fourth pass")
    _warm_up(ctx, batch)
    b2b = ctx.time(batch, max(3, iters // B2B_CALLS), 1) / B2B_CALLS
    t = ctx.time(lambda: g(x, logits, counts), iters, warmup)
    return ctx.max_over_ranks(t) * 1e6, ctx.max_over_ranks(b2b) * 1e6


def _references(ctx, layer, logits, counts, bw, iters, warmup) -> tuple[dict, dict]:
    """This token count's reference figures (see ``layer_refs``) and the rows they make."""
    ids = layer_refs.received_ids(ctx, layer, logits, counts)
    ex = layer.local_experts
    pairs, hit = layer_refs.local_pairs(ids, ex.first_expert, ex.num_local)
    two_i, h = ex.shape_2IH
    bare = layer_refs.bare_gemm_times(ctx, layer, ids, iters, warmup)
    read = {p: hit * 3 * h * (two_i // 2) * n / bw for p, n in (("bf16", 2), ("fp8", 1))}
    refs = {
        "flops": layer_refs.flops(pairs, h, two_i // 2),
        "bare": {k: ctx.max_over_ranks(v) for k, v in bare.items()},
        "read": {k: ctx.max_over_ranks(v) for k, v in read.items()},
    }
    names = {"bf16": "bare bf16 grouped GEMMs + torch SwiGLU", "fp8": "bare fp8 rowwise GEMMs"}
    rows = [
        {"case": f"ref: {names[p]}", "ref_us": t * 1e6, "ref_of": "experts"}
        for p, t in refs["bare"].items()
    ]
    if hit:
        rows += [
            {"case": f"ref: {hit} experts' {p} weights read", "ref_us": t * 1e6, "ref_of": "layer"}
            for p, t in refs["read"].items()
        ]
    for r in rows:
        r.update(routine="layer", reference=True)
    return refs, rows


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
    bw = layer_refs.copy_bandwidth(ctx)
    records = []
    cases = layer_cases(ctx)
    for tokens in args.tokens:
        batch = rank_batch(ctx, shape, tokens)
        counts, x, logits, g = batch.counts, batch.x_TH, batch.logits_TE, batch.g
        base = refs = None
        outputs = {}
        for label, kw in cases:
            ctx.progress(f"layer T={tokens} {label}")
            layer = EPMoE(
                cfg,
                ctx.group,
                comm="allgather",
                routing="logits",
                global_scale=g if format_class(kw["wire"]).needs_global_scale else None,
                **kw,
            )
            layer.load_experts(w13, w2, router_bias=bias)
            if refs is None:
                refs, ref_rows = _references(ctx, layer, logits, counts, bw, iters, warmup)
            outputs[label] = layer(x, logits, counts=counts)
            rec = _case_record(ctx, layer, label, kw, x, logits, counts, iters, warmup)
            base = base or rec["time_us"]
            ref = outputs[cases[0][0]].float()
            sq = sqnr_db(ref, outputs[label].float()) if ref.numel() else math.inf
            prec = "fp8" if kw["experts"] == "fp8" else "bf16"
            ex_s = rec["experts_us"] / 1e6
            rec.update(
                baseline=label == cases[0][0],
                tokens=tokens,
                bytes_per_token=layer.spec.row_bytes,
                speedup=base / rec["time_us"],
                sqnr_vs_bf16_db=-ctx.max_over_ranks(-sq),  # the worst rank
                experts_tflops=refs["flops"] / ex_s / 1e12 if ex_s > 0 else None,
                experts_vs_bare=ex_s / refs["bare"][prec] if prec in refs["bare"] else None,
                layer_vs_read=_ratio(rec["time_us"], refs["read"][prec] * 1e6),
                replay_vs_read=_ratio(rec["replay_us"], refs["read"][prec] * 1e6),
                replay_b2b_vs_read=_ratio(rec["replay_b2b_us"], refs["read"][prec] * 1e6),
                iters=iters,
                warmup=warmup,
            )
            records.append(rec)
            del layer
        records += [dict(r, tokens=tokens) for r in ref_rows]
    return records


def render(ctx: BenchContext, recs: list[dict]) -> str:
    """The routine's timing line and table."""
    return (
        f"times: median of {recs[0]['iters']} forwards after {recs[0]['warmup']} "
        "warm-up, slowest rank; speedup vs the first case\n" + format_table(recs, ctx.is_cuda)
    )


def format_table(recs: list[dict], is_cuda: bool) -> str:
    """The layer routine's table (its legend is ``verdict.LEGENDS["layer"]``)."""
    from moewire.bench.runner import fmt_num, fmt_speedup, fmt_time, render_table

    headers = ["case", "T", *(f"{s} us" for s in STAGES), "total us (min-max)", "replay us",
               "replay b2b us", "speedup", "experts TFLOP/s", "experts / bare", "layer / read",
               "peak GB", "SQNR vs bf16 dB"]  # fmt: skip
    rows = []
    for r in recs:
        if r.get("reference"):
            us = fmt_num(r["ref_us"])
            experts, layer = (us, "") if r["ref_of"] == "experts" else ("", us)
            rows.append([r["case"], r["tokens"], "", "", experts, "", layer, "", "", "", "", "",
                         "", "", ""])  # fmt: skip
            continue
        rows.append([
            r["case"], r["tokens"], *(fmt_num(r[f"{s}_us"]) for s in STAGES), fmt_time(r),
            fmt_num(r["replay_us"]), fmt_num(r["replay_b2b_us"]), fmt_speedup(r),
            fmt_num(r["experts_tflops"], 1),
            fmt_num(r["experts_vs_bare"], 2), fmt_num(r["layer_vs_read"], 2),
            fmt_num(r["peak_mem_GB"], 2), fmt_num(r["sqnr_vs_bf16_db"], 1),
        ])  # fmt: skip
    if not is_cuda:  # peak GB is CUDA memory, replay needs CUDA graphs
        drop = {headers.index(h) for h in ("peak GB", "replay us", "replay b2b us")}
        headers = [h for i, h in enumerate(headers) if i not in drop]
        rows = [[v for i, v in enumerate(row) if i not in drop] for row in rows]
    return render_table(headers, rows)


def steps(ctx: BenchContext, shape: ModelShape) -> int:
    """Progress steps: one per case and token count."""
    return len(ctx.args.tokens) * len(layer_cases(ctx))
