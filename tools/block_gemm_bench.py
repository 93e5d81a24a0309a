"""Block-scaled and rowwise fp8 grouped GEMMs: the Triton kernel (``moe/block_fp8.py``)
against ``torch._scaled_grouped_mm`` on the same pairs, with a few prefill tiles.

    PYTHONPATH=src python tools/block_gemm_bench.py

DeepSeek-R1 dims (hidden 7168, expert width 2048), 64 local experts of 64, top-8, uniform
random routing, 8192 / 1024 / 64 tokens; event-timed medians of 20 calls. ``relerr``: the
Triton rowwise mode's output against torch's. A measuring aid for BENCHMARKS.md
("block-scaled fp8 GEMM"), not a test.
"""

from __future__ import annotations

import statistics

import torch

from moewire.moe import block_fp8 as bf
from moewire.moe.stage import plan_device

H, I, E, K = 7168, 2048, 64, 8
#: Prefill tiles tried besides the table's: (BLOCK_N, GROUP_M, num_warps, num_stages, SWAP).
PREFILL_TILES = [(128, 8, 8, 3, False), (256, 8, 8, 3, False), (128, 8, 4, 4, False)]


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


def one_shape(t: int, n: int, c: int, g: torch.Generator) -> str:
    """Every timing of one token count and one projection (``n`` outputs, ``c`` inputs)."""
    ids = torch.rand(t, E, device="cuda", generator=g).argsort(dim=1)[:, :K]
    plan = plan_device(ids, 0, E, E)
    p = t * K
    a = torch.randn(p, c, device="cuda", generator=g).to(torch.float8_e4m3fn)
    w = (torch.randn(E, n, c, device="cuda", generator=g) * 0.5).to(torch.float8_e4m3fn)
    sa_r = torch.rand(p, device="cuda", generator=g) + 0.5
    sw_r = torch.rand(E, n, device="cuda", generator=g) + 0.5
    sa_b = torch.rand(p, c // 128, device="cuda", generator=g) + 0.5
    sw_b = torch.rand(E, n // 128, c // 128, device="cuda", generator=g) + 0.5
    flop = 2 * p * n * c

    def torch_mm():
        wt = w.transpose(-2, -1)
        return torch._scaled_grouped_mm(
            a, wt, sa_r, sw_r, offs=plan.offsets_L, out_dtype=torch.bfloat16
        )

    t_torch = event_us(torch_mm)
    ref = torch_mm().float()
    lines = [f"T={t} N={n} C={c} torch rowwise {t_torch:.1f} us {flop / t_torch / 1e6:.0f} TF"]
    bm = bf.block_m_for(plan.rows_per_expert)
    default = bf.BLOCK_FP8_TILES[bm]
    for cfg in [default, *(PREFILL_TILES if bm == bf.LARGE_BLOCK_M else [])]:
        bf.BLOCK_FP8_TILES[bm] = cfg
        out = bf.block_gemm(a, sa_r, w, sw_r, plan, rowwise=True).float()
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        tr = event_us(lambda: bf.block_gemm(a, sa_r, w, sw_r, plan, rowwise=True))
        tb = event_us(lambda: bf.block_gemm(a, sa_b, w, sw_b, plan))
        lines.append(f"{cfg}: rowwise {tr:.1f} ({flop / tr / 1e6:.0f} TF, relerr {err:.1e}) "
                     f"block {tb:.1f} ({flop / tb / 1e6:.0f} TF)")  # fmt: skip
    bf.BLOCK_FP8_TILES[bm] = default
    return "\n  ".join(lines)


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    for t in (8192, 1024, 64):
        for n, c in ((2 * I, H), (H, I)):
            print(one_shape(t, n, c, g), flush=True)


if __name__ == "__main__":
    main()
