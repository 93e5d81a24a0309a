"""Where a replayed layer's time goes between its kernels: the GPU timeline of
``GraphedMoE`` calls timed as ``moewire bench layer --graph`` times them.

    PYTHONPATH=src python tools/replay_timeline.py [--tokens 1 256] [--cases fp8:fp8]

A 1-rank NCCL group (loopback), DeepSeek-R1 dims with 64 experts (one rank of EP=4), as
``tools/layer_profile.py``. Each call runs as the bench's timing loop runs it (GPU idle,
start event, the call, end event, synchronize) under ``torch.profiler``; for the median
call the tool prints each GPU activity (kernel or copy) with its start relative to the
call's host entry, its duration and the idle gap before it, then the totals: host entry to
first activity, the sum of activity durations, the sum of gaps between activities. A
measuring aid for BENCHMARKS.md, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import torch
import torch.distributed as dist
from layer_profile import E, H, _layer  # tools/, the script directory
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


def timeline(wire: str, experts: str, t: int, calls: int = 7) -> None:
    layer = _layer(wire, experts)
    x = torch.randn(t, H, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(t, E, device="cuda")
    g = GraphedMoE(layer, max(t, 1), x_dtype=x.dtype)
    for _ in range(5):
        g(x, logits, [t])
    torch.cuda.synchronize()
    event_us = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            with record_function(f"replay_call_{i}"):
                start.record()
                g(x, logits, [t])
                end.record()
            end.synchronize()
            event_us.append(start.elapsed_time(end) * 1e3)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        gpu, spans = _events(path)
    med = sorted(range(calls), key=lambda i: event_us[i])[calls // 2]
    lo = spans[med]["ts"]
    hi = spans[med + 1]["ts"] if med + 1 < len(spans) else float("inf")
    acts = [e for e in gpu if lo <= e["ts"] < hi]
    print(f"\n=== {wire} rows, {experts} experts, T={t}: event-timed calls (us) "
          f"{', '.join(f'{v:.1f}' for v in event_us)}; median call {med} ===")  # fmt: skip
    prev_end, busy, gaps = None, 0.0, 0.0
    for e in acts:
        gap = 0.0 if prev_end is None else e["ts"] - prev_end
        gaps += max(gap, 0.0)
        busy += e["dur"]
        print(f"  +{e['ts'] - lo:8.1f} us  {e['dur']:7.1f} us  gap {gap:6.1f}  {e['name'][:70]}")
        prev_end = e["ts"] + e["dur"]
    if acts:
        print(f"  host entry -> first activity {acts[0]['ts'] - lo:.1f} us; activities "
              f"{busy:.1f} us; gaps between them {gaps:.1f} us; host entry -> last end "
              f"{prev_end - lo:.1f} us; event-timed median {statistics.median(event_us):.1f} us",
              flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--cases", nargs="+", default=["fp8:fp8", "bf16:auto"])
    args = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29534")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    for case in args.cases:
        wire, experts = case.split(":")
        for t in args.tokens:
            timeline(wire, experts, t)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
