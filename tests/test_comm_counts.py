"""``dispatch(rows, counts=...)`` and the agreement check that runs once per comm.

Tier a: ``counts`` validation and the check modes in one process. Tier b: one spawned gloo
group per world size (2, 3, 4) runs test_comm's count patterns (zero-token ranks, one rank
with every token, uniform, nobody with tokens) through every backend with ``counts`` given
(as a list and as a CPU tensor, on both send paths) and not given; the parent asserts the
received rows, handles and combines are bitwise those of the no-counts path and of the
single-process reference, that a counts dispatch after the first issues exactly one
collective (allgather), and that the errors name the values. Tier c (``gpu``): the counts
path under ``torch.cuda.set_sync_debug_mode("error")`` on a 1-rank NCCL group.

Shape legend: ``T`` tokens on one rank, ``N`` rows received, ``R`` row bytes, ``K`` top-k.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

import moewire as mw
from moewire.comm import COMMS, make_comm
from moewire.comm.agreement import CHECK_ENV, check_mode
from moewire.comm.counts import normalize_counts
from moewire.testing.spawn import run_distributed
from test_comm import (
    COUNTS,
    RUN_TIMEOUT_S,
    WORLD_SIZES,
    _case_data,
    _catch,
    _expected_rows,
    _handle_dict,
    _kw,
    _num_experts,
    _pack,
    _spec,
    _starts,
)

#: Formats through the counts path (dispatch only sees bytes: two widths are enough).
FORMATS = ("bf16", "nvfp4")
G = mw.nvfp4_global_scale(4.0)


# --------------------------------------------------------------------------- tier a
def test_normalize_counts_accepts_sequences_and_cpu_tensors():
    assert normalize_counts([3, 0, 2], 3, 1, 0) == (3, 0, 2)
    assert normalize_counts((3, 0), 2, 0, 3) == (3, 0)
    assert normalize_counts(torch.tensor([1, 4], dtype=torch.int32), 2, 1, 4) == (1, 4)


@pytest.mark.parametrize(
    ("counts", "match"),
    [
        ([3], r"one entry per rank \(world size 2\), got 1"),
        ([3, 1, 1], "got 3"),
        ([3, -1], "non-negative, got -1"),
        ([3, 1.5], "ints, got 1.5"),
        ([3, True], "ints, got True"),
        (torch.tensor([3.0, 1.0]), "integer tensor, got dtype torch.float32"),
        (torch.tensor([[3, 1]]), r"shape \(1, 2\)"),
        ("31", "sequence of ints"),
        (7, "sequence of ints"),
        ([4, 1], r"counts\[0\]=4 contradicts this rank's rows.shape\[0\]=3"),
    ],
)
def test_normalize_counts_rejects(counts, match):
    with pytest.raises(ValueError, match=match):
        normalize_counts(counts, 2, 0, 3)


def test_check_mode(monkeypatch):
    monkeypatch.delenv(CHECK_ENV, raising=False)
    assert check_mode("once") is False and check_mode("every_call") is True
    with pytest.raises(ValueError, match="'always'"):
        check_mode("always")
    monkeypatch.setenv(CHECK_ENV, "1")
    assert check_mode("once") is True


# --------------------------------------------------------------------------- the worker
def _gloo_ops(fn) -> int:
    """How many gloo collectives ``fn()`` issues (from the profiler's events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(ev.name.startswith("gloo:") for ev in prof.events())


def _one_case(name: str, spec: mw.WireSpec, data: dict, counts: tuple, world_size: int) -> dict:
    rank = dist.get_rank()
    lo = _starts(counts)[rank]
    mine = slice(lo, lo + counts[rank])
    ids_TK = data["ids"][mine]
    rows_TR = _pack(spec, data, mine)
    comm = make_comm(name, None, num_experts=_num_experts(world_size), spec=spec, **_kw(name))
    # counts first: the comm's first dispatch runs the full agreement check
    got_NR, handle = comm.dispatch(rows_TR, ids_TK, counts=list(counts))
    ref_NR, handle_ref = comm.dispatch(rows_TR, ids_TK)
    tensor_NR, _ = comm.dispatch(rows_TR, ids_TK, counts=torch.tensor(counts, dtype=torch.int32))
    buf = comm.dispatch_buffer(counts[rank], spec.row_bytes, "cpu", counts=counts)
    _pack(spec, data, mine, out=buf.rows)
    buf_NR, handle_buf = comm.dispatch(buf, ids_TK, counts=counts)
    res = {
        "ref": ref_NR,
        "counts": got_NR,
        "tensor": tensor_NR,
        "buffered": buf_NR,
        "handles": [_handle_dict(h) for h in (handle_ref, handle, handle_buf)],
        "ops": _gloo_ops(lambda: comm.dispatch(rows_TR, ids_TK, counts=counts)),
    }
    if spec.format == "bf16":
        gid_N = spec.unpack(ref_NR).extras["gid"][:, 0]
        partial_NC = data["table"][rank][gid_N].contiguous()
        res["combine"] = [comm.combine(partial_NC, h) for h in (handle_ref, handle, handle_buf)]
        if name != "grouped":
            quant = make_comm(
                name, None, num_experts=_num_experts(world_size), combine_wire="fp8", **_kw(name)
            )
            hq_ref = quant.dispatch(rows_TR, ids_TK)[1]
            hq = quant.dispatch(rows_TR, ids_TK, counts=counts)[1]
            res["combine_fp8"] = [quant.combine(partial_NC, h) for h in (hq_ref, hq)]
    return res


def _counts_worker(world_size: int) -> dict:
    out: dict = {}
    for case, counts in enumerate(COUNTS[world_size]):
        data = _case_data(world_size, case)
        for fmt in FORMATS:
            for name in COMMS:
                out[case, fmt, name] = _one_case(
                    name, _spec(fmt, world_size), data, counts, world_size
                )
    out["errors"] = _error_cases(world_size)
    return out


def _error_cases(world_size: int) -> dict[str, str]:
    """Errors with ``counts``: bad counts raise before any collective (here on every rank
    alike), so the group stays usable; disagreements raise on every rank naming values."""
    rank = dist.get_rank()
    errs: dict[str, str] = {}
    ok = [2] * world_size
    ids = torch.zeros(2, 1, dtype=torch.int64)  # every token to rank 0's experts
    spec16 = mw.WireSpec("fp8", 16)
    for name in COMMS:
        comm = make_comm(name, None, num_experts=world_size, spec=spec16)
        rows = torch.zeros(2, spec16.row_bytes, dtype=torch.uint8)
        for key, counts in (
            ("contradicts", [3] * world_size),
            ("length", ok[:-1]),
            ("negative", [2, -1, *ok[2:]]),
        ):
            errs[name, key] = _catch(lambda c=comm, r=rows, n=counts: c.dispatch(r, ids, counts=n))
        recv_NR, _ = comm.dispatch(rows, ids, counts=ok)
        errs[name, "after"] = f"received {recv_NR.shape[0]} rows"
    # top_k differs between ranks: the first counts dispatch names each rank's extras
    k = 8 if rank == 0 else 4
    extras = {"topk_ids": (torch.int32, k), "topk_weights": (torch.float32, k)}
    spec = mw.WireSpec("fp8", 64, extras=extras)
    comm = make_comm("allgather", None, spec=spec)
    rows_k = torch.zeros(1, spec.row_bytes, dtype=torch.uint8)
    errs["topk_once"] = _catch(lambda: comm.dispatch(rows_k, counts=[1] * world_size))
    # row width changes on one rank after an agreed first call: every_call catches it
    comm = make_comm("allgather", None, check="every_call")
    comm.dispatch(torch.zeros(2, 16, dtype=torch.uint8), counts=ok)
    width = 48 if rank == 0 else 16
    errs["width_every_call"] = _catch(
        lambda: comm.dispatch(torch.zeros(2, width, dtype=torch.uint8), counts=ok)
    )
    return errs


@functools.cache
def _results(world_size: int) -> list[dict]:
    return run_distributed(_counts_worker, world_size, world_size, timeout=RUN_TIMEOUT_S)


# --------------------------------------------------------------------------- tier b
@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_dispatch_with_counts_is_bitwise_the_exchange(world_size):
    results = _results(world_size)
    for case, counts in enumerate(COUNTS[world_size]):
        for fmt in FORMATS:
            for name in COMMS:
                for rank in range(world_size):
                    res = results[rank][case, fmt, name]
                    want_NR, _ = _expected_rows(world_size, case, fmt, name, rank)
                    where = (case, fmt, name, rank)
                    assert torch.equal(res["ref"], want_NR), where
                    for key in ("counts", "tensor", "buffered"):
                        assert torch.equal(res[key], res["ref"]), (*where, key)
                    ref_h, *others = res["handles"]
                    for h in others:
                        assert h.keys() == ref_h.keys()
                        for k in h:
                            same = torch.equal(h[k], ref_h[k]) if "index" in k else h[k] == ref_h[k]
                            assert same, (*where, k)
                    if name == "allgather":  # the rows' all-gather only (none if no rows)
                        assert res["ops"] == (1 if max(counts) else 0), where
                    if fmt == "bf16":
                        ref_c, *others_c = res["combine"]
                        assert all(torch.equal(c, ref_c) for c in others_c), where
                        if name != "grouped":
                            a, b = res["combine_fp8"]
                            assert torch.equal(a, b), where


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_counts_errors(world_size):
    per_rank = [r["errors"] for r in _results(world_size)]
    for rank, errs in enumerate(per_rank):
        for name in COMMS:
            assert errs[name, "contradicts"] == (
                f"ValueError: counts[{rank}]=3 contradicts this rank's rows.shape[0]=2 "
                f"(rank {rank}); counts must be every rank's token count"
            )
            assert "one entry per rank" in errs[name, "length"]
            assert "non-negative, got -1" in errs[name, "negative"]
            n = 2 * world_size if name != "alltoall" else 2 * world_size * (rank == 0)
            assert errs[name, "after"] == f"received {n} rows"
        assert errs["topk_once"].startswith(
            "ValueError: extras layout differs across ranks (rank 0: {topk_ids: int32[8], "
            "topk_weights: float32[8]}, rank 1: {topk_ids: int32[4], topk_weights: float32[4]}"
        ), errs["topk_once"]
        assert errs["width_every_call"].startswith(
            "ValueError: row width (bytes) differs across ranks (rank 0: 48, rank 1: 16"
        ), errs["width_every_call"]


# --------------------------------------------------------------------------- tier c
@pytest.mark.gpu
def test_counts_path_never_syncs_on_cuda(tmp_path):
    """A 1-rank NCCL group: after one eager dispatch (the agreement check, a host sync),
    pack, dispatch with ``counts``, dequantize and combine run under
    ``torch.cuda.set_sync_debug_mode("error")`` (any host sync raises) and return what the
    synchronizing path returns, bit for bit."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        torch.cuda.set_device(0)
        gen = torch.Generator().manual_seed(0)
        e, h = 16, 512
        spec = mw.WireSpec("nvfp4", h, global_scale=G, extras={"router_logits": (torch.float32, e)})
        for t in (64, 0):
            x_TH = torch.randn(t, h, generator=gen).to("cuda", torch.bfloat16)
            logits_TE = torch.randn(t, e, generator=gen).cuda()
            partial_TH = torch.randn(t, h, generator=gen).cuda().to(torch.bfloat16)
            for name, wire in (("allgather", "bf16"), ("allgather", "nvfp4"), ("grouped", "bf16")):
                comm = make_comm(name, None, spec=spec, combine_wire=wire)
                rows_TR = spec.pack(x_TH, router_logits=logits_TE)
                ref_NR, handle = comm.dispatch(rows_TR)  # eager: agreement + count exchange
                ref_TH = comm.combine(partial_TH, handle)
                ref_x = spec.dequantize(ref_NR)
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    rows2_TR = spec.pack(x_TH, router_logits=logits_TE)
                    recv_NR, handle2 = comm.dispatch(rows2_TR, counts=[t])
                    x2 = spec.dequantize(recv_NR)
                    y_TH = comm.combine(partial_TH, handle2)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                assert torch.equal(recv_NR, ref_NR), (name, wire, t)
                assert torch.equal(x2.view(torch.int16), ref_x.view(torch.int16)), (name, t)
                assert torch.equal(y_TH.view(torch.int16), ref_TH.view(torch.int16)), (name, wire)
    finally:
        dist.destroy_process_group()
