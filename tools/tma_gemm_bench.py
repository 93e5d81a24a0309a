"""A persistent TMA rowwise-fp8 grouped GEMM (an experiment kept with its measurement)
against ``torch._scaled_grouped_mm`` and ``torch._grouped_mm`` (bf16) on the same pairs.

    PYTHONPATH=src python tools/tma_gemm_bench.py [--tokens 8192 1024] [--tiles all]

The kernel: ``NUM_PROGS`` programs (one per SM) walk the output tiles of every expert,
reading the experts' row counts from the device offsets (no host sync) and finding each
tile's expert and first row as ``block_grouped_gemm_kernel`` does; operand tiles come
through tensor descriptors (TMA), optionally with Triton's warp specialization (``WS``).
It computes ``(a @ w.T) * sa * sw`` in fp32, rounded once to bf16 (bitwise
``torch._scaled_grouped_mm`` here). Measured on one H100 (BENCHMARKS.md, "a persistent
TMA fp8 GEMM"), it lost to torch's at 8192 tokens, so the library keeps torch's GEMMs there.

DeepSeek-R1 dims (hidden 7168, expert width 2048), 64 local experts, top-8, uniform random
routing; event-timed medians of 20 calls. ``exact``: the kernel's output equals torch's bit
for bit; ``relerr``: max abs difference over max abs. A measuring aid, not a test.
"""

from __future__ import annotations

import argparse
import functools

import torch
import triton
import triton.language as tl
from block_gemm_bench import event_us  # tools/, the script directory
from triton.tools.tensor_descriptor import TensorDescriptor

from moewire.constants import ceil_div
from moewire.formats._kernels.dequant import OUT_BF16, _store_out
from moewire.moe._kernels.gemm_block import _e4m3_tile, _tile_of
from moewire.moe.stage import DevicePlan, plan_device


@triton.jit
def _tile_counts(offs_ptr, L, BLOCK_M: tl.constexpr, LP: tl.constexpr):
    """The experts' first rows, end rows, and the prefix sum of their row tiles."""
    le = tl.arange(0, LP)
    ends = tl.load(offs_ptr + le, mask=le < L, other=0)
    starts = tl.load(offs_ptr + le - 1, mask=(le > 0) & (le < L), other=0)
    tiles = tl.where(le < L, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    return starts, ends, tl.cumsum(tiles, axis=0), tiles


@triton.jit
def tma_grouped_gemm_kernel(
    a_desc,
    sa_ptr,
    w_desc,
    sw_ptr,
    offs_ptr,
    out_ptr,
    N,
    C,
    L,
    NUM_PROGS,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    LP: tl.constexpr,
    HW: tl.constexpr,
    WS: tl.constexpr = False,
):
    """The tiles ``pid, pid + NUM_PROGS, ...`` (see the module docstring): ``a_desc`` over
    ``a [P, C]``, ``w_desc`` over ``w`` viewed ``[L * N, C]`` (blocks ``[BLOCK_M, BLOCK_K]``
    and ``[BLOCK_N, BLOCK_K]``), ``out [P, N]`` bf16 (an int16 view without ``HW``); ``N``
    a multiple of ``BLOCK_N``, ``C`` of ``BLOCK_K``. ``WS``: Triton's warp specialization
    of the tile loop (producer and consumer warps)."""
    starts, ends, last, tiles = _tile_counts(offs_ptr, L, BLOCK_M, LP)
    le = tl.arange(0, LP)
    MT = tl.sum(tiles, axis=0)
    NT = N // BLOCK_N
    KB = C // BLOCK_K
    for t in tl.range(tl.program_id(0), MT * NT, NUM_PROGS, flatten=not WS, warp_specialize=WS):
        tile, nt = _tile_of(t, MT, NT, GROUP_M)
        e = tl.sum((last <= tile).to(tl.int32), axis=0)
        here = le == e
        first_tile = tl.sum(tl.where(here, last - tiles, 0), axis=0)
        m0 = tl.sum(tl.where(here, starts, 0), axis=0) + (tile - first_tile) * BLOCK_M
        end = tl.sum(tl.where(here, ends, 0), axis=0)
        n0 = nt * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for kb in range(0, KB):
            a = _e4m3_tile(a_desc.load([m0, kb * BLOCK_K]), HW)
            w = _e4m3_tile(w_desc.load([e * N + n0, kb * BLOCK_K]), HW)
            acc = tl.dot(a, w.T, acc, max_num_imprecise_acc=BLOCK_K)
        rows = m0 + tl.arange(0, BLOCK_M)
        rm = rows < end
        cols = n0 + tl.arange(0, BLOCK_N)
        sa = tl.load(sa_ptr + rows, mask=rm, other=0.0)
        sw = tl.load(sw_ptr + e * N + cols)
        acc = (acc * sa[:, None]) * sw[None, :]
        o = rows.to(tl.int64)[:, None] * N + cols[None, :]
        _store_out(out_ptr, o, acc, rm[:, None], OUT_BF16, HW)


#: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages[, WS]) of the kernel.
TMA_TILE = (128, 256, 128, 8, 8, 3)


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def tma_fits(c: int, n: int, tile: tuple = TMA_TILE) -> bool:
    """Whether ``C`` and ``N`` fit the tile (whole K steps and column tiles)."""
    return c % tile[2] == 0 and n % tile[1] == 0


def tma_gemm(
    a_PC: torch.Tensor,
    sa_P: torch.Tensor,
    w_LNC: torch.Tensor,
    sw_LN: torch.Tensor,
    plan: DevicePlan,
    *,
    tile: tuple | None = None,
    num_progs: int | None = None,
) -> torch.Tensor:
    """bf16 ``[P, N]``: ``out[p] = (a[p] @ w[e(p)].T) * sa[p] * sw[e(p)]`` over the plan's
    groups (rows past ``plan.offsets_L[-1]`` unwritten). ``a`` float8_e4m3fn ``[P, C]``,
    ``w`` ``[L, N, C]``, both contiguous; ``sa`` fp32 ``[P]``, ``sw`` fp32 ``[L, N]``; ``C``
    and ``N`` fitting ``tile`` (:func:`tma_fits`). Triton on CUDA, or on CPU under
    ``TRITON_INTERPRET=1`` (``num_progs`` then defaults to 4)."""
    bm, bn, bk, group_m, warps, stages, *ws = tile or TMA_TILE
    p, c = a_PC.shape
    l, n, _ = w_LNC.shape
    if not tma_fits(c, n, (bm, bn, bk)):
        raise ValueError(f"tma_gemm: C={c} and N={n} must be multiples of {bk} and {bn}")
    hw = a_PC.is_cuda
    out = torch.empty((p, n), dtype=torch.bfloat16, device=a_PC.device)
    if not (p and l):
        return out
    raw = torch.float8_e4m3fn if hw else torch.uint8  # the interpreter has no fp8 dtype
    a_desc = TensorDescriptor(a_PC.view(raw), [p, c], [c, 1], [bm, bk])
    w_desc = TensorDescriptor(w_LNC.view(raw).view(l * n, c), [l * n, c], [c, 1], [bn, bk])
    progs = num_progs or (_num_sms(a_PC.device.index or 0) if hw else 4)
    progs = min(progs, (ceil_div(p, bm) + l) * (n // bn))
    tma_grouped_gemm_kernel[(progs,)](
        a_desc, sa_P, w_desc, sw_LN, plan.offsets_L, out if hw else out.view(torch.int16),
        n, c, l, progs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m,
        LP=max(16, 1 << (l - 1).bit_length()), HW=hw, WS=bool(ws and ws[0]), num_warps=warps,
        num_stages=stages,
    )  # fmt: skip
    return out


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
        if not tma_fits(c, n, tile):
            continue
        try:
            out = tma_gemm(a, sa, w, sw, plan, tile=tile)
            exact = torch.equal(out[:live], ref[:live])
            err = (out[:live].float() - ref[:live].float()).abs().max() / ref.float().abs().max()
            us = event_us(lambda tile=tile: tma_gemm(a, sa, w, sw, plan, tile=tile))
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
    tiles = TILES if args.tiles == "all" else [TMA_TILE]
    g = torch.Generator(device="cuda").manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for t in args.tokens:
        for n, c in ((2 * I, H), (H, I)):
            one_shape(t, n, c, tiles, g)


if __name__ == "__main__":
    main()
