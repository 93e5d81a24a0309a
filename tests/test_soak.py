"""Soak: many layer iterations with random per-rank token counts; nothing lost, no growth.

Each iteration picks every rank's ``T`` at random (0 included, same draw on every rank from
a shared seed), cycles the backend (allgather, alltoall, grouped) and the routing mode, and
runs the nvfp4 layer. Every ``check_every`` iterations every rank rebuilds all ranks' tokens
from the seed, runs the unsharded layer (``comm="local"``) on them and checks its own slice
against it (the fp32 reassociation bound of test_moe_dist: ``|y - ref| <= tol * mag`` with
``mag`` from the float64 oracle). Memory: resident set (CPU) or ``torch.cuda.memory_allocated``
(GPU) right after the first check vs every 10 iterations after it.

- gloo: ``test_soak_gloo`` (marked slow), 1000 iterations at 2 ranks.
- NCCL, on 2 GPUs (prints one ``SOAK ... PASS`` line per rank)::

      torchrun --standalone --nproc_per_node=2 tests/test_soak.py --device cuda --iters 200

  ``--device cpu`` runs the same loop on gloo (for checking the script without GPUs).

Shape legend: ``T`` tokens on this rank, ``H`` hidden, ``E`` experts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

import moewire as mw
from moewire.testing.spawn import init_group

H, I, E, K = 256, 128, 8, 2
MAX_T = 96
G_NVFP4 = 2688.0 / 6.0
COMMS = ("allgather", "alltoall", "grouped")
ROUTINGS = ("logits", "topk")
#: Resident-set growth allowed on CPU after the baseline. The loop keeps no state between
#: iterations, so the set should stay flat. Measured with oneDNN off (see
#: ``_cpu_without_onednn``): +2 MiB over 6000 skewed iterations at 2 ranks. 16 MiB is far
#: above that noise and below what a leak of >= 16 KiB per iteration adds over 1000.
RSS_BOUND_MIB = 16.0
#: CUDA memory still allocated after an iteration, vs the baseline: every tensor of an
#: iteration is freed, so it must not grow (1 MiB of slack for the caching of small blocks).
CUDA_BOUND_MIB = 1.0
#: Memory is sampled every this many iterations after the baseline (taken right after the
#: first reference check, so the reference path's own buffers are in it).
SAMPLE_EVERY = 10


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _mem_mib(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device) / 2**20
    return _rss_mib()


def _weights(device: torch.device):
    g = torch.Generator().manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(torch.bfloat16)
    return w13.to(device), w2.to(device)


def _iteration_inputs(seed: int, it: int, world: int):
    """Every rank's counts and all ranks' tokens of iteration ``it`` (CPU, same on every
    rank). One in eight ranks has no tokens."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + it)
    counts = torch.randint(1, MAX_T + 1, (world,), generator=g)
    counts[torch.rand(world, generator=g) < 0.125] = 0
    total = int(counts.sum())
    x = torch.randn(total, H, generator=g).to(torch.bfloat16)
    logits = torch.randn(total, E, generator=g)
    if it % 7 == 3:  # skewed: every token's first choice is one expert
        logits[:, it % E] += 20.0
    return counts.tolist(), x, logits


def _oracle_mag(cfg, spec, x, logits, w13, w2) -> torch.Tensor:
    """``sum_k |w_k| * (|w2_e| @ |silu(g) * u|)`` in float64 (test_moe.oracle's ``mag``)."""
    from moewire.moe import route

    ids, w = route(cfg, logits)
    bare = spec.with_extras(None)
    a = bare.dequantize(bare.pack(x)).double()
    mag = torch.zeros(x.shape, dtype=torch.float64)
    w13d, w2d = w13.double(), w2.double()
    for t in range(x.shape[0]):
        for k in range(cfg.top_k):
            e = int(ids[t, k])
            gate, up = (w13d[e] @ a[t]).chunk(2)
            act = torch.nn.functional.silu(gate) * up
            mag[t] += w[t, k].double().abs() * (w2d[e].abs() @ act.abs())
    return mag


def soak(iters: int, device: torch.device, check_every: int = 50, seed: int = 0) -> dict:
    """Run the soak on the initialized default group; returns this rank's summary."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = mw.MoEConfig(hidden=H, intermediate=I, num_experts=E, top_k=K)
    w13, w2 = _weights(device)
    layers = {}
    for comm in COMMS:
        for routing in ROUTINGS:
            layer = mw.EPMoE(
                cfg,
                None,
                wire="nvfp4",
                comm=comm,
                routing=routing,
                global_scale=G_NVFP4,
                combine_dtype=torch.float32,
            )
            layer.load_experts(w13, w2)
            layers[comm, routing] = layer
    ref_layer = mw.EPMoE(
        cfg, comm="local", wire="nvfp4", global_scale=G_NVFP4, combine_dtype=torch.float32
    )
    ref_layer.load_experts(w13, w2)
    w13c, w2c = w13.cpu(), w2.cpu()
    tol = 2.0**-20 if device.type == "cpu" else 2.0**-10
    base = peak_growth = 0.0
    checks = mismatches = tokens = 0
    worst = 0.0
    start = time.monotonic()
    for it in range(iters):
        counts, x_all, logits_all = _iteration_inputs(seed, it, world)
        lo = sum(counts[:rank])
        sl = slice(lo, lo + counts[rank])
        x, logits = x_all[sl].to(device), logits_all[sl].to(device)
        layer = layers[COMMS[it % len(COMMS)], ROUTINGS[(it // len(COMMS)) % len(ROUTINGS)]]
        y = layer(x, logits)
        if y.shape != x.shape:
            raise AssertionError(f"iteration {it}: y {tuple(y.shape)} for x {tuple(x.shape)}")
        tokens += counts[rank]
        if (it + 1) % check_every == 0 or it == iters - 1:
            ref = ref_layer(x_all.to(device), logits_all.to(device))[sl].float().cpu()
            mag = _oracle_mag(cfg, ref_layer.spec, x_all[sl], logits_all[sl], w13c, w2c)
            err = (y.float().cpu() - ref).abs()
            bad = int((err > tol * mag.float()).sum())
            mismatches += bad
            checks += 1
            if err.numel():
                worst = max(worst, float((err / mag.float().clamp_min(1e-30)).max()))
        del y, x, logits
        if it + 1 == check_every:
            base = _mem_mib(device)
        elif it + 1 > check_every and (it + 1) % SAMPLE_EVERY == 0:
            peak_growth = max(peak_growth, _mem_mib(device) - base)
    bound = CUDA_BOUND_MIB if device.type == "cuda" else RSS_BOUND_MIB
    return {
        "rank": rank,
        "iters": iters,
        "tokens": tokens,
        "checks": checks,
        "mismatches": mismatches,
        "worst_rel_err": worst,
        "tol": tol,
        "mem_kind": "cuda allocated" if device.type == "cuda" else "RSS",
        "mem_base_mib": base,
        "mem_growth_mib": peak_growth,
        "mem_bound_mib": bound,
        "seconds": time.monotonic() - start,
        "ok": mismatches == 0 and peak_growth <= bound,
    }


def _cpu_without_onednn() -> None:
    """Route CPU matmuls around oneDNN for the memory measurement.

    oneDNN keeps compiled kernels per GEMM shape, and the soak's random, skewed token
    counts give the experts' GEMMs hundreds of distinct shapes. In a soak-like loop (2 gloo
    ranks, the nvfp4 allgather layer, random and skewed counts; torch 2.13.0 CPU, 2026-11-28)
    the resident set grew +91 MiB by iteration 2000 and saturated near +150 MiB by iteration
    16000 with oneDNN on, and +2 MiB over 6000 iterations with it off; this soak with it off:
    +6.8 MiB over 4000 iterations, flat after the first few hundred. That is a bounded cache
    of torch's CPU backend, not moewire's: a CPU deployment should budget for it. Turning it
    off here keeps the bound able to see a leak in moewire (the computed values are the same
    up to GEMM summation order, and the reference check runs on the same backend).
    """
    torch.backends.mkldnn.enabled = False


def _soak_worker(iters: int) -> dict:
    _cpu_without_onednn()
    return soak(iters, torch.device("cpu"))


def _summary(r: dict) -> str:
    return (
        f"SOAK rank {r['rank']}: {r['iters']} iterations, {r['tokens']} tokens, "
        f"{r['checks']} reference checks, {r['mismatches']} mismatches "
        f"(worst |y-ref|/mag {r['worst_rel_err']:.2e}, tol {r['tol']:.1e}), "
        f"{r['mem_kind']} {r['mem_base_mib']:.1f} MiB after the first check, "
        f"growth {r['mem_growth_mib']:+.2f} MiB (bound {r['mem_bound_mib']:g}), "
        f"{r['seconds']:.1f} s: {'PASS' if r['ok'] else 'FAIL'}"
    )


try:
    import pytest
except ImportError:  # the torchrun entry point does not need pytest
    pytest = None

if pytest is not None:

    @pytest.mark.slow
    @pytest.mark.timeout(900)
    def test_soak_gloo():
        """1000 iterations at 2 ranks on gloo: no mismatch, RSS growth within the bound."""
        from moewire.testing.spawn import run_distributed

        results = run_distributed(_soak_worker, 2, 1000, timeout=840)
        for r in results:
            print(_summary(r))
            assert r["mismatches"] == 0 and r["checks"] == 20, r
            assert r["mem_growth_mib"] <= RSS_BOUND_MIB, _summary(r)

    def test_soak_short_gloo():
        """The same loop, 60 iterations (one reference check plus the last): a fast guard."""
        from moewire.testing.spawn import run_distributed

        for r in run_distributed(_soak_worker, 2, 60, timeout=120):
            assert r["mismatches"] == 0 and r["checks"] == 2, r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--check-every", type=int, default=50)
    p.add_argument("--timeout", type=float, default=120.0, help="process-group timeout, s")
    args = p.parse_args(argv)
    backend = "nccl" if args.device == "cuda" else "gloo"
    if args.device == "cpu":
        torch.set_num_threads(1)
        _cpu_without_onednn()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = init_group(rank, world, "env://", device_type=args.device, timeout=args.timeout)
    try:
        r = soak(args.iters, device, args.check_every)
        ok = torch.tensor([int(r["ok"])], device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        print(_summary(r), flush=True)
        if dist.get_rank() == 0:
            status = "PASS" if int(ok) else "FAIL"
            print(
                f"SOAK {backend} world={dist.get_world_size()} iters={args.iters}: {status}",
                flush=True,
            )
        return 0 if int(ok) else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
