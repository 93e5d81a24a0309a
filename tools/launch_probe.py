"""Host time of one pack launch on the GPU, piece by piece (a measuring aid).

    PYTHONPATH=src python tools/launch_probe.py

Wall microseconds (median, GPU idle before each call) of ``WireSpec.pack``, of
``_triton.pack`` alone, of the kept kernel's ``Launch`` call with prepared arguments, of the
compiled launcher alone, of ``torch.empty`` and of an empty Triton kernel through
``JITFunction.run``, of the compiled launcher given data pointers as ints (Triton's
launcher then skips each tensor's ``data_ptr`` call and pointer check), of ``WireSpec.pack``
as the layer calls it (new output, a router-logits extra); then a cProfile of ``WireSpec.pack``.
Then, in a 1-rank NCCL group, the allgather comm's dispatch with counts against the group's
own all-gather of as many bytes (host time and CUDA-event time, as ``moewire bench
dispatch`` times it), and a cProfile of the dispatch.
"""

from __future__ import annotations

import cProfile
import os
import pstats

import torch
import torch.distributed as dist
import triton
from replay_timeline import _event_us  # tools/, the script directory

import moewire as mw
from moewire.bench.routines.quantize import host_us
from moewire.formats import _triton


@triton.jit
def _empty(x_ptr, n):
    pass


def _ints(a):
    """``a`` with every tensor replaced by its data pointer (an int)."""
    if isinstance(a, torch.Tensor):
        return a.data_ptr()
    if isinstance(a, tuple):
        return tuple(_ints(v) for v in a)
    return a


def probe_layer(fmt: str, x: torch.Tensor) -> None:
    """The pack as the layer calls it: a new output and a router-logits extra."""
    g = mw.nvfp4_global_scale(4.0) if fmt == "nvfp4" else None
    spec = mw.WireSpec(fmt, 7168, global_scale=g, extras={"router_logits": (torch.float32, 64)})
    logits = torch.randn(x.shape[0], 64, device="cuda")
    spec.pack(x, router_logits=logits)
    us = host_us(lambda: spec.pack(x, router_logits=logits), 2000, 200)
    print(fmt, f"layer-like WireSpec.pack (new out, logits extra) {us:.1f}", flush=True)


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
    ex = _triton._extra_args(plan.first, plan.unused, {}, rows)
    ex_key = _triton._extra_ptrs(plan.first, plan.unused, {}, rows.data_ptr())[1]
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
        iargs = tuple(_ints(a) for a in args)
        res["ck.run ints"] = host_us(
            lambda: ck.run(*grid, 1, stream, ck.function, ck.packed_metadata, None, None,
                           None, *iargs, *launch._tail), 2000, 200)  # fmt: skip
        print("key matches kept:", (torch.cuda.current_device(), key) in launch._compiled)
    res["torch.empty"] = host_us(lambda: torch.empty((64, spec.row_bytes), dtype=torch.uint8,
                                                      device="cuda"), 2000, 200)  # fmt: skip
    res["empty JIT kernel"] = host_us(lambda: _empty[(1,)](rows, 5), 2000, 200)
    print(fmt, "; ".join(f"{k} {v:.1f}" for k, v in res.items()), flush=True)
    prof = cProfile.Profile()
    for _ in range(500):
        prof.runcall(lambda: spec.pack(x, out=rows))
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def probe_dispatch(fmt: str, x: torch.Tensor) -> None:
    """The allgather comm's dispatch with counts at world size 1 (rows of ``fmt`` with a
    router-logits extra), against the group's own all-gather of the same bytes."""
    from moewire.comm import make_comm
    from moewire.comm._collectives import all_gather

    g = mw.nvfp4_global_scale(4.0) if fmt == "nvfp4" else None
    spec = mw.WireSpec(fmt, 7168, global_scale=g, extras={"router_logits": (torch.float32, 256)})
    rows = spec.pack(x, router_logits=torch.randn(x.shape[0], 256, device="cuda"))
    comm = make_comm("allgather", None, spec=spec)
    group = dist.group.WORLD
    counts = [x.shape[0]]
    flat = torch.zeros(rows.numel(), dtype=torch.uint8, device="cuda")
    out = torch.empty_like(flat)
    fns = {
        "comm.dispatch": lambda: comm.dispatch(rows, counts=counts),
        "group's own all-gather (bench reference)": lambda: dist.all_gather_into_tensor(
            out, flat, group=group
        ),
        "moewire all_gather": lambda: all_gather(out, flat, group),
        "moewire all_gather, new output": lambda: all_gather(torch.empty_like(out), flat, group),
        "torch.empty": lambda: torch.empty_like(rows),
    }
    for name, fn in fns.items():
        host = host_us(fn, 1000, 100)  # warms it up too
        print(f"{fmt} {name}: host {host:.1f} us, events {_event_us(fn, False, 500):.1f} us",
              flush=True)  # fmt: skip
    import moewire.comm.allgather as ag

    real, ag.all_gather = ag.all_gather, lambda out, inp, group: None
    try:
        print(f"{fmt} comm.dispatch without its all-gather: host "
              f"{host_us(fns['comm.dispatch'], 1000, 100):.1f} us", flush=True)  # fmt: skip
    finally:
        ag.all_gather = real
    prof = cProfile.Profile()
    for _ in range(500):
        prof.runcall(fns["comm.dispatch"])
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def main() -> None:
    x = torch.randn(64, 7168, device="cuda").bfloat16()
    for fmt in ("nvfp4", "fp8", "bf16"):
        probe(fmt, x)
        probe_layer(fmt, x)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    dist.init_process_group("nccl", rank=0, world_size=1)
    for fmt in ("fp8", "bf16"):
        probe_dispatch(fmt, x)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
