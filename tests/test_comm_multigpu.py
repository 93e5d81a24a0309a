"""Tier c of comm/: the tier-b invariants with NCCL at DeepSeek-R1 shapes, 2+ GPUs.

Run on every rank under torchrun (each rank runs the same tests in the same order):

    torchrun --nproc_per_node=4 -m pytest tests/test_comm_multigpu.py -m multigpu -q

Without torchrun (or with fewer than 2 GPUs) every test is skipped. Every rank builds the
same global inputs from one seed, so each checks its own received rows and combined sums
against a reference it computes alone: ``pack(allgather(x))`` (the whole batch packed on
one rank) restricted to the tokens that rank must receive.

Shape legend: ``G`` tokens over all ranks, ``T`` tokens on this rank, ``N`` rows received,
``H`` hidden, ``E`` experts, ``K`` top-k, ``C`` combine columns.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

import moewire as mw
from moewire.comm import COMMS, make_comm
from moewire.testing.spawn import init_group

pytestmark = [pytest.mark.multigpu, pytest.mark.timeout(600)]

HIDDEN, EXPERTS, TOP_K = 7168, 256, 8  # DeepSeek-R1
COLS = HIDDEN  # combine partials are [N, spec.hidden]
#: Tokens per rank, indexed by ``rank % 4``: uneven, a zero-token rank, a 1-token rank;
#: then uniform.
PATTERNS = ((4096, 0, 8192, 1), (2048, 2048, 2048, 2048))
ROUTINGS = ("logits", "topk")
#: CPU only to dry-run the test bodies on a gloo group where no GPU is present.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def group():
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        pytest.skip("run under torchrun --nproc_per_node=N (N >= 2)")
    if not dist.is_initialized():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        init_group(rank, world, "env://", device_type="cuda", timeout=300)
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.get_world_size() < 2:
        pytest.skip("needs 2+ ranks")
    return dist.group.WORLD


def _counts(pattern: int, world_size: int) -> tuple[int, ...]:
    return tuple(PATTERNS[pattern][r % 4] for r in range(world_size))


def _spec(routing: str) -> mw.WireSpec:
    if routing == "logits":
        extras = {"router_logits": (torch.float32, EXPERTS)}
    else:
        extras = {"topk_ids": (torch.int32, TOP_K), "topk_weights": (torch.float32, TOP_K)}
    return mw.WireSpec("nvfp4", HIDDEN, global_scale=mw.nvfp4_global_scale(8.0), extras=extras)


def _inputs(g: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(g, HIDDEN, generator=gen, device=DEVICE).to(torch.bfloat16)
    if g > 2:
        x[1, 7] = float("nan")
        x[2, 100] = float("inf")
    logits = torch.randn(g, EXPERTS, generator=gen, device=DEVICE)
    weights, ids = torch.topk(logits.softmax(-1), TOP_K, dim=-1)
    return {"x": x, "logits": logits, "ids": ids, "weights": weights}


def _pack(spec: mw.WireSpec, d: dict, sl, out=None) -> torch.Tensor:
    if "router_logits" in spec.extras:
        return spec.pack(d["x"][sl], out=out, router_logits=d["logits"][sl])
    return spec.pack(
        d["x"][sl], out=out, topk_ids=d["ids"][sl].to(torch.int32), topk_weights=d["weights"][sl]
    )


def _dest(ids_GK: torch.Tensor, world_size: int) -> torch.Tensor:
    mask = torch.zeros(ids_GK.shape[0], world_size, dtype=torch.bool, device=ids_GK.device)
    mask.scatter_(1, ids_GK // (EXPERTS // world_size), True)
    return mask


def _partial(gid_N: torch.Tensor, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """Integer-valued rows, sums exact in bf16: ``2^rank`` (bitmask of contributors),
    ``g % 13 + 1`` and 1 (count of contributions), repeated over ``COLS`` columns."""
    cols = torch.stack(
        [torch.full_like(gid_N, 2**rank), gid_N % 13 + 1, torch.ones_like(gid_N)], dim=1
    )
    return cols.repeat(1, COLS // 3 + 1)[:, :COLS].to(dtype)


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("pattern", range(len(PATTERNS)))
@pytest.mark.parametrize("name", COMMS)
def test_dispatch_combine_nccl(group, name, pattern, routing):
    rank, w = dist.get_rank(group), dist.get_world_size(group)
    counts = _counts(pattern, w)
    starts = [sum(counts[:r]) for r in range(w)]
    mine = slice(starts[rank], starts[rank] + counts[rank])
    g = sum(counts)
    data = _inputs(g, seed=17 + pattern)
    spec = _spec(routing)
    comm = make_comm(
        name,
        group,
        num_experts=EXPERTS,
        spec=spec,
        **({"src_index": True} if name == "alltoall" else {}),
    )
    if name == "alltoall":
        dest = _dest(data["ids"], w)
    else:
        dest = torch.ones(g, w, dtype=torch.bool, device=DEVICE)
    sel = dest[:, rank].nonzero()[:, 0]
    want_NR = _pack(spec, {k: v[sel] for k, v in data.items()}, slice(None))

    rows_TR = _pack(spec, data, mine)
    recv_NR, handle = comm.dispatch(rows_TR, data["ids"][mine])
    buf = comm.dispatch_buffer(counts[rank], spec.row_bytes, DEVICE)
    _pack(spec, data, mine, out=buf.rows)
    recv2_NR, _ = comm.dispatch(buf, data["ids"][mine])
    for got in (recv_NR, recv2_NR):
        assert torch.equal(got, want_NR)
        a, b = spec.dequantize(got, torch.float32), spec.dequantize(want_NR, torch.float32)
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    if name == "alltoall":
        owner = torch.repeat_interleave(torch.arange(w), torch.tensor(counts)).to(DEVICE)
        src_index = sel - torch.tensor(starts, device=DEVICE)[owner[sel]]
        assert torch.equal(handle.recv_src_index, src_index)

    gid_N = sel  # the global token id of each received row, in order
    want = torch.zeros(g, COLS, device=DEVICE)
    for d in range(w):
        m = dest[:, d]
        want[m] += _partial(torch.nonzero(m)[:, 0], d, torch.float32)
    for dtype in (torch.float32, torch.bfloat16):  # a fresh copy each: a handle combines once
        out_TH = comm.combine(_partial(gid_N, rank, dtype), replace(handle))
        assert out_TH.dtype == dtype and out_TH.shape == (counts[rank], COLS)
        assert torch.equal(out_TH.float(), want[mine])
    dist.barrier(group)
