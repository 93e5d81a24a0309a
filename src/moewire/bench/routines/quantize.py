"""Routine ``quantize`` of ``moewire bench``: pack and dequantize throughput on one device.

On a GPU, rank 0 runs :func:`run_quantize_bench` (below); on CPU, rank 0 times the torch
reference (its ``host_us`` is the same wall time: the CPU call is synchronous). The other
ranks wait: this routine measures one device, not the group.

On a GPU: the fused pack and dequantize kernels against the device's copy bandwidth, an
empty kernel launch and the torch reference.

For each format and token count ``T`` (hidden ``H``, bf16 activations, no extras):

- ``pack``: ``spec.pack(x, out=rows)``, bytes = ``T*H*2`` read + ``T*R`` written;
- ``dequantize``: ``spec.dequantize(rows, bfloat16)``, bytes = ``T*R`` read + ``T*H*2`` written.

Correctness is checked first (Triton rows equal the torch reference's bytes, dequantized
values equal bit for bit), then each op is timed with CUDA events around one call, after
warm-up, with the L2 cache flushed before every call (so repeated calls cannot read their
input from L2) and a short spin kernel queued before it (so the host's Python and launch
overhead, tens of microseconds, overlaps GPU work and is not counted), and the median is
reported. The device's copy bandwidth is a 1 GiB
device-to-device ``copy_`` timed the same way (bytes read + written). The ``copy same``
column is what a plain device-to-device copy moving the op's bytes (half read, half
written) reaches, as a share of that bandwidth: the ceiling that the fixed cost of one
launch leaves at that size. At small ``T`` the time is launch latency: compare the
``x empty`` column, the kernel's time over one empty Triton kernel's, timed the same way.

Two ways to flush, both reported. The main columns flush by *reading* 256 MB (the L2 then
holds clean lines, so the timed op moves only its own bytes). The ``% dirty`` column
flushes by *writing* them (``zero_``, as many benchmark harnesses do): the L2 is then full
of dirty lines that the op's first misses must write back to DRAM, tens of MB charged to
the op's time, which weighs more the fewer bytes the op moves (a 1 GiB copy hardly
notices). There, op and copy bandwidth are both timed after a write flush.

The ``host us`` column is the host's side of one Triton call: the wall time until the
Python call returns (validation, launch parameters, Triton's launcher), measured with the
GPU idle (synchronize, then ``time.perf_counter`` around one call; median of many calls).
Where the kernel takes less than this, the host's time is the op's time unless the call is
captured in a CUDA graph.

Run standalone: ``python -m moewire.bench.routines.quantize [--tokens ...] [--json PATH]``.

Shape legend: ``T`` tokens, ``H`` hidden, ``R`` row bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Sequence

import torch

from moewire.bench.presets import ModelShape
from moewire.bench.runner import (
    BenchContext,
    fmt_num,
    fmt_time,
    render_table,
    spread_fields,
    wall_times,
)
from moewire.formats import FORMATS, WireSpec, format_class, nvfp4_global_scale
from moewire.testing.data import heavy_tailed

TOKENS = (64, 1024, 8192, 16384)
HIDDEN = 7168
#: Flushing this many bytes evicts the L2 cache of any current GPU (H200: 60 MB).
_FLUSH_BYTES = 256 << 20
_COPY_BYTES = 1 << 30
#: GPU cycles of a spin kernel queued before each timed call (about 100 us at 2 GHz): the
#: host enqueues the call meanwhile, so the events time the GPU work, not Python's launch.
_HEAD_START_CYCLES = 200_000


def _time_us(
    fn: Callable[[], object], iters: int, warmup: int, flush: torch.Tensor, dirty: bool = False
) -> float:
    """Median GPU time of one ``fn()`` call in microseconds (CUDA events, L2 flushed, the
    host's launch overhead hidden behind a spin kernel). The flush reads ``flush`` (the L2
    is left clean) or, with ``dirty``, writes it (the L2 is left full of dirty lines)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    words = flush.view(torch.int32)
    for i in range(iters):
        if dirty:
            flush.zero_()
        else:
            torch.amax(words)  # reads every byte, writes 4
        torch.cuda._sleep(_HEAD_START_CYCLES)
        start[i].record()
        fn()
        end[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(start, end, strict=True)) * 1e3


def _wall_us(fn: Callable[[], object], iters: int, warmup: int, sync: bool) -> list[float]:
    """Wall microseconds until each of ``iters`` calls of ``fn`` returns (after ``warmup``);
    with ``sync`` the device is idle before each call."""
    for _ in range(warmup):
        fn()
    samples = [s * 1e6 for s in wall_times(fn, iters, torch.cuda.synchronize if sync else None)]
    if sync:
        torch.cuda.synchronize()
    return samples


def host_us(fn: Callable[[], object], iters: int, warmup: int) -> float:
    """Median wall time in microseconds until one ``fn()`` call returns, with the device idle
    before each call (CUDA: synchronized first; on CPU the same measure)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return statistics.median(_wall_us(fn, iters, warmup, cuda))


def _empty_kernel():
    import triton

    @triton.jit
    def empty_kernel():
        pass

    return lambda: empty_kernel[(1,)]()


def _copy_gbps(iters: int, warmup: int, flush: torch.Tensor, dirty: bool = False) -> float:
    """Device-to-device copy bandwidth in GB/s, bytes read + written (``dirty``: see
    :func:`_time_us`)."""
    src = torch.empty(_COPY_BYTES, dtype=torch.uint8, device=flush.device)
    dst = torch.empty_like(src)
    us = _time_us(lambda: dst.copy_(src), iters, warmup, flush, dirty)
    return 2 * _COPY_BYTES / us / 1e3


def _same_size_copy_us(nbytes: int, iters: int, warmup: int, flush: torch.Tensor) -> float:
    """GPU time of a device-to-device copy that reads and writes ``nbytes`` in all."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=flush.device)
    dst = torch.empty_like(src)
    return _time_us(lambda: dst.copy_(src), iters, warmup, flush)


def _ops(spec: WireSpec, x: torch.Tensor, rows: torch.Tensor) -> dict:
    """op -> backend -> a call of it (pack writes into ``rows``)."""
    return {
        "pack": {b: (lambda b=b: spec.pack(x, out=rows, backend=b)) for b in ("torch", "triton")},
        "dequantize": {
            b: (lambda b=b: spec.dequantize(rows, torch.bfloat16, backend=b))
            for b in ("torch", "triton")
        },
    }


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    an, bn = torch.isnan(a), torch.isnan(b)
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    ai, bi = a.view(ints[a.dtype]), b.view(ints[b.dtype])
    return bool(torch.equal(an, bn) and torch.equal(ai[~an], bi[~bn]))


def run_quantize_bench(
    tokens: Sequence[int] = TOKENS,
    hidden: int = HIDDEN,
    formats: Sequence[str] = FORMATS,
    iters: int = 50,
    warmup: int = 5,
) -> list[dict]:
    """Measure pack and dequantize of every format on the current CUDA device.

    Args:
        tokens: token counts ``T`` to measure.
        hidden: ``H`` (a multiple of every format's block, e.g. 7168 for DeepSeek-R1).
        formats: format names (see :data:`moewire.FORMATS`).
        iters: timed calls per measurement (the median is reported).
        warmup: untimed calls before them.

    Returns:
        One dict per (format, T, op) with ``format, tokens, hidden, op, bytes, torch_us,
        triton_us, triton_gbps, torch_gbps, frac_of_copy, same_copy_frac, speedup, x_empty,
        triton_us_dirty, frac_of_copy_dirty, host_us`` (``host_us``: the triton call's wall
        time with the GPU idle, see the module docstring; ``same_copy_frac``: a copy of the
        same bytes, as a share of the copy bandwidth; ``*_dirty``: timed after a flush that
        leaves the L2 dirty, against the copy bandwidth measured the same way) and the
        device-level
        ``device, copy_gbps, copy_gbps_dirty, empty_us, torch_version, triton_version``.

    Raises:
        RuntimeError: no CUDA device, or a kernel's output differs from the reference.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("the quantize benchmark needs a CUDA GPU")
    dev = torch.device("cuda")
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device=dev)
    meta = _device_meta(iters, warmup, flush)
    x_all = (heavy_tailed(max(tokens), hidden) * 3).to(dev, torch.bfloat16)
    g = nvfp4_global_scale(x_all.float().abs().amax())
    results = []
    same_copy: dict[int, float] = {}  # bytes moved -> us of a copy moving them
    for fmt in formats:
        g_fmt = g if format_class(fmt).needs_global_scale else None
        spec = WireSpec(fmt, hidden, global_scale=g_fmt)
        for t in tokens:
            x = x_all[:t]
            rows = _checked_rows(spec, x, f"{fmt} T={t}")
            nbytes = t * hidden * x.element_size() + rows.numel()
            if nbytes not in same_copy:
                same_copy[nbytes] = _same_size_copy_us(nbytes, iters, warmup, flush)
            for op, fns in _ops(spec, x, rows).items():
                timed = _op_figures(fns, nbytes, same_copy[nbytes], meta, iters, warmup, flush)
                results.append({"format": fmt, "tokens": t, "hidden": hidden, "op": op, **timed})
    return results


def _device_meta(iters: int, warmup: int, flush: torch.Tensor) -> dict:
    """The device-level fields of every record: the card, its copy bandwidth (after a read
    and after a write flush), an empty kernel's time and the versions."""
    import triton

    return {
        "device": torch.cuda.get_device_name(flush.device),
        "copy_gbps": _copy_gbps(iters, warmup, flush),
        "copy_gbps_dirty": _copy_gbps(iters, warmup, flush, dirty=True),
        "empty_us": _time_us(_empty_kernel(), iters, warmup, flush),
        "torch_version": torch.__version__,
        "triton_version": triton.__version__,
    }


def _checked_rows(spec: WireSpec, x: torch.Tensor, label: str) -> torch.Tensor:
    """``x`` packed by the Triton kernel, after checking its rows against the torch
    reference's bytes and its dequantized values against the reference's, bit for bit."""
    ref = spec.pack(x, backend="torch")
    rows = torch.empty_like(ref)
    spec.pack(x, out=rows, backend="triton")
    if not torch.equal(rows, ref):
        raise RuntimeError(f"{label}: triton pack differs from the torch reference")
    deq = spec.dequantize(rows, torch.bfloat16, backend="triton")
    if not _same_values(deq, spec.dequantize(rows, torch.bfloat16, backend="torch")):
        raise RuntimeError(f"{label}: triton dequantize differs from the reference")
    return rows


def _op_figures(
    fns: dict,
    nbytes: int,
    same_copy_us: float,
    meta: dict,
    iters: int,
    warmup: int,
    flush: torch.Tensor,
) -> dict:
    """One op moving ``nbytes``, timed (torch and triton; triton after a dirty flush and on
    the host too): its record's fields from ``bytes`` on."""
    torch_us = _time_us(fns["torch"], iters, warmup, flush)
    triton_us = _time_us(fns["triton"], iters, warmup, flush)
    dirty_us = _time_us(fns["triton"], iters, warmup, flush, dirty=True)
    host = host_us(fns["triton"], 4 * iters, warmup)
    copy_gbps = meta["copy_gbps"]
    return {
        "bytes": nbytes,
        "torch_us": torch_us,
        "triton_us": triton_us,
        "torch_gbps": nbytes / torch_us / 1e3,
        "triton_gbps": nbytes / triton_us / 1e3,
        "frac_of_copy": nbytes / triton_us / 1e3 / copy_gbps,
        "same_copy_frac": nbytes / same_copy_us / 1e3 / copy_gbps,
        "speedup": torch_us / triton_us,
        "x_empty": triton_us / meta["empty_us"],
        "triton_us_dirty": dirty_us,
        "frac_of_copy_dirty": nbytes / dirty_us / 1e3 / meta["copy_gbps_dirty"],
        "host_us": host,
        **meta,
    }


def format_table(results: Sequence[dict]) -> str:
    """A Markdown table of :func:`run_quantize_bench`'s results, with a header line naming
    the device, its copy bandwidth and the empty-launch time."""
    if not results:
        return "(no results)"
    r0 = results[0]
    lines = [
        f"device: {r0['device']}; torch {r0['torch_version']}, triton {r0['triton_version']}; "
        f"copy bandwidth {r0['copy_gbps']:.0f} GB/s (1 GiB D2D copy, read + written; "
        f"{r0['copy_gbps_dirty']:.0f} GB/s after a write flush); "
        f"empty kernel launch {r0['empty_us']:.1f} us; H = {r0['hidden']}, bf16 activations, "
        f"no extras; median of CUDA-event timings of one call (GPU time: L2 flushed by a read "
        f"and host launch overhead hidden before each call; % dirty: L2 flushed by a write, "
        f"op and copy alike; host us: wall time of one triton call with the GPU idle)",
        "",
        "| format | T | op | MB moved | torch us | triton us | torch GB/s | triton GB/s "
        "| % of copy | copy same | % dirty | speedup | x empty | host us |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['format']} | {r['tokens']} | {r['op']} | {r['bytes'] / 1e6:.1f} "
            f"| {r['torch_us']:.1f} | {r['triton_us']:.1f} | {r['torch_gbps']:.0f} "
            f"| {r['triton_gbps']:.0f} | {100 * r['frac_of_copy']:.1f} "
            f"| {100 * r['same_copy_frac']:.1f} | {100 * r['frac_of_copy_dirty']:.1f} "
            f"| {r['speedup']:.2f}x "
            f"| {r['x_empty']:.1f} | {r['host_us']:.1f} |"
        )
    return "\n".join(lines)


def _cpu_time_us(fn, iters: int, warmup: int) -> tuple[float, dict]:
    """Median microseconds per call, and the spread fields of a record."""
    samples = _wall_us(fn, iters, warmup, sync=False)
    return statistics.median(samples), spread_fields(samples)


def _cpu_records(ctx: BenchContext, shape: ModelShape) -> list[dict]:
    args = ctx.args
    h = shape.hidden
    x_all = (heavy_tailed(max(args.tokens), h) * 3).to(torch.bfloat16)
    g = nvfp4_global_scale(x_all)
    formats = ["bf16", *[f for f in args.formats if f != "bf16"]]
    records = []
    for fmt in formats:
        if h % format_class(fmt).block:
            continue  # listed under the table (bench/verdict.py)
        spec = WireSpec(fmt, h, global_scale=g if format_class(fmt).needs_global_scale else None)
        for t in args.tokens:
            x = x_all[:t]
            rows = spec.pack(x)
            nbytes = x.numel() * x.element_size() + rows.numel()
            for op, fn in (
                ("pack", lambda s=spec, x=x, r=rows: s.pack(x, out=r)),
                ("dequantize", lambda s=spec, r=rows: s.dequantize(r, torch.bfloat16)),
            ):
                us, spread = _cpu_time_us(fn, args.iters, args.warmup)
                records.append(
                    {
                        "routine": "quantize",
                        "case": f"{fmt} {op} (torch reference)",
                        "format": fmt,
                        "op": op,
                        "tokens": t,
                        "bytes_per_token": spec.row_bytes,
                        "bytes": nbytes,
                        "time_us": us,
                        **spread,
                        "GBps": nbytes / us / 1e3,
                        "host_us": us,
                    }
                )
    return records


def run_quantize(ctx: BenchContext, shape: ModelShape) -> list[dict]:
    records: list[dict] = []
    if ctx.rank == 0:
        if ctx.is_cuda:
            formats = [f for f in FORMATS if shape.hidden % format_class(f).block == 0]
            formats = [f for f in formats if f == "bf16" or f in ctx.args.formats]
            for r in run_quantize_bench(
                [t for t in ctx.args.tokens if t > 0],
                shape.hidden,
                formats,
                iters=ctx.args.iters,
                warmup=ctx.args.warmup,
            ):
                records.append(
                    {
                        "routine": "quantize",
                        "case": f"{r['format']} {r['op']} (triton)",
                        "time_us": r["triton_us"],
                        **r,
                    }
                )
        else:
            records = _cpu_records(ctx, shape)
    ctx.barrier()
    return records


def render(ctx: BenchContext, recs: list[dict]) -> str:
    """The routine's table: the GPU kernel table, or on CPU the torch reference's."""
    if "triton_us" in recs[0]:
        return format_table(recs)
    headers = ["case", "T", "MB moved", "time us (min-max)", "GB/s", "host us"]
    rows = [
        [
            r["case"],
            r["tokens"],
            fmt_num(r["bytes"] / 1e6, 2),
            fmt_time(r),
            fmt_num(r["GBps"], 2),
            fmt_num(r["host_us"]),
        ]
        for r in recs
    ]
    return render_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m moewire.bench.routines.quantize", description=__doc__
    )
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    p.add_argument("--hidden", type=int, default=HIDDEN)
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    results = run_quantize_bench(args.tokens, args.hidden, args.formats, args.iters)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()


def steps(ctx: BenchContext, shape: ModelShape) -> int:
    """Progress steps: none (rank 0 times one device)."""
    return 0
