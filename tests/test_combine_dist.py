"""Tier b: quantized combine (``combine_wire``) over gloo groups of 2, 3 and 4 ranks.

One spawned group per world size runs every case (token-count patterns with zero-token
ranks x backend x combine wire x partial dtype), each combine twice (determinism; each on
a fresh copy of the handle, ``dataclasses.replace(handle)``: a handle combines once). A
rank's partial row for a token is ``table[rank, gid]`` (``gid``: the token's global id,
carried in the dispatched rows), so the parent rebuilds every expected output itself, with
the reference codec: quantize each source's rows, dequantize, add in fp32 in source-rank
order, round once; and compares bitwise. The table has a NaN and an Inf entry (they must
come out non-finite) and all-zero rows.

Shape legend: ``G`` tokens over all ranks, ``T`` tokens on a rank, ``H`` hidden, ``W``
world size, ``K`` top-k.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

import moewire as mw
from moewire.comm import make_comm
from moewire.formats.combine import COMBINE_WIRES, combine_codec
from moewire.testing.data import heavy_tailed
from moewire.testing.spawn import run_distributed

HIDDEN = 64
TOP_K = 2
WIRES = tuple(w for w in COMBINE_WIRES if w != "bf16")
BACKENDS = ("allgather", "alltoall")
DTYPES = (torch.float32, torch.bfloat16)
COUNTS = {
    2: ((3, 0), (4, 5)),
    3: ((2, 0, 5), (0, 0, 0)),
    4: ((3, 0, 7, 1), (2, 2, 2, 2)),
}
ROW_SPEC = mw.WireSpec("bf16", 16, extras={"gid": (torch.int64, 1)})


@functools.cache
def _case(world_size: int, case: int) -> dict:
    counts = COUNTS[world_size][case]
    g = sum(counts)
    gen = torch.Generator().manual_seed(50 * world_size + case)
    table = heavy_tailed(world_size * max(g, 1), HIDDEN, generator=gen)
    table = table.reshape(world_size, max(g, 1), HIDDEN)[:, :g].clone()
    if g >= 3:
        table[0, 1, 3] = float("nan")
        table[world_size - 1, 2, 9] = float("inf")
        table[:, 0] = 0.0
    ids = torch.randint(0, 2 * world_size, (g, TOP_K), generator=gen)
    return {"counts": counts, "table": table, "ids": ids}


def _worker(world_size: int) -> dict:
    rank = dist.get_rank()
    out = {}
    for case in range(len(COUNTS[world_size])):
        data = _case(world_size, case)
        counts = data["counts"]
        lo = sum(counts[:rank])
        gid = torch.arange(lo, lo + counts[rank])[:, None]
        rows = ROW_SPEC.pack(torch.zeros(counts[rank], 16), gid=gid)
        for backend in BACKENDS:
            for wire in WIRES:
                comm = make_comm(backend, None, num_experts=2 * world_size, combine_wire=wire)
                recv, handle = comm.dispatch(rows, data["ids"][lo : lo + counts[rank]])
                got_gid = ROW_SPEC.unpack(recv).extras["gid"][:, 0]
                for dtype in DTYPES:
                    partial = data["table"][rank][got_gid].to(dtype)
                    first = comm.combine(partial, replace(handle))
                    again = comm.combine(partial, replace(handle))  # a handle combines once
                    out[(case, backend, wire, dtype)] = (first, again)
        try:
            make_comm("grouped", None, spec=ROW_SPEC, combine_wire="fp8")
            out["grouped"] = "no error"
        except ValueError as e:
            out["grouped"] = str(e)
        try:
            make_comm("allgather", None, combine_wire="int8")
            out["bad"] = "no error"
        except ValueError as e:
            out["bad"] = str(e)
    return out


@functools.cache
def _results(world_size: int) -> list[dict]:
    return run_distributed(_worker, world_size, world_size, timeout=240)


def _expected(world_size, case, backend, wire, dtype, rank) -> torch.Tensor:
    data = _case(world_size, case)
    counts = data["counts"]
    lo = sum(counts[:rank])
    gids = torch.arange(lo, lo + counts[rank])
    codec = combine_codec(wire, HIDDEN)
    acc = torch.zeros(counts[rank], HIDDEN)
    for src in range(world_size):  # source-rank order
        vals = codec.decode(codec.encode(data["table"][src][gids].to(dtype), backend="torch"))
        if backend == "alltoall":
            hit = (data["ids"][gids] // 2 == src).any(-1)
            vals = torch.where(hit[:, None], vals, 0.0)  # +0.0 leaves the sum unchanged
        acc = acc + vals
    return acc.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = torch.where(t.isnan(), torch.nan, t)
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_quantized_combine_bitwise(world_size):
    results = _results(world_size)
    for rank, res in enumerate(results):
        assert "combine_wire='fp8'" in res["grouped"] and "supports only" in res["grouped"]
        assert (
            "combine_wire must be one of ('bf16', 'fp8', 'mxfp8', 'nvfp4', 'mxfp4')" in res["bad"]
        )
        for case in range(len(COUNTS[world_size])):
            for backend in BACKENDS:
                for wire in WIRES:
                    for dtype in DTYPES:
                        key = (case, backend, wire, dtype)
                        first, again = res[key]
                        want = _expected(world_size, case, backend, wire, dtype, rank)
                        assert first.dtype == dtype and first.shape == want.shape, key
                        assert torch.equal(_bits(first), _bits(want)), (rank, key)
                        assert torch.equal(_bits(first), _bits(again)), (rank, key)
                        data = _case(world_size, case)
                        lo = sum(data["counts"][:rank])
                        table = data["table"][:, lo : lo + first.shape[0]]
                        if backend == "allgather":  # every source adds to every token
                            nonfinite = (~table.isfinite()).any(0)
                            assert first[nonfinite].isnan().all(), key
