"""Where the layer's time goes on one GPU: host profile of the eager forward, kernel list of
the replayed graph.

    PYTHONPATH=src python tools/layer_profile.py [--tokens 1 64] [--wire bf16 fp8]

A 1-rank NCCL group (loopback), DeepSeek-R1 dims with 64 experts (as ``moewire bench layer
--world-size 1 --experts 64``: one rank of EP=4), random weights and routing, ``counts``
given. For each case: the host time of each stage of the eager
forward (wall clock with the GPU idle before it), the top functions of a cProfile of the
forward, and the GPU kernels of one CUDA-graph replay (torch.profiler), summed by name.
A measuring aid for BENCHMARKS.md, not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time
from dataclasses import replace

import torch
import torch.distributed as dist

import moewire as mw
from moewire.graphs import GraphedMoE

H, I, E, K = 7168, 2048, 64, 8


def _layer(wire: str, experts: str) -> mw.EPMoE:
    cfg = mw.MoEConfig(H, I, E, K)
    layer = mw.EPMoE(cfg, None, wire=wire, experts=experts)
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(E, 2 * I, H, device="cuda", generator=g, dtype=torch.bfloat16) * H**-0.5
    w2 = torch.randn(E, H, I, device="cuda", generator=g, dtype=torch.bfloat16) * I**-0.5
    layer.load_local_experts(w13, w2)
    return layer.cuda()


def _host_us(fn, iters: int = 200) -> float:
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def profile_case(wire: str, experts: str, t: int) -> None:
    layer = _layer(wire, experts)
    x = torch.randn(t, H, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(t, E, device="cuda")
    counts = [t]
    fwd = lambda: layer(x, logits, counts=counts)  # noqa: E731
    for _ in range(5):
        fwd()
    spec = layer.travel_spec
    extras = {"router_logits": logits}
    rows = spec.pack(x.bfloat16(), **extras)
    recv, handle = layer.comm.dispatch(rows, None, counts=counts)
    print(f"\n=== {wire} rows, {experts} experts, T={t} ===", flush=True)
    partial = torch.zeros(recv.shape[0], H, device="cuda", dtype=torch.bfloat16)
    host = {
        "forward": _host_us(fwd, 50),
        "pack": _host_us(lambda: spec.pack(x, **extras)),
        "dispatch": _host_us(lambda: layer.comm.dispatch(rows, None, counts=counts)),
        "combine": _host_us(lambda: layer.comm.combine(partial, replace(handle))),
    }
    plain = mw.WireSpec(
        spec.format, H, global_scale=getattr(spec.wire_format, "global_scale", None)
    )
    host["pack out="] = _host_us(lambda: spec.pack(x, out=rows, **extras))
    host["pack no extras"] = _host_us(lambda: plain.pack(x))
    print("host us: " + "; ".join(f"{k} {v:.1f}" for k, v in host.items()), flush=True)
    prof = cProfile.Profile()
    for _ in range(200):
        torch.cuda.synchronize()
        prof.runcall(lambda: spec.pack(x, **extras))
    pstats.Stats(prof).sort_stats("tottime").print_stats(10)
    prof = cProfile.Profile()
    for _ in range(30):
        torch.cuda.synchronize()
        prof.runcall(fwd)
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    g = GraphedMoE(layer, t, x_dtype=x.dtype)
    for _ in range(3):
        g(x, logits, counts)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            g(x, logits, counts)
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=30), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--cases", nargs="+", default=["bf16:auto", "fp8:fp8"])
    args = ap.parse_args()
    for_each_case(args.cases, args.tokens, profile_case, port="29533")


def for_each_case(cases: list[str], tokens: list[int], fn, port: str) -> None:
    """``fn(wire, experts, t)`` for every ``wire:experts`` case and token count, in a
    1-rank NCCL group on GPU 0 (loopback)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", port)
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    for case in cases:
        wire, experts = case.split(":")
        for t in tokens:
            fn(wire, experts, t)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
