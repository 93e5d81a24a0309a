"""Routines ``dispatch`` and ``combine`` of ``moewire bench``.

``dispatch`` times pack (quantization included) + dispatch, side by side, each dispatch
given every rank's token count (``counts=``, as a serving engine knows them; one more case
exchanges them instead, to show what that costs), for:
the baseline (bf16 activations + fp32 router logits, one collective per tensor, as vLLM
did before its PR 30014:
``grouped``), bf16 rows in one collective, and every quantized format in both routing
modes over each backend. ``combine`` times the return trip: bf16/fp32 partial rows (the
bf16 reduce-scatter first, the baseline) and each quantized ``combine_wire`` over
allgather and alltoall.

Before timing, every case is checked bitwise: each rank regenerates every other rank's
tokens from the shared seed and compares the received rows with the rows it expects
(all ranks' rows in rank order for ``allgather``/``grouped``; for ``alltoall`` the rows of
the tokens with at least one expert on this rank). Combine is checked exactly with
integer-valued partial rows.

Shape legend: ``T`` tokens on a rank, ``N`` rows received, ``H`` hidden, ``E`` experts,
``K`` top-k, ``R`` row bytes, ``W`` world size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from moewire.bench.presets import ModelShape
from moewire.bench.runner import BenchContext
from moewire.comm.combine_wire import COMBINE_WIRES
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
        global_scale=g if fmt == "nvfp4" else None,
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
    from moewire.comm import make_comm

    args = ctx.args
    records = []
    ref_cache: dict[int, float] = {}
    for tokens in args.tokens:
        counts = token_counts(tokens, ctx.world_size, args.skew)
        x, logits = rank_inputs(shape, counts[ctx.rank], ctx.rank, args.seed, ctx.device)
        g = calibrated_global_scale(ctx, x)
        ids, _ = topk_of(logits, shape.top_k)
        base_time = None
        for case in cases_for(args, shape):
            ctx.progress(f"dispatch T={tokens} {case.label}")
            spec = make_spec(case.fmt, case.routing, shape, g)
            comm = make_comm(case.backend, ctx.group, num_experts=shape.num_experts, spec=spec)
            extras = extras_for(case.routing, logits, shape.top_k)

            kw = {"counts": counts} if case.counts else {}

            def step(spec=spec, comm=comm, extras=extras, x=x, ids=ids, kw=kw):
                return comm.dispatch(spec.pack(x, **extras), ids, **kw)

            recv, _ = step()
            want = expected_recv(ctx, case, spec, shape, counts, args.seed)
            ok = recv.shape == want.shape and torch.equal(recv, want)
            if not ctx.all_true(ok):
                raise RuntimeError(
                    f"dispatch {case.label} T={tokens}: received rows differ from the "
                    "senders' bytes on some rank; not timing a wrong result"
                )
            t = ctx.time(step, args.iters, args.warmup)
            spread = ctx.spread()
            if case == Case(*BASELINE):
                base_time = t
            n_rows = torch.tensor([recv.shape[0]], device=ctx.device)
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
            ref_us = ref_t * 1e6 if ref_t else None
            q = spec.dequantize(spec.pack(x, **extras), torch.float32)
            records.append(
                {
                    "routine": "dispatch",
                    "case": case.label,
                    "format": case.fmt,
                    "routing": case.routing,
                    "backend": case.backend,
                    "baseline": case == Case(*BASELINE),
                    "tokens": tokens,
                    "counts": "/".join(map(str, counts)),
                    "counts_given": case.counts,
                    "bytes_per_token": spec.row_bytes,
                    "wire_bytes": wire_bytes,
                    "time_us": t * 1e6,
                    **spread,
                    "busbw_GBps": busbw / 1e9,
                    "ref_allgather_busbw_GBps": ref_bw / 1e9 if ref_bw else None,
                    "ref_allgather_us": ref_us,
                    "frac_of_ref": ref_t / t if ref_t else None,
                    "sqnr_db": sqnr_db(x.float(), q) if x.shape[0] else None,
                    "speedup": base_time / t if base_time else None,
                }
            )
    return records


def combine_partials(rank: int, n_rows: int, hidden: int, seed: int) -> torch.Tensor:
    """Rank ``rank``'s integer-valued partial rows ``[n_rows, H]`` (int64, in -4..4): every
    sum of a few of them is exact in bf16 and fp32, whatever the order."""
    gen = torch.Generator().manual_seed(seed * 31 + rank)
    return torch.randint(-4, 5, (n_rows, hidden), generator=gen)


def expected_combine(
    ctx: BenchContext, backend: str, shape: ModelShape, counts: list[int], seed: int
) -> torch.Tensor:
    """What combine must return on this rank, from every rank's regenerated partials:
    for each of this rank's tokens, the sum of the partial rows that belong to it."""
    out = torch.zeros(counts[ctx.rank], shape.hidden, dtype=torch.int64)
    for s, n_s, offset, mine in _partial_slices(ctx, backend, shape, counts, seed):
        partial = combine_partials(s, n_s, shape.hidden, seed)
        out[mine] += partial[offset : offset + len(mine)]
    return out


def _partial_slices(
    ctx: BenchContext, backend: str, shape: ModelShape, counts: list[int], seed: int
):
    """For each source rank ``s``: ``(s, N_s, offset, mine)``, where rank ``s`` received
    ``N_s`` rows and this rank's tokens ``mine`` are its rows ``[offset, offset+len(mine))``
    (every token for allgather; those with an expert on ``s`` for alltoall)."""
    w, me = ctx.world_size, ctx.rank
    ids = [
        topk_of(rank_inputs(shape, counts[q], q, seed, "cpu")[1], shape.top_k)[0] for q in range(w)
    ]
    for s in range(w):
        if backend == "alltoall":
            lo, hi = s * shape.num_experts // w, (s + 1) * shape.num_experts // w
            hits = [((i >= lo) & (i < hi)).any(-1) for i in ids]
            n_s = sum(int(h.sum()) for h in hits)
            offset = sum(int(h.sum()) for h in hits[:me])
            mine = hits[me].nonzero().flatten()
        else:
            n_s, offset = sum(counts), sum(counts[:me])
            mine = torch.arange(counts[me])
        yield s, n_s, offset, mine


#: On CPU the quantized combines run the torch reference codec (slow, and not what the GPU
#: figures are about), so ``moewire bench`` times them only up to this many tokens per rank.
CPU_QUANTIZED_COMBINE_MAX_TOKENS = 128


def combine_cases(
    args, tokens: int = 0, is_cuda: bool = True
) -> list[tuple[str, str, torch.dtype]]:
    """``(backend, combine_wire, partial dtype)``: the bf16 reduce-scatter first (the
    baseline), the other unquantized cases, then each quantized ``--combine-wires`` entry
    (fp32 partials, EPMoE's default) over allgather and alltoall (on CPU only up to
    :data:`CPU_QUANTIZED_COMBINE_MAX_TOKENS` tokens per rank)."""
    cases = [
        ("allgather", "bf16", torch.bfloat16),
        ("allgather", "bf16", torch.float32),
        ("alltoall", "bf16", torch.bfloat16),
        ("alltoall", "bf16", torch.float32),
    ]
    wires = getattr(args, "combine_wires", None) or COMBINE_WIRES
    if not is_cuda and tokens > CPU_QUANTIZED_COMBINE_MAX_TOKENS:
        wires = ()
    for wire in wires:
        if wire != "bf16":
            cases += [("allgather", wire, torch.float32), ("alltoall", wire, torch.float32)]
    return cases


def _combine_label(i: int, backend: str, wire: str, dtype: torch.dtype) -> str:
    if i == 0:
        return "baseline: bf16 reduce-scatter (allgather)"
    if wire == "bf16":
        return f"{str(dtype).removeprefix('torch.')} partials, {backend}"
    return f"{wire} combine rows, {backend}"


def run_combine(ctx: BenchContext, shape: ModelShape) -> list[dict]:
    """Times the return trip. Unquantized cases are checked exactly with integer-valued
    partials; quantized ones bitwise against the reference codec on CPU: every rank
    regenerates every rank's partial rows, quantizes each source's rows for its tokens with
    the torch codec, dequantizes and adds in fp32 in rank order."""
    from moewire.comm import make_comm
    from moewire.comm.combine_wire import combine_codec

    args = ctx.args
    records = []
    for tokens in args.tokens:
        counts = token_counts(tokens, ctx.world_size, args.skew)
        _, logits = rank_inputs(shape, counts[ctx.rank], ctx.rank, args.seed, ctx.device)
        ids, _ = topk_of(logits.cpu(), shape.top_k)
        ids = ids.to(ctx.device)
        base_time = None
        spec = WireSpec("bf16", shape.hidden)
        want_int = {}
        for i, (backend, wire, dtype) in enumerate(combine_cases(args, tokens, ctx.is_cuda)):
            label = _combine_label(i, backend, wire, dtype)
            ctx.progress(f"combine T={tokens} {label}")
            comm = make_comm(
                backend, ctx.group, num_experts=shape.num_experts, spec=spec, combine_wire=wire
            )
            rows = torch.zeros(
                counts[ctx.rank], spec.row_bytes, dtype=torch.uint8, device=ctx.device
            )
            recv, handle = comm.dispatch(rows, ids)
            partial = combine_partials(ctx.rank, recv.shape[0], shape.hidden, args.seed)
            if wire != "bf16":  # non-integer values, so the codec's rounding shows
                partial = partial * 0.37 + 0.01
            partial = partial.to(dtype).to(ctx.device)
            out = comm.combine(partial, handle)
            if wire == "bf16":
                if backend not in want_int:
                    want_int[backend] = expected_combine(ctx, backend, shape, counts, args.seed)
                want = want_int[backend].to(dtype)
            else:
                want = expected_quantized_combine(
                    ctx, backend, shape, counts, args.seed, combine_codec(wire, shape.hidden)
                ).to(dtype)
            ok = out.dtype == dtype and torch.equal(out.cpu(), want)
            if not ctx.all_true(ok):
                raise RuntimeError(
                    f"combine {label} T={tokens}: sums differ from the exact expectation "
                    "on some rank; not timing a wrong result"
                )
            # a handle combines once: one fresh copy per call, made before the timing
            fresh = iter([replace(handle) for _ in range(args.warmup + args.iters)])
            t = ctx.time(
                lambda c=comm, p=partial, h=fresh: c.combine(p, next(h)), args.iters, args.warmup
            )
            spread = ctx.spread()
            if i == 0:
                base_time = t
            row_b = (
                shape.hidden * dtype.itemsize
                if wire == "bf16"
                else combine_codec(wire, shape.hidden).row_bytes
            )
            nbytes = max(counts) * ctx.world_size * row_b
            records.append(
                {
                    "routine": "combine",
                    "case": label,
                    "backend": backend,
                    "combine_wire": wire,
                    "dtype": str(dtype).removeprefix("torch."),
                    "baseline": i == 0,
                    "tokens": tokens,
                    "counts": "/".join(map(str, counts)),
                    "bytes_per_token": row_b,
                    "wire_bytes": nbytes,
                    "time_us": t * 1e6,
                    **spread,
                    "busbw_GBps": nbytes * (ctx.world_size - 1) / ctx.world_size / t / 1e9,
                    "speedup": base_time / t if base_time else None,
                }
            )
    return records


def expected_quantized_combine(
    ctx: BenchContext, backend: str, shape: ModelShape, counts: list[int], seed: int, codec
) -> torch.Tensor:
    """What a quantized combine must return on this rank (fp32 ``[T, H]``), from every
    rank's regenerated partials and the torch reference codec, summed in rank order."""
    out = torch.zeros(counts[ctx.rank], shape.hidden)
    for s, n_s, offset, mine in _partial_slices(ctx, backend, shape, counts, seed):
        partial = combine_partials(s, n_s, shape.hidden, seed) * 0.37 + 0.01
        rows = partial[offset : offset + len(mine)].float()
        vals = codec.decode(codec.encode(rows, backend="torch"), backend="torch")
        add = torch.zeros_like(out)
        add[mine] = vals
        out = out + add
    return out


def render(ctx: BenchContext, recs: list[dict]) -> str:
    """The dispatch or the combine table (the routine of ``recs``)."""
    from moewire.bench.runner import fmt_num, fmt_speedup, fmt_time, render_table

    dispatch = recs[0]["routine"] == "dispatch"
    headers = ["case", "T/rank", "B/token", "time us (min-max)", "bus GB/s"]
    headers += ["% of all-gather", "SQNR dB"] if dispatch else []
    rows = []
    for r in recs:
        row = [r["case"], r["tokens"], r["bytes_per_token"], fmt_time(r)]
        row += [fmt_num(r["busbw_GBps"], 2)]
        if dispatch:
            frac = r.get("frac_of_ref")
            row += [fmt_num(100 * frac, 0) if frac else "-", fmt_num(r["sqnr_db"], 1)]
        rows.append([*row, fmt_speedup(r)])
    return render_table([*headers, "speedup"], rows)


def dispatch_steps(ctx: BenchContext, shape: ModelShape) -> int:
    """Progress steps of routine dispatch: one per case and token count."""
    return len(ctx.args.tokens) * len(cases_for(ctx.args, shape))


def combine_steps(ctx: BenchContext, shape: ModelShape) -> int:
    """Progress steps of routine combine: one per case and token count."""
    return sum(len(combine_cases(ctx.args, t, ctx.is_cuda)) for t in ctx.args.tokens)
