"""The persistent TMA rowwise-fp8 grouped GEMM (``moe/tma_fp8.py``) against
``torch._scaled_grouped_mm`` and ``torch._grouped_mm`` (bf16) on the same pairs.

    PYTHONPATH=src python tools/tma_gemm_bench.py [--tokens 8192 1024] [--tiles all]

DeepSeek-R1 dims (hidden 7168, expert width 2048), 64 local experts, top-8, uniform random
routing; event-timed medians of 20 calls. ``exact``: the kernel's output equals torch's bit
for bit; ``relerr``: max abs difference over max abs. A measuring aid for BENCHMARKS.md,
not a test.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch

from moewire.moe import tma_fp8
from moewire.moe.stage import plan_device

H, I, E, K = 7168, 2048, 64, 8
#: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) tried with --tiles all.
TILES = [
    (128, 256, 128, 8, 8, 3),
    (128, 128, 128, 8, 8, 4),
    (128, 128, 128, 8, 4, 4),
    (256, 128, 128, 8, 8, 3),
    (128, 256, 64, 8, 8, 4),
    (64, 256, 128, 8, 4, 4),
    (128, 256, 128, 16, 8, 3),
    (128, 256, 128, 8, 8, 3, True),
    (128, 128, 128, 8, 8, 4, True),
    (128, 256, 64, 8, 8, 4, True),
]


def event_us(fn, n: int = 20) -> float:
    """Median event-timed microseconds of ``fn`` after 3 warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for a, b in zip(start, end, strict=True):
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(start, end, strict=True)) * 1e3


def one_shape(t: int, n: int, c: int, tiles: list, g: torch.Generator) -> None:
    """Print every timing of one token count and one projection (``n`` outputs, ``c``
    inputs), a line each as it is measured."""
    ids = torch.rand(t, E, device="cuda", generator=g).argsort(dim=1)[:, :K]
    plan = plan_device(ids, 0, E, E)
    p = t * K
    a16 = torch.randn(p, c, device="cuda", generator=g, dtype=torch.bfloat16)
    w16 = torch.randn(E, n, c, device="cuda", generator=g, dtype=torch.bfloat16) * 0.5
    a, w = a16.to(torch.float8_e4m3fn), w16.to(torch.float8_e4m3fn)
    sa = torch.rand(p, device="cuda", generator=g) + 0.5
    sw = torch.rand(E, n, device="cuda", generator=g) + 0.5
    flop = 2 * p * n * c

    def torch_fp8():
        return torch._scaled_grouped_mm(
            a, w.transpose(-2, -1), sa, sw, offs=plan.offsets_L, out_dtype=torch.bfloat16
        )

    t_fp8 = event_us(torch_fp8)
    t_bf16 = event_us(lambda: torch._grouped_mm(a16, w16.transpose(-2, -1), offs=plan.offsets_L))
    ref = torch_fp8()
    live = int(plan.offsets_L[-1])
    say = functools.partial(print, flush=True)
    say(f"T={t} N={n} C={c}: torch fp8 {t_fp8:.1f} us ({flop / t_fp8 / 1e6:.0f} TF), "
        f"torch bf16 {t_bf16:.1f} us ({flop / t_bf16 / 1e6:.0f} TF)")  # fmt: skip
    for tile in tiles:
        if not tma_fp8.tma_fits(c, n, tile):
            continue
        try:
            out = tma_fp8.tma_gemm(a, sa, w, sw, plan, tile=tile)
            exact = torch.equal(out[:live], ref[:live])
            err = (out[:live].float() - ref[:live].float()).abs().max() / ref.float().abs().max()
            us = event_us(lambda tile=tile: tma_fp8.tma_gemm(a, sa, w, sw, plan, tile=tile))
            ratio = t_fp8 / us
            say(f"  {tile}: {us:.1f} us ({flop / us / 1e6:.0f} TF) = {ratio:.2f}x "
                f"torch fp8, exact {exact}, relerr {err:.1e}")  # fmt: skip
        except Exception as err:  # a tile that does not build on this card
            say(f"  {tile}: failed: {type(err).__name__}: {str(err)[:200]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 1024])
    ap.add_argument("--tiles", choices=["default", "all"], default="all")
    args = ap.parse_args()
    tiles = TILES if args.tiles == "all" else [tma_fp8.TMA_TILE]
    g = torch.Generator(device="cuda").manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for t in args.tokens:
        for n, c in ((2 * I, H), (H, I)):
            one_shape(t, n, c, tiles, g)


if __name__ == "__main__":
    main()
