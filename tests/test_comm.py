"""Tiers a and b of the communication backends (comm/): allgather, alltoall, grouped.

Tier b runs one spawned gloo group per world size (2, 3, 4) that goes through every case
(count patterns x formats x backends x both send paths x combine dtypes) and returns what
each rank saw; the tests below assert on those results in the parent. Everything a rank
sends is a pure function of ``(world_size, case, format)``, so the parent rebuilds the
expected bytes, routing and sums itself (``_case_data``), independently of the backends.

Shape legend: ``G`` tokens over all ranks, ``T`` tokens on one rank, ``N`` rows received,
``R`` row bytes, ``H`` hidden, ``E`` experts, ``K`` top-k, ``C`` combine columns.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

import moewire as mw
from moewire.comm import COMMS, AllGatherHandle, AllToAllHandle, CommHandle, make_comm
from moewire.comm.expert_ids import check_topk_ids
from moewire.comm.grouped import byte_ranges
from moewire.testing.spawn import run_distributed

HIDDEN = 128  # a multiple of every format's block (fp8_block128 needs 128)
TOP_K = 3
COLS = HIDDEN  # C, columns of the combine partials: the comms' spec.hidden
G_NVFP4 = mw.nvfp4_global_scale(4.0)
WORLD_SIZES = (2, 3, 4)
#: Per world size: per-rank token counts of each case (zero-token ranks, one rank with
#: every token, uniform counts, nobody with tokens).
COUNTS = {
    2: ((3, 0), (0, 7), (4, 4), (0, 0)),
    3: ((2, 0, 5), (0, 6, 0), (3, 3, 3), (1, 4, 2)),
    4: ((3, 0, 7, 1), (0, 0, 9, 0), (2, 2, 2, 2), (0, 0, 0, 0)),
}
#: Case index whose routing sends every token only to experts of rank 0 (skewed alltoall).
SKEWED_CASE = 1
RUN_TIMEOUT_S = 180


def _num_experts(world_size: int) -> int:
    return 2 * world_size


def _spec(fmt: str, world_size: int) -> mw.WireSpec:
    return mw.WireSpec(
        fmt,
        HIDDEN,
        global_scale=G_NVFP4 if fmt == "nvfp4" else None,
        extras={
            "router_logits": (torch.float32, _num_experts(world_size)),
            "topk_ids": (torch.int32, TOP_K),
            "topk_weights": (torch.bfloat16, TOP_K),
            "gid": (torch.int64, 1),
        },
    )


@functools.cache
def _case_data(world_size: int, case: int) -> dict[str, torch.Tensor]:
    """The global inputs of one case: ``x [G, H]`` fp32 (with a NaN row and an Inf),
    ``logits [G, E]``, ``ids [G, K]`` int64, ``weights [G, K]`` bf16, ``gid [G, 1]`` int64,
    and ``table [W, G, C]`` fp32 random partial rows (rank d's partial for token g)."""
    counts = COUNTS[world_size][case]
    g = sum(counts)
    e = _num_experts(world_size)
    gen = torch.Generator().manual_seed(1000 * world_size + case)
    x = torch.randn(g, HIDDEN, generator=gen) * 3
    if g > 2:
        x[1, 5] = float("nan")
        x[2, 0] = float("-inf")
    ids = torch.randint(0, e, (g, TOP_K), generator=gen)
    if case == SKEWED_CASE:
        ids = ids % (e // world_size)
    return {
        "x": x,
        "logits": torch.randn(g, e, generator=gen),
        "ids": ids,
        "weights": torch.rand(g, TOP_K, generator=gen).to(torch.bfloat16),
        "gid": torch.arange(g, dtype=torch.int64)[:, None],
        "table": torch.randn(world_size, g, COLS, generator=gen),
    }


def _starts(counts: tuple[int, ...]) -> list[int]:
    return [sum(counts[:r]) for r in range(len(counts))]


def _pack(spec: mw.WireSpec, data: dict, sl: slice, out: torch.Tensor | None = None):
    return spec.pack(
        data["x"][sl],
        out=out,
        router_logits=data["logits"][sl],
        topk_ids=data["ids"][sl].to(torch.int32),
        topk_weights=data["weights"][sl],
        gid=data["gid"][sl],
    )


def _dest_ranks(ids_GK: torch.Tensor, world_size: int) -> torch.Tensor:
    """bool ``[G, W]``: rank d hosts at least one of token g's experts."""
    per_rank = _num_experts(world_size) // world_size
    mask = torch.zeros(ids_GK.shape[0], world_size, dtype=torch.bool)
    mask.scatter_(1, ids_GK // per_rank, True)
    return mask


def _exact_partial(gid_N: torch.Tensor, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """Integer-valued partial rows whose sums are exact in ``dtype``: column 0 is ``2^rank``
    (the sum is the bitmask of contributing ranks), column 1 ``g % 13 + 1``, column 2 the
    constant 1 (the count of contributions), column 3 ``rank + 1``, the rest 0."""
    n = gid_N.shape[0]
    out = torch.zeros(n, COLS, dtype=torch.float32)
    out[:, 0] = 2.0**rank
    out[:, 1] = (gid_N % 13 + 1).float()
    out[:, 2] = 1.0
    out[:, 3] = rank + 1.0
    return out.to(dtype)


# --------------------------------------------------------------------------- the worker
def _comm_worker(world_size: int) -> dict:
    """Every case on this rank; returns ``{key: tensors}`` for the parent to check."""
    rank = dist.get_rank()
    e = _num_experts(world_size)
    out: dict = {}
    for case, counts in enumerate(COUNTS[world_size]):
        data = _case_data(world_size, case)
        lo = _starts(counts)[rank]
        mine = slice(lo, lo + counts[rank])
        ids_TK = data["ids"][mine]
        for fmt in mw.FORMATS:
            spec = _spec(fmt, world_size)
            rows_TR = _pack(spec, data, mine)
            out["sent", case, fmt] = rows_TR
            for name in COMMS:
                comm = make_comm(name, None, num_experts=e, spec=spec, **_kw(name))
                ids = ids_TK.to(torch.int32) if fmt == "nvfp4" else ids_TK
                recv_NR, handle = comm.dispatch(rows_TR, ids)
                # the in-place path: pack straight into the buffer dispatch sends
                buf = comm.dispatch_buffer(counts[rank], spec.row_bytes, "cpu")
                _pack(spec, data, mine, out=buf.rows)
                recv2_NR, handle2 = comm.dispatch(buf, ids)
                res = {
                    "recv": recv_NR,
                    "recv_buffered": recv2_NR,
                    "handle": _handle_dict(handle),
                    "handle_buffered": _handle_dict(handle2),
                }
                if name == "allgather":
                    res["slot_in_buffer"] = _aliases(buf.rows, buf.buffer)
                if fmt != "bf16":  # combine does not depend on the format: check it once
                    out["recv", case, fmt, name] = res
                    continue
                gid_N = spec.unpack(recv_NR).extras["gid"][:, 0]
                # three combines of one dispatch: a fresh copy of the handle for each
                for dtype in (torch.float32, torch.bfloat16):
                    partial_NC = _exact_partial(gid_N, rank, dtype)
                    res["exact", dtype] = comm.combine(partial_NC, replace(handle))
                partial_NC = data["table"][rank][gid_N].contiguous()
                res["random"] = comm.combine(partial_NC, replace(handle))
                out["recv", case, fmt, name] = res
    out["errors"] = _error_cases(world_size)
    out["fallback"] = _fallback_case(world_size)
    return out


def _kw(name: str) -> dict:
    return {"src_index": True} if name == "alltoall" else {}


def _aliases(view: torch.Tensor, base: torch.Tensor | None) -> bool:
    if base is None or view.numel() == 0:
        return base is not None
    lo, hi = base.data_ptr(), base.data_ptr() + base.numel()
    return lo <= view.data_ptr() < hi


def _handle_dict(h: CommHandle) -> dict:
    d = {
        "type": type(h).__name__,
        "num_tokens": h.num_tokens,
        "send_counts": h.send_counts,
        "recv_counts": h.recv_counts,
    }
    if isinstance(h, AllToAllHandle):
        d["send_src_index"] = h.send_src_index
        d["recv_src_index"] = h.recv_src_index
    if isinstance(h, AllGatherHandle):
        d["max_count"] = h.max_count
    return d


def _catch(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def _error_cases(world_size: int) -> dict[str, str]:
    """User errors raised inside a live group; each must raise on every rank alike (or
    before any collective), so the group stays usable for the next case."""
    rank = dist.get_rank()
    e = _num_experts(world_size)
    errs = {}
    a2a = make_comm("alltoall", None, num_experts=e)
    rows = torch.zeros(2, 32, dtype=torch.uint8)
    ids = torch.zeros(2, TOP_K, dtype=torch.int64)
    errs["a2a_no_ids"] = _catch(lambda: a2a.dispatch(rows))
    bad = ids.clone()
    bad[0, 1], bad[1, 2] = -1, e + 5
    errs["a2a_bad_ids"] = _catch(lambda: a2a.dispatch(rows, bad))
    errs["a2a_float_ids"] = _catch(lambda: a2a.dispatch(rows, ids.float()))
    errs["a2a_ids_rows"] = _catch(lambda: a2a.dispatch(rows, ids[:1]))
    for name in ("allgather", "alltoall"):
        comm = make_comm(name, None, num_experts=e)
        width = 32 if rank == 0 else 48
        errs[f"{name}_width"] = _catch(
            lambda c=comm, w=width: c.dispatch(torch.zeros(1, w, dtype=torch.uint8), ids[:1])
        )
    spec = _spec("fp8", world_size)
    grouped = make_comm("grouped", None, spec=spec)
    errs["grouped_spec_width"] = _catch(lambda: grouped.dispatch(rows))
    errs["grouped_no_spec"] = _catch(lambda: make_comm("grouped", None))
    errs["a2a_no_experts"] = _catch(lambda: make_comm("alltoall", None))
    errs["a2a_indivisible"] = _catch(lambda: make_comm("alltoall", None, num_experts=e + 1))
    errs["unknown_option"] = _catch(lambda: make_comm("allgather", None, src_index=True))
    ag = make_comm("allgather", None)
    recv, handle = ag.dispatch(torch.zeros(2, 16, dtype=torch.uint8))
    n = recv.shape[0]
    errs["combine_dtype"] = _catch(lambda: ag.combine(torch.zeros(n, 4, dtype=torch.int32), handle))
    errs["combine_rows"] = _catch(lambda: ag.combine(torch.zeros(n + 1, 4), handle))
    errs["combine_handle"] = _catch(lambda: a2a.combine(torch.zeros(n, 4), handle))
    errs["rows_dtype"] = _catch(lambda: ag.dispatch(torch.zeros(2, 16)))
    errs["rows_dim"] = _catch(lambda: ag.dispatch(torch.zeros(16, dtype=torch.uint8)))
    return errs


def _fallback_case(world_size: int) -> dict:
    """allgather with the gloo fallbacks forced (all_gather into views; all_reduce + slice)."""
    from moewire.comm import _collectives

    rank = dist.get_rank()
    counts = COUNTS[world_size][0]
    data = _case_data(world_size, 0)
    lo = _starts(counts)[rank]
    spec = _spec("mxfp4", world_size)
    rows = _pack(spec, data, slice(lo, lo + counts[rank]))
    comm = make_comm("allgather", None, spec=spec)
    keys = {("gloo", "all_gather"), ("gloo", "reduce_scatter")}
    _collectives._UNSUPPORTED.update(keys)
    try:
        recv, handle = comm.dispatch(rows)
        gid = spec.unpack(recv).extras["gid"][:, 0]
        summed = comm.combine(_exact_partial(gid, rank, torch.float32), handle)
    finally:
        _collectives._UNSUPPORTED.difference_update(keys)
    return {"recv": recv, "combine": summed}


@functools.cache
def _results(world_size: int) -> list[dict]:
    return run_distributed(_comm_worker, world_size, world_size, timeout=RUN_TIMEOUT_S)


# --------------------------------------------------------------------------- expectations
def _expected_rows(world_size: int, case: int, fmt: str, name: str, rank: int):
    """``(rows [N, R], gid [N])`` rank ``rank`` must receive from ``name``'s dispatch."""
    data = _case_data(world_size, case)
    spec = _spec(fmt, world_size)
    g = data["x"].shape[0]
    if name == "alltoall":
        sel = _dest_ranks(data["ids"], world_size)[:, rank].nonzero()[:, 0]
    else:
        sel = torch.arange(g)
    # pack(allgather(x)): quantize the gathered activations in one go, on one process
    rows = _pack(spec, {k: v[sel] for k, v in data.items() if k != "table"}, slice(None))
    return rows, sel


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _cases(world_size: int):
    return range(len(COUNTS[world_size]))


# --------------------------------------------------------------------------- tier a
def test_make_comm_needs_initialized_group():
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        make_comm("allgather")


def test_make_comm_unknown_name():
    with pytest.raises(ValueError, match="'ring'"):
        make_comm("ring")


def test_comms_names():
    assert COMMS == ("allgather", "alltoall", "grouped")
    assert mw.COMMS == COMMS and mw.make_comm is make_comm


@pytest.mark.parametrize("fmt", mw.FORMATS)
def test_byte_ranges_tile_the_row(fmt):
    spec = _spec(fmt, 4)
    ranges = byte_ranges(spec)
    assert ranges[0][1] == 0 and ranges[-1][2] == spec.row_bytes
    assert all(a[2] == b[1] for a, b in itertools.pairwise(ranges))
    assert {n for n, _, _ in ranges} <= set(spec.sections)
    assert len(ranges) == len(spec.sections) - (fmt == "bf16")  # bf16 has no scales


def test_check_topk_ids():
    ids = torch.tensor([[0, 3], [7, 2]])
    assert check_topk_ids(ids, 8, num_tokens=2) is ids
    with pytest.raises(ValueError, match=r"\[-2, 8\]"):
        check_topk_ids(torch.tensor([[0, -2], [8, 1]]), 8, num_tokens=2)
    with pytest.raises(TypeError, match="int32 or int64"):
        check_topk_ids(ids.float(), 8, num_tokens=2)
    with pytest.raises(ValueError, match="T=3"):
        check_topk_ids(ids, 8, num_tokens=3)


def test_handle_is_frozen_and_validated():
    h = CommHandle(num_tokens=2, send_counts=(2, 2), recv_counts=(2, 0), device=torch.device("cpu"))
    assert h.num_recv == 2
    with pytest.raises(AttributeError):
        h.num_tokens = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="recv_counts"):
        CommHandle(num_tokens=2, send_counts=(2, 2), recv_counts=[2, 0], device=h.device)
    with pytest.raises(ValueError, match="one entry per rank"):
        CommHandle(num_tokens=2, send_counts=(2,), recv_counts=(2, 0), device=h.device)


def test_trusted_handle_equals_a_checked_one():
    """A backend's handle, built without ``__init__``'s checks, is the same object a checked
    construction gives: every field, uncombined, frozen, and ``dataclasses.replace`` (what a
    repeated combine passes) still checks."""
    fields = dict(num_tokens=3, send_counts=(3, 3), recv_counts=(3, 0), device=torch.device("cpu"),
                  max_count=3, padded_index=torch.arange(3))  # fmt: skip
    fast, checked = AllGatherHandle._trusted(**fields), AllGatherHandle(**fields)
    assert type(fast) is AllGatherHandle
    assert vars(fast) == vars(checked) and not fast.combined and fast.num_recv == 3
    with pytest.raises(AttributeError):
        fast.num_tokens = 4  # type: ignore[misc]
    again = replace(fast)
    assert vars(again) == vars(checked) and again is not fast
    with pytest.raises(ValueError, match="recv_counts"):
        replace(fast, recv_counts=[3, 0])


# --------------------------------------------------------------------------- tier b
@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name", COMMS)
@pytest.mark.parametrize("fmt", mw.FORMATS)
def test_dispatch_bitwise(world_size, name, fmt):
    """Received rows equal the senders' bytes, in the documented order, on both send paths;
    ``dequantize(dispatch(pack(x))) == dequantize(pack(allgather(x)))`` bit for bit."""
    results = _results(world_size)
    spec = _spec(fmt, world_size)
    for case in _cases(world_size):
        counts = COUNTS[world_size][case]
        sent = torch.cat([results[r]["sent", case, fmt] for r in range(world_size)])
        for rank in range(world_size):
            res = results[rank]["recv", case, fmt, name]
            want_rows, sel = _expected_rows(world_size, case, fmt, name, rank)
            assert torch.equal(sent[sel], want_rows)  # row-local: per-rank pack == global pack
            for key in ("recv", "recv_buffered"):
                got = res[key]
                assert got.dtype == torch.uint8 and got.shape == want_rows.shape, (case, key)
                assert torch.equal(got, want_rows), (case, rank, key)
                for dtype in (torch.bfloat16, torch.float32):
                    assert torch.equal(
                        _bits(spec.dequantize(got, dtype)), _bits(spec.dequantize(want_rows, dtype))
                    )
            h, h2 = res["handle"], res["handle_buffered"]
            assert h.keys() == h2.keys()
            for k in h:
                same = torch.equal(h[k], h2[k]) if "index" in k else h[k] == h2[k]
                assert same, (case, rank, k)
            assert h["num_tokens"] == counts[rank]
            assert sum(h["recv_counts"]) == len(sel)
            if name == "alltoall":
                _check_alltoall_handle(world_size, case, rank, h, sel)
            else:
                assert h["recv_counts"] == counts
                assert h["send_counts"] == (counts[rank],) * world_size
                assert h["max_count"] == max(counts)
            if name == "allgather":
                assert res["slot_in_buffer"], "dispatch_buffer must hand out a slot of the buffer"


def _check_alltoall_handle(world_size, case, rank, h, sel):
    data = _case_data(world_size, case)
    counts = COUNTS[world_size][case]
    starts = _starts(counts)
    owner = torch.repeat_interleave(torch.arange(world_size), torch.tensor(counts))
    dest = _dest_ranks(data["ids"], world_size)
    assert h["recv_counts"] == tuple(int((owner[sel] == s).sum()) for s in range(world_size))
    mine = slice(starts[rank], starts[rank] + counts[rank])
    assert h["send_counts"] == tuple(dest[mine].sum(0).tolist())
    want_send = torch.cat(
        [dest[mine][:, d].nonzero()[:, 0] for d in range(world_size)]
        + [torch.empty(0, dtype=torch.int64)]
    )
    assert torch.equal(h["send_src_index"], want_send)
    assert torch.equal(h["recv_src_index"], sel - torch.tensor(starts)[owner[sel]])


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name", COMMS)
def test_combine_sums(world_size, name):
    """Every token comes back exactly once with the exact sum over the ranks that got it;
    random fp32 partials match a fixed-order reference (bitwise for alltoall)."""
    results = _results(world_size)
    for case in _cases(world_size):
        counts = COUNTS[world_size][case]
        data = _case_data(world_size, case)
        g = data["x"].shape[0]
        if name == "alltoall":
            dest = _dest_ranks(data["ids"], world_size)
        else:
            dest = torch.ones(g, world_size, dtype=torch.bool)
        starts = _starts(counts)
        gid = torch.arange(g)
        want = torch.zeros(g, COLS)
        ref = torch.zeros(g, COLS)
        for d in range(world_size):
            m = dest[:, d]
            want[m] += _exact_partial(gid[m], d, torch.float32)
            ref[m] += data["table"][d][m]  # fp32, rank order, starting from zero
        assert torch.all(dest.sum(1) >= 1)
        for rank in range(world_size):
            res = results[rank]["recv", case, "bf16", name]
            mine = slice(starts[rank], starts[rank] + counts[rank])
            for dtype in (torch.float32, torch.bfloat16):
                got = res["exact", dtype]
                assert got.dtype == dtype and got.shape == (counts[rank], COLS), (case, dtype)
                assert torch.equal(got.float(), want[mine]), (case, rank, dtype)
            rnd = res["random"]
            assert rnd.dtype == torch.float32 and rnd.shape == (counts[rank], COLS)
            if name == "alltoall":
                assert torch.equal(rnd, ref[mine])
            else:  # gloo's reduction order is its own
                torch.testing.assert_close(rnd, ref[mine], rtol=1e-6, atol=1e-6)


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_alltoall_sends_each_token_once_per_rank(world_size):
    """A token goes once to each rank hosting one of its experts, never to another rank;
    in the skewed case every token goes to rank 0 only."""
    results = _results(world_size)
    for case in _cases(world_size):
        data = _case_data(world_size, case)
        dest = _dest_ranks(data["ids"], world_size)
        for rank in range(world_size):
            recv = results[rank]["recv", case, "bf16", "alltoall"]["recv"]
            gid = _spec("bf16", world_size).unpack(recv).extras["gid"][:, 0]
            assert gid.unique().numel() == gid.numel()
            assert torch.equal(gid, dest[:, rank].nonzero()[:, 0])
            if case == SKEWED_CASE and rank:
                assert gid.numel() == 0


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_gloo_fallbacks(world_size):
    results = _results(world_size)
    spec = _spec("mxfp4", world_size)
    counts = COUNTS[world_size][0]
    want, _ = _expected_rows(world_size, 0, "mxfp4", "allgather", 0)
    starts = _starts(counts)
    gid = torch.arange(sum(counts))
    total = sum(_exact_partial(gid, d, torch.float32) for d in range(world_size))
    for rank in range(world_size):
        res = results[rank]["fallback"]
        assert torch.equal(res["recv"], want)
        assert torch.equal(spec.unpack(res["recv"]).extras["gid"][:, 0], gid)
        assert torch.equal(res["combine"], total[starts[rank] : starts[rank] + counts[rank]])


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_user_errors(world_size):
    """Bad input raises ValueError/TypeError naming the values, on every rank alike."""
    per_rank = [results["errors"] for results in _results(world_size)]
    e = _num_experts(world_size)
    for errs in per_rank:
        assert errs == per_rank[0]  # every rank raised the same error
    errs = per_rank[0]
    assert errs["a2a_no_ids"].startswith("ValueError") and "topk_ids" in errs["a2a_no_ids"]
    assert errs["a2a_bad_ids"].startswith("ValueError") and f"[-1, {e + 5}]" in errs["a2a_bad_ids"]
    assert errs["a2a_float_ids"].startswith("TypeError")
    assert errs["a2a_ids_rows"].startswith("ValueError")
    for name in ("allgather", "alltoall"):
        msg = errs[f"{name}_width"]
        assert msg.startswith("ValueError") and "rank 0: 32" in msg and "rank 1: 48" in msg
    assert "row_bytes=" in errs["grouped_spec_width"]
    assert "spec" in errs["grouped_no_spec"]
    assert "num_experts" in errs["a2a_no_experts"]
    assert f"num_experts={e + 1}" in errs["a2a_indivisible"]
    assert errs["unknown_option"].startswith("TypeError")
    assert errs["combine_dtype"].startswith("TypeError")
    assert errs["combine_rows"].startswith("ValueError")
    assert errs["combine_handle"].startswith("TypeError")
    assert errs["rows_dtype"].startswith("TypeError") and errs["rows_dim"].startswith("ValueError")


# --------------------------------------------------------------------------- the helper
def _raise_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise KeyError("boom on rank 1")
    dist.barrier()  # rank 0 waits for a peer that never comes: the helper must not hang


def _hang() -> None:
    if dist.get_rank() == 0:
        import time

        time.sleep(60)
    dist.barrier()


@pytest.mark.timeout(90)
def test_helper_reraises_worker_exception():
    with pytest.raises(KeyError, match="boom on rank 1") as info:
        run_distributed(_raise_on_rank_one, 2, timeout=60)
    assert "rank 1 of 2" in str(info.value.__cause__)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_helper_times_out():
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\]|ranks \[0\]"):
        run_distributed(_hang, 2, timeout=8)
