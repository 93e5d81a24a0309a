"""Routine ``quantize`` of ``moewire bench``: pack and dequantize throughput on one device.

On a GPU, rank 0 runs :func:`moewire.bench.quantize.run_quantize_bench` (Triton kernels vs
the torch reference vs the device's copy bandwidth); on CPU, rank 0 times the torch
reference (its ``host_us`` is the same wall time: the CPU call is synchronous). The other
ranks wait: this routine measures one device, not the group.
"""

from __future__ import annotations

import statistics
import time

import torch

from moewire.bench.presets import ModelShape
from moewire.bench.runner import BenchContext
from moewire.formats import FORMATS, WireSpec, format_class, nvfp4_global_scale
from moewire.testing.data import heavy_tailed


def _cpu_time_us(fn, iters: int, warmup: int) -> tuple[float, dict]:
    """Median microseconds per call, and the spread fields of a record."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    spread = {"time_us_min": min(samples), "time_us_max": max(samples), "samples_us": samples}
    return statistics.median(samples), spread


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
        spec = WireSpec(fmt, h, global_scale=g if fmt == "nvfp4" else None)
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
            from moewire.bench.quantize import run_quantize_bench

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
