"""Routine ``dispatch`` of ``moewire bench``, and the inputs it shares with ``combine``
(``combine.py``) and ``layer``.

``dispatch`` times pack (quantization included) + dispatch, side by side, each dispatch
given every rank's token count (``counts=``, as a serving engine knows them; one more case
exchanges them instead, to show what that costs), for:
the baseline (bf16 activations + fp32 router logits, one collective per tensor, as vLLM
did before its PR 30014:
``grouped``), bf16 rows in one collective, and every quantized format in both routing
modes over each backend.

Before timing, every case is checked bitwise: each rank regenerates every other rank's
tokens from the shared seed and compares the received rows with the rows it expects
(all ranks' rows in rank order for ``allgather``/``grouped``; for ``alltoall`` the rows of
the tokens with at least one expert on this rank).

Shape legend: ``T`` tokens on a rank, ``N`` rows received, ``H`` hidden, ``E`` experts,
``K`` top-k, ``R`` row bytes, ``W`` world size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moewire.bench.presets import ModelShape
from moewire.bench.runner import BenchContext
from moewire.formats import WireSpec, format_class, nvfp4_global_scale
from moewire.moe.routing import routing_extras as _routing_extras
from moewire.testing.data import heavy_tailed, sqnr_db
from moewire.testing.reference import dispatch_reference

#: The baseline, vLLM before its PR 30014: bf16 + fp32 logits, one collective per tensor.
BASELINE = ("bf16", "logits", "grouped")


@dataclass(frozen=True)
class Case:
    fmt: str
    routing: str
    backend: str
    #: every rank's token count passed to dispatch (as a serving engine knows them); False:
    #: the dispatch exchanges the counts itself
    counts: bool = True

    @property
    def label(self) -> str:
        tail = "" if self.counts else ", count exchange"
        if (self.fmt, self.routing, self.backend) == BASELINE:
            return "baseline: bf16+logits, one collective per tensor" + tail
        return f"{self.fmt}+{self.routing}, {self.backend}{tail}"


def token_counts(tokens: int, world_size: int, skew: str) -> list[int]:
    """Tokens per rank: ``tokens`` each (``even``), or the same total split 1:2:...:W
    (``skewed``; rank 0 smallest)."""
    if skew == "even":
        return [tokens] * world_size
    total = tokens * world_size
    w = list(range(1, world_size + 1))
    counts = [total * wi // sum(w) for wi in w]
    counts[-1] += total - sum(counts)
    return counts


@functools.lru_cache(maxsize=16)
def rank_inputs(
    shape: ModelShape, t: int, rank: int, seed: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s tokens ``x [t, H]`` bf16 and router logits ``[t, E]`` fp32,
    reproducible on every rank from ``(seed, rank, t)``. Cached (the correctness checks
    regenerate every rank's inputs for every case): callers must not modify them."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rank * 7919 + t)
    x = heavy_tailed(t, shape.hidden, generator=gen).to(torch.bfloat16)
    logits = torch.randn(t, shape.num_experts, generator=gen)
    return x.to(device), logits.to(device)


def topk_of(logits_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k expert ids (int32) and softmax weights (fp32) of router logits."""
    w, ids = torch.topk(torch.softmax(logits_TE.float(), dim=-1), k, dim=-1)
    return ids.to(torch.int32), w / w.sum(-1, keepdim=True)


def routing_extras(mode: str, shape: ModelShape) -> dict[str, tuple[torch.dtype, int]]:
    return _routing_extras(mode, shape.num_experts, shape.top_k)


def make_spec(fmt: str, mode: str, shape: ModelShape, g: float) -> WireSpec:
    return WireSpec(
        fmt,
        shape.hidden,
        global_scale=g if format_class(fmt).needs_global_scale else None,
        extras=routing_extras(mode, shape),
    )


def extras_for(mode: str, logits_TE: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    if mode == "logits":
        return {"router_logits": logits_TE}
    ids, w = topk_of(logits_TE, k)
    return {"topk_ids": ids, "topk_weights": w}


def calibrated_global_scale(ctx: BenchContext, x_TH: torch.Tensor) -> float:
    """The nvfp4 global scale calibrated on this data: ``448*6 / amax`` with ``amax`` the
    largest magnitude on any rank, so every rank uses the same scale."""
    local = float(x_TH.abs().max()) if x_TH.numel() else 0.0
    return nvfp4_global_scale(max(ctx.max_over_ranks(local), 1e-6))


@dataclass(frozen=True)
class Batch:
    """One token count's inputs on this rank (routines ``dispatch`` and ``layer``)."""

    tokens: int  # per rank, before ``--skew``
    counts: list[int]  # every rank's token count
    x_TH: torch.Tensor
    logits_TE: torch.Tensor
    g: float  # the nvfp4 global scale, calibrated on every rank's tokens


def rank_batch(ctx: BenchContext, shape: ModelShape, tokens: int) -> Batch:
    """This rank's :class:`Batch` at ``tokens`` per rank (``--skew`` splits them)."""
    counts = token_counts(tokens, ctx.world_size, ctx.args.skew)
    x, logits = rank_inputs(shape, counts[ctx.rank], ctx.rank, ctx.args.seed, ctx.device)
    return Batch(tokens, counts, x, logits, calibrated_global_scale(ctx, x))


def cases_for(args, shape: ModelShape) -> list[Case]:
    """The baseline first, then bf16 rows in one collective, then each quantized format in
    each routing mode over each backend (and nvfp4 over ``grouped``, PR 30014's own way)."""
    cases = [Case(*BASELINE), Case("bf16", "logits", "allgather")]
    for fmt in args.formats:
        if shape.hidden % format_class(fmt).block:
            continue
        for mode in args.routing:
            for backend in args.backends:
                c = Case(fmt, mode, backend)
                if c not in cases:
                    cases.append(c)
    nvfp4_ok = shape.hidden % format_class("nvfp4").block == 0
    if "nvfp4" in args.formats and nvfp4_ok and Case("nvfp4", "logits", "grouped") not in cases:
        cases.append(Case("nvfp4", "logits", "grouped"))
    # what the counts save: the first quantized allgather case once more, exchanging them
    first = next((c for c in cases[2:] if c.backend == "allgather"), None)
    if first is not None:
        cases.append(Case(first.fmt, first.routing, first.backend, counts=False))
    return cases


def expected_recv(
    ctx: BenchContext, case: Case, spec: WireSpec, shape, counts, seed
) -> torch.Tensor:
    """The rows this rank must receive, built locally from every rank's regenerated tokens."""
    inputs = [rank_inputs(shape, t, src, seed, ctx.device) for src, t in enumerate(counts)]
    return dispatch_reference(
        spec,
        [(x, extras_for(case.routing, logits, shape.top_k)) for x, logits in inputs],
        case.backend,
        rank=ctx.rank,
        ids=[topk_of(logits, shape.top_k)[0] for _, logits in inputs],
        num_experts=shape.num_experts,
    )


def nccl_allgather_time(ctx: BenchContext, nbytes_per_rank: int) -> float:
    """Time of the process group's own all-gather of a plain uint8 tensor of this size."""
    inp = torch.zeros(nbytes_per_rank, dtype=torch.uint8, device=ctx.device)
    out = torch.empty(nbytes_per_rank * ctx.world_size, dtype=torch.uint8, device=ctx.device)
    fn = getattr(dist, "all_gather_into_tensor", None)

    def run():
        if fn is not None and ctx.is_cuda:
            fn(out, inp, group=ctx.group)
        else:
            dist.all_gather(list(out.chunk(ctx.world_size)), inp, group=ctx.group)

    return ctx.time(run, ctx.args.iters, ctx.args.warmup)


def run_dispatch(ctx: BenchContext, shape: ModelShape) -> list[dict]:
    args = ctx.args
    records = []
    ref_cache: dict[int, float] = {}  # bytes per rank -> the group's own all-gather time
    for tokens in args.tokens:
        batch = rank_batch(ctx, shape, tokens)
        base_time = None
        for case in cases_for(args, shape):
            ctx.progress(f"dispatch T={tokens} {case.label}")
            rec, t = _dispatch_case(ctx, case, shape, batch, ref_cache)
            if case == Case(*BASELINE):
                base_time = t
            records.append({**rec, "speedup": base_time / t if base_time else None})
    return records


def _dispatch_case(
    ctx: BenchContext, case: Case, shape: ModelShape, batch: Batch, ref_cache: dict
) -> tuple[dict, float]:
    """One case, checked bitwise against the rows every rank must receive, then timed: its
    record (all but the speedup) and its time in seconds."""
    from moewire.comm import make_comm

    args, x, counts = ctx.args, batch.x_TH, batch.counts
    spec = make_spec(case.fmt, case.routing, shape, batch.g)
    comm = make_comm(case.backend, ctx.group, num_experts=shape.num_experts, spec=spec)
    extras = extras_for(case.routing, batch.logits_TE, shape.top_k)
    ids, _ = topk_of(batch.logits_TE, shape.top_k)
    kw = {"counts": counts} if case.counts else {}

    def step():
        return comm.dispatch(spec.pack(x, **extras), ids, **kw)

    recv, _ = step()
    want = expected_recv(ctx, case, spec, shape, counts, args.seed)
    ok = recv.shape == want.shape and torch.equal(recv, want)
    if not ctx.all_true(ok):
        raise RuntimeError(
            f"dispatch {case.label} T={batch.tokens}: received rows differ from the "
            "senders' bytes on some rank; not timing a wrong result"
        )
    t = ctx.time(step, args.iters, args.warmup)
    spread = ctx.spread()
    rows = spec.pack(x, **extras)  # the collective's share alone: rows packed beforehand
    t_comm = ctx.time(lambda: comm.dispatch(rows, ids, **kw), args.iters, args.warmup)
    wire_bytes, bandwidth = _wire_figures(ctx, case, spec, counts, recv.shape[0], t, ref_cache)
    q = spec.dequantize(rows, torch.float32)
    rec = {
        "routine": "dispatch",
        "case": case.label,
        "format": case.fmt,
        "routing": case.routing,
        "backend": case.backend,
        "baseline": case == Case(*BASELINE),
        "tokens": batch.tokens,
        "counts": "/".join(map(str, counts)),
        "counts_given": case.counts,
        "bytes_per_token": spec.row_bytes,
        "wire_bytes": wire_bytes,
        "time_us": t * 1e6,
        **spread,
        "dispatch_only_us": t_comm * 1e6,
        **bandwidth,
        "sqnr_db": sqnr_db(x.float(), q) if x.shape[0] else None,
    }
    return rec, t


def _wire_figures(
    ctx: BenchContext,
    case: Case,
    spec: WireSpec,
    counts: list[int],
    n_recv: int,
    t: float,
    ref_cache: dict,
) -> tuple[int, dict]:
    """Bytes on the wire (alltoall: the largest receive) and the record's bandwidth fields:
    bus bandwidth, and the group's own all-gather of the same bytes (not for alltoall)."""
    n_rows = torch.tensor([n_recv], device=ctx.device)
    dist.all_reduce(n_rows, op=dist.ReduceOp.MAX, group=ctx.group)
    if case.backend == "alltoall":
        wire_bytes = int(n_rows.item()) * spec.row_bytes  # largest per-rank receive
    else:
        wire_bytes = max(counts) * ctx.world_size * spec.row_bytes
    busbw = wire_bytes * (ctx.world_size - 1) / ctx.world_size / t
    per_rank = max(counts) * spec.row_bytes
    if case.backend != "alltoall" and per_rank not in ref_cache:
        ref_cache[per_rank] = nccl_allgather_time(ctx, per_rank)
    ref_t = ref_cache.get(per_rank) if case.backend != "alltoall" else None
    ref_bw = wire_bytes * (ctx.world_size - 1) / ctx.world_size / ref_t if ref_t else None
    return wire_bytes, {
        "busbw_GBps": busbw / 1e9,
        "ref_allgather_busbw_GBps": ref_bw / 1e9 if ref_bw else None,
        "ref_allgather_us": ref_t * 1e6 if ref_t else None,
        "frac_of_ref": ref_t / t if ref_t else None,
    }


def render(ctx: BenchContext, recs: list[dict]) -> str:
    """The dispatch or the combine table (the routine of ``recs``)."""
    from moewire.bench.runner import fmt_num, fmt_speedup, fmt_time, render_table

    dispatch = recs[0]["routine"] == "dispatch"
    headers = ["case", "T/rank", "B/token", "time us (min-max)", "bus GB/s"]
    if dispatch:
        headers += ["% of all-gather", "dispatch only us", "/ all-gather", "SQNR dB"]
    rows = []
    for r in recs:
        row = [r["case"], r["tokens"], r["bytes_per_token"], fmt_time(r)]
        row += [fmt_num(r["busbw_GBps"], 2)]
        if dispatch:
            frac, ref = r.get("frac_of_ref"), r.get("ref_allgather_us")
            only = r.get("dispatch_only_us")
            vs_ref = f"{only / ref:.2f}x" if only and ref else "-"
            row += [fmt_num(100 * frac, 0) if frac else "-", fmt_num(only, 1), vs_ref]
            row += [fmt_num(r["sqnr_db"], 1)]
        rows.append([*row, fmt_speedup(r)])
    return render_table([*headers, "speedup"], rows)


def steps(ctx: BenchContext, shape: ModelShape) -> int:
    """Progress steps: one per case and token count."""
    return len(ctx.args.tokens) * len(cases_for(ctx.args, shape))
