"""Sweep the pack kernels' tiles (``moewire.formats._triton._TUNED``) on one GPU.

    PYTHONPATH=src python tools/pack_sweep.py [--tokens 8192] [--formats nvfp4 ...]

For each format and each (values per program, values per thread) pair, packs bf16
``x [T, 7168]`` into rows, checks the bytes against the committed tiles' output, and prints
the median time of one call (timed as ``moewire bench quantize`` does) and its share of the
device's copy bandwidth. The committed table is the best of such a sweep.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from moewire.bench.routines import quantize as qb
from moewire.formats import WireSpec, _triton, nvfp4_global_scale
from moewire.testing.data import heavy_tailed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=qb.HIDDEN)
    p.add_argument(
        "--formats", nargs="+", default=["fp8", "fp8_block128", "mxfp8", "nvfp4", "mxfp4"]
    )
    p.add_argument("--chunks", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--per-thread", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--groups", type=int, nargs="+", default=[1], help="chunks per program")
    p.add_argument("--depths", type=int, nargs="+", default=[1], help="chunks loaded ahead")
    p.add_argument(
        "--p-major",
        type=int,
        nargs="+",
        default=[0],
        choices=[0, 1],
        help="e4m3 word tiles with the block axis second (1) or first (0)",
    )
    p.add_argument(
        "--orders",
        nargs="+",
        default=["chunk", "token"],
        choices=["chunk", "token"],
        help="grid order: (n_groups, T), along a row first, or (T, n_groups), tokens first",
    )
    a = p.parse_args()
    dev = torch.device("cuda")
    flush = torch.empty(qb._FLUSH_BYTES, dtype=torch.uint8, device=dev)
    copy = qb._copy_gbps(a.iters, 3, flush)
    x = (heavy_tailed(a.tokens, a.hidden) * 3).to(dev, torch.bfloat16)
    g = nvfp4_global_scale(x.float().abs().amax())
    print(f"{torch.cuda.get_device_name(dev)}: copy {copy:.0f} GB/s, T={a.tokens}, H={a.hidden}")
    for fmt in a.formats:
        spec = WireSpec(fmt, a.hidden, global_scale=g if fmt == "nvfp4" else None)
        committed = _triton._TUNED[fmt]
        ref = spec.pack(x, backend="triton")
        rows = torch.empty_like(ref)
        nbytes = x.numel() * 2 + rows.numel()
        chunks = [0] if fmt == "fp8" else a.chunks
        pm = a.p_major if fmt in ("fp8", "fp8_block128", "mxfp8") else [0]
        grid = itertools.product(a.orders, chunks, a.per_thread, a.groups, a.depths, pm)
        for order, chunk, pt, grp, depth, pmaj in grid:
            tile = _triton._Tile(chunk, pt, order == "chunk", grp, depth, bool(pmaj))
            _triton._TUNED[fmt] = tile
            _triton._layout.cache_clear()
            lay = _triton._layout(spec)
            spec.pack(x, out=rows, backend="triton")
            ok = torch.equal(rows, ref)

            def call(spec=spec, rows=rows):
                spec.pack(x, out=rows, backend="triton")

            us = qb._time_us(call, a.iters, 3, flush)
            mark = " (committed)" if tile == committed else ""
            print(
                f"{fmt:13s} {order:5s} chunk={chunk:5d} per_thread={pt:3d} group={grp} "
                f"depth={depth} p_major={pmaj} warps={lay.num_warps:2d} "
                f"{us:7.1f} us {100 * nbytes / us / 1e3 / copy:5.1f}% of copy"
                f"{'' if ok else ' WRONG BYTES'}{mark}",
                flush=True,
            )
        _triton._TUNED[fmt] = committed
        _triton._layout.cache_clear()


if __name__ == "__main__":
    main()
