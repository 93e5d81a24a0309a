"""Host time of one pack launch on the GPU, piece by piece (a measuring aid).

    PYTHONPATH=src python tools/launch_probe.py

Wall microseconds (median, GPU idle before each call) of ``WireSpec.pack``, of
``_triton.pack`` alone, of the kept kernel's ``Launch`` call with prepared arguments, of the
compiled launcher alone, of ``torch.empty`` and of an empty Triton kernel through
``JITFunction.run``; then a cProfile of ``WireSpec.pack``.
"""

from __future__ import annotations

import cProfile
import pstats

import torch
import triton

import moewire as mw
from moewire.bench.routines.quantize import host_us
from moewire.formats import _triton


@triton.jit
def _empty(x_ptr, n):
    pass


def probe(fmt: str, x: torch.Tensor) -> None:
    g = mw.nvfp4_global_scale(4.0) if fmt == "nvfp4" else None
    spec = mw.WireSpec(fmt, 7168, global_scale=g)
    rows = spec.pack(x)
    plan = _triton._pack_plan(spec, True)
    launch = plan.launch[True]
    res = {
        "WireSpec.pack": host_us(lambda: spec.pack(x, out=rows), 2000, 200),
        "_triton.pack": host_us(lambda: _triton.pack(spec, x, rows, {}), 2000, 200),
    }
    ex, ex_key = _triton._extra_args(plan.first, plan.unused, {}, rows)
    sx = x.stride()
    key = (x.dtype, True, True, *(_triton.int_key(v) for v in (*sx, rows.stride(0))), ex_key)
    grid = (plan.lay.n_groups, 64) if plan.lay.chunk_fast else (64, plan.lay.n_groups)
    args = (x, *sx, rows, rows.stride(0), *plan.scalars, ex)
    print(fmt, "compiled keys:", len(launch._compiled), "tail:", launch._tail, flush=True)
    if launch._compiled:
        dev_key = next(iter(launch._compiled))
        ck = launch._compiled[dev_key]
        res["Launch call"] = host_us(lambda: launch(grid, dev_key[1], *args), 2000, 200)
        stream = torch.cuda.current_stream().cuda_stream
        res["ck.run"] = host_us(
            lambda: ck.run(*grid, 1, stream, ck.function, ck.packed_metadata, None, None,
                           None, *args, *launch._tail), 2000, 200)  # fmt: skip
        print("key matches kept:", (torch.cuda.current_device(), key) in launch._compiled)
    res["torch.empty"] = host_us(lambda: torch.empty((64, spec.row_bytes), dtype=torch.uint8,
                                                      device="cuda"), 2000, 200)  # fmt: skip
    res["empty JIT kernel"] = host_us(lambda: _empty[(1,)](rows, 5), 2000, 200)
    print(fmt, "; ".join(f"{k} {v:.1f}" for k, v in res.items()), flush=True)
    prof = cProfile.Profile()
    for _ in range(500):
        prof.runcall(lambda: spec.pack(x, out=rows))
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def main() -> None:
    x = torch.randn(64, 7168, device="cuda").bfloat16()
    for fmt in ("nvfp4", "fp8", "bf16"):
        probe(fmt, x)


if __name__ == "__main__":
    main()
