"""Routine ``combine`` of ``moewire bench``: the return trip of the partial outputs.

It times combine for bf16/fp32 partial rows (the bf16 reduce-scatter first, the baseline)
and each quantized ``combine_wire`` over allgather and alltoall, on the tokens and routing
of routine ``dispatch`` (``comm.py``, whose inputs it regenerates). Before timing, every case
is checked: unquantized ones exactly, with integer-valued partial rows whose sums are exact
in any order; quantized ones bitwise against the torch reference codec.

Shape legend: ``T`` tokens on a rank, ``N`` rows received, ``H`` hidden, ``K`` top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from moewire.bench.presets import ModelShape
from moewire.bench.routines import comm as _dispatch
from moewire.bench.routines.comm import rank_inputs, token_counts, topk_of
from moewire.bench.runner import BenchContext
from moewire.formats import WireSpec
from moewire.formats.combine import COMBINE_WIRES, combine_codec


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


@dataclass
class _Round:
    """One token count of the routine on this rank."""

    tokens: int
    counts: list[int]  # every rank's token count
    ids_TK: torch.Tensor  # this rank's top-k expert ids, on its device
    #: backend -> the exact sums of the integer partials (computed once per backend)
    want_int: dict[str, torch.Tensor] = field(default_factory=dict)


def run_combine(ctx: BenchContext, shape: ModelShape) -> list[dict]:
    """Times the return trip. Unquantized cases are checked exactly with integer-valued
    partials; quantized ones bitwise against the reference codec on CPU: every rank
    regenerates every rank's partial rows, quantizes each source's rows for its tokens with
    the torch codec, dequantizes and adds in fp32 in rank order."""
    args = ctx.args
    records = []
    for tokens in args.tokens:
        counts = token_counts(tokens, ctx.world_size, args.skew)
        _, logits = rank_inputs(shape, counts[ctx.rank], ctx.rank, args.seed, ctx.device)
        ids, _ = topk_of(logits.cpu(), shape.top_k)
        rnd = _Round(tokens, counts, ids.to(ctx.device))
        base_time = None
        for i, case in enumerate(combine_cases(args, tokens, ctx.is_cuda)):
            label = _combine_label(i, *case)
            ctx.progress(f"combine T={tokens} {label}")
            rec, t = _combine_case(ctx, shape, rnd, case, label, baseline=i == 0)
            if i == 0:
                base_time = t
            records.append({**rec, "speedup": base_time / t if base_time else None})
    return records


def _combine_case(
    ctx: BenchContext,
    shape: ModelShape,
    rnd: _Round,
    case: tuple[str, str, torch.dtype],
    label: str,
    baseline: bool,
) -> tuple[dict, float]:
    """One case, checked against its expectation on every rank, then timed: its record
    (all but the speedup) and its time in seconds."""
    args, counts = ctx.args, rnd.counts
    backend, wire, dtype = case
    comm, partial, handle, ok = _checked_combine(ctx, shape, rnd, case)
    if not ctx.all_true(ok):
        raise RuntimeError(
            f"combine {label} T={rnd.tokens}: sums differ from the exact expectation "
            "on some rank; not timing a wrong result"
        )
    # a handle combines once: one fresh copy per call, made before the timing
    fresh = iter([replace(handle) for _ in range(args.warmup + args.iters)])
    t = ctx.time(lambda: comm.combine(partial, next(fresh)), args.iters, args.warmup)
    spread = ctx.spread()
    if wire == "bf16":
        row_b = shape.hidden * dtype.itemsize
    else:
        row_b = combine_codec(wire, shape.hidden).row_bytes
    nbytes = max(counts) * ctx.world_size * row_b
    rec = {
        "routine": "combine",
        "case": label,
        "backend": backend,
        "combine_wire": wire,
        "dtype": str(dtype).removeprefix("torch."),
        "baseline": baseline,
        "tokens": rnd.tokens,
        "counts": "/".join(map(str, counts)),
        "bytes_per_token": row_b,
        "wire_bytes": nbytes,
        "time_us": t * 1e6,
        **spread,
        "busbw_GBps": nbytes * (ctx.world_size - 1) / ctx.world_size / t / 1e9,
    }
    return rec, t


def _checked_combine(
    ctx: BenchContext, shape: ModelShape, rnd: _Round, case: tuple[str, str, torch.dtype]
) -> tuple:
    """``(comm, partial, handle, ok)``: the case's comm, this rank's partial rows for the
    empty rows it received (dispatched by ``rnd.ids_TK``), their handle, and whether
    combining them once gave exactly the expected sums on this rank."""
    from moewire.comm import make_comm

    backend, wire, dtype = case
    seed, counts = ctx.args.seed, rnd.counts
    spec = WireSpec("bf16", shape.hidden)
    comm = make_comm(
        backend, ctx.group, num_experts=shape.num_experts, spec=spec, combine_wire=wire
    )
    rows = torch.zeros(counts[ctx.rank], spec.row_bytes, dtype=torch.uint8, device=ctx.device)
    recv, handle = comm.dispatch(rows, rnd.ids_TK)
    partial = combine_partials(ctx.rank, recv.shape[0], shape.hidden, seed)
    if wire != "bf16":  # non-integer values, so the codec's rounding shows
        partial = partial * 0.37 + 0.01
    partial = partial.to(dtype).to(ctx.device)
    out = comm.combine(partial, handle)
    if wire == "bf16":
        if backend not in rnd.want_int:
            rnd.want_int[backend] = expected_combine(ctx, backend, shape, counts, seed)
        want = rnd.want_int[backend].to(dtype)
    else:
        codec = combine_codec(wire, shape.hidden)
        want = expected_quantized_combine(ctx, backend, shape, counts, seed, codec).to(dtype)
    ok = out.dtype == dtype and torch.equal(out.cpu(), want)
    return comm, partial, handle, ok


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
    """The combine table: routine dispatch's, less its dispatch-only columns."""
    return _dispatch.render(ctx, recs)


def steps(ctx: BenchContext, shape: ModelShape) -> int:
    """Progress steps: one per case and token count."""
    return sum(len(combine_cases(ctx.args, t, ctx.is_cuda)) for t in ctx.args.tokens)
