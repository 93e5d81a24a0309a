"""Where a replayed layer's time goes: GPU time, host latency, and the gaps between kernels
of ``GraphedMoE`` calls.

    PYTHONPATH=src python tools/replay_timeline.py [--tokens 1 256] [--cases fp8:fp8]

A 1-rank NCCL group (loopback), DeepSeek-R1 dims with 64 experts (one rank of EP=4), as
``tools/layer_profile.py``. For each case: event-timed medians of the call (input copy and
replay) and of the bare ``graph.replay()``, once with the GPU idle before the start event
(as ``moewire bench layer --graph`` times it: the host's launch latency included) and once
queued behind a sleep kernel (GPU time only); the host times of the call, the replay and
the input copy; and, from ``torch.profiler``, each GPU activity of one call queued behind a
sleep kernel, with its duration and the idle gap before it. A measuring aid for
BENCHMARKS.md, not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import os
import pstats
import statistics
import tempfile

import torch
from layer_profile import E, H, _host_us, _layer, for_each_case  # tools/, the script directory
from torch.profiler import ProfilerActivity, profile, record_function

from moewire.graphs import GraphedMoE

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def _events(trace_path: str) -> tuple[list[dict], list[dict]]:
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    calls = sorted(
        (e for e in events if e.get("name", "").startswith("replay_call")), key=lambda e: e["ts"]
    )
    return gpu, calls


def _event_us(fn, busy: bool, n: int = 30) -> float:
    """Median event-timed us of ``fn``: with ``busy`` queued behind a 2 ms sleep kernel (the
    host's launch latency hidden: GPU time only), else with the GPU idle before the start
    event (the bench's loop)."""
    out = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        if busy:
            torch.cuda._sleep(2_000_000)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) * 1e3)
    return statistics.median(out)


def timeline(wire: str, experts: str, t: int, calls: int = 7, profile_call: bool = False) -> None:
    layer = _layer(wire, experts)
    x = torch.randn(t, H, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(t, E, device="cuda")
    g = GraphedMoE(layer, max(t, 1), x_dtype=x.dtype)
    call = lambda: g(x, logits, [t])  # noqa: E731
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    figures = {
        "call, GPU idle (the bench)": _event_us(call, busy=False),
        "call, GPU busy": _event_us(call, busy=True),
        "graph.replay(), GPU idle": _event_us(g.graph.replay, busy=False),
        "zero-copy call, GPU idle": _event_us(lambda: g(g.x_MH[:t], g.logits_ME[:t], [t]), False),
        "copy alone, GPU idle": _event_us(lambda: g._copy_inputs(x, logits), busy=False),
        "graph.replay(), GPU busy": _event_us(g.graph.replay, busy=True),
        "host: call": _host_us(call),
        "host: graph.replay()": _host_us(g.graph.replay),
        "host: input copy": _host_us(lambda: g._copy_inputs(x, logits)),
        "call, GPU idle, measured again last": _event_us(call, busy=False),
    }
    print(f"\n=== {wire} rows, {experts} experts, T={t} ===")
    print("  " + "; ".join(f"{k} {v:.1f} us" for k, v in figures.items()), flush=True)
    if profile_call:
        prof = cProfile.Profile()
        for _ in range(300):
            torch.cuda.synchronize()
            prof.runcall(call)
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    busy_acts = _profiled_call(call, calls, busy=True)
    idle_acts = _profiled_call(call, calls, busy=False)
    print("  GPU busy before the call | GPU idle before the call")
    prev_end, total, gaps = None, 0.0, 0.0
    for i, e in enumerate(busy_acts):
        gap = 0.0 if prev_end is None else e["ts"] - prev_end
        gaps += max(gap, 0.0)
        total += e["dur"]
        idle = f"{idle_acts[i]['dur']:8.1f} us" if i < len(idle_acts) else "-"
        print(f"  {e['dur']:8.1f} us  gap before {gap:6.1f} us | {idle}  {e['name'][:60]}")
        prev_end = e["ts"] + e["dur"]
    if busy_acts:
        print(
            f"  (GPU busy, one call) activities {total:.1f} us; gaps between them {gaps:.1f} "
            f"us; first start to last end {prev_end - busy_acts[0]['ts']:.1f} us; (GPU idle) "
            f"activities {sum(e['dur'] for e in idle_acts):.1f} us",
            flush=True,
        )


def _profiled_call(call, calls: int, busy: bool) -> list[dict]:
    """The GPU activities of the median one of ``calls`` calls under ``torch.profiler``,
    each queued behind a sleep kernel (``busy``) or made with the GPU idle."""
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for i in range(calls):
            torch.cuda.synchronize()
            if busy:
                torch.cuda._sleep(2_000_000)
            with record_function(f"replay_call_{i}"):
                call()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        gpu, spans = _events(path)
    gpu = [e for e in gpu if "spin" not in e["name"] and "sleep" not in e["name"]]
    lo = spans[calls // 2]["ts"]
    hi = spans[calls // 2 + 1]["ts"] if calls // 2 + 1 < len(spans) else float("inf")
    return [e for e in gpu if lo <= e["ts"] < hi]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--cases", nargs="+", default=["fp8:fp8", "bf16:auto"])
    ap.add_argument("--profile-call", action="store_true", help="cProfile of the call's host side")
    args = ap.parse_args()
    fn = functools.partial(timeline, profile_call=args.profile_call)
    for_each_case(args.cases, args.tokens, fn, port="29534")


if __name__ == "__main__":
    main()
