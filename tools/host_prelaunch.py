"""Host time of ``WireSpec.pack`` / ``dequantize`` up to the Triton launch, on CPU.

The Python that runs before a Triton kernel launch (validation, allocation, launch
parameters) is the same on CPU and GPU; this script times it on CPU tensors with the
kernel objects swapped for a no-op (nothing is computed: a measuring aid, not a test), so a
change to the launch path can be measured without a GPU. On a GPU, ``moewire bench
quantize``'s "host us" column measures the whole call, Triton's launcher included.

    PYTHONPATH=src python tools/host_prelaunch.py [FORMAT ...] [--tokens 64] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch

import moewire as mw
from moewire.bench.routines.quantize import host_us
from moewire.formats import _triton


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _median_us(fn, iters: int = 2000, warmup: int = 200) -> float:
    return host_us(fn, iters, warmup)


def _measure(fmt: str, tokens: int, hidden: int, experts: int, profile: bool) -> None:
    g = mw.nvfp4_global_scale(4.0) if fmt == "nvfp4" else None
    spec = mw.WireSpec(
        fmt, hidden, global_scale=g, extras={"router_logits": (torch.float32, experts)}
    )
    x = torch.randn(tokens, hidden).to(torch.bfloat16)
    logits = torch.randn(tokens, experts)
    rows = spec.pack(x, router_logits=logits, backend="torch")

    def pack() -> None:
        spec.pack(x, router_logits=logits, backend="triton")

    pack_us = _median_us(pack)
    deq_us = _median_us(lambda: spec.dequantize(rows, backend="triton"))
    print(f"{fmt} T={tokens}: pack {pack_us:.1f} us, dequantize {deq_us:.1f} us (before launch)")
    if profile:
        prof = cProfile.Profile()
        for _ in range(2000):
            prof.runcall(pack)
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("formats", nargs="*", default=["nvfp4", "fp8", "mxfp4"])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    _triton._check_device = lambda t, name: None  # CPU tensors without the interpreter
    _triton.pack_kernel = _triton.dequant_kernel = _NoLaunch()
    for fmt in args.formats:
        _measure(fmt, args.tokens, args.hidden, args.experts, args.profile)


if __name__ == "__main__":
    main()
