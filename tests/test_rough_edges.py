"""Tier a and b: the first-hour rough edges (issue 18). Each error names its cause in one
line; nothing is accepted silently, and nothing warns on the way to the right error."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

import moewire as mw
from moewire.bench.runner import _user_error
from moewire.cli import main
from moewire.comm import COMMS, make_comm
from moewire.formats.elements import encode_e2m1
from moewire.testing.spawn import RankOutcome, run_distributed

H, I, E, K = 64, 32, 4, 2


def _cfg() -> mw.MoEConfig:
    return mw.MoEConfig(
        hidden=H, intermediate=I, num_experts=E, top_k=K, router="softmax", renormalize=True
    )


def _weights() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)


@pytest.mark.parametrize("amax", [1e-40, 1e-300, 1e300])
def test_global_scale_out_of_fp32_range_is_a_clean_error(amax):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="no usable fp32 global scale"):
            mw.nvfp4_global_scale(amax)


@pytest.mark.parametrize("g", [1e300, 1e-40, 1e-50])
def test_wirespec_global_scale_out_of_range_no_warning(g):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="global_scale must be finite and > 0, an fp32"):
            mw.WireSpec("nvfp4", H, global_scale=g)


def test_encode_e2m1_non_contiguous_input_does_not_warn():
    v_TH = torch.randn(8, 6).t()  # a transposed view
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        codes = encode_e2m1(v_TH)
    assert torch.equal(codes, encode_e2m1(v_TH.contiguous()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_fp8_experts_without_cuda_is_a_construction_error():
    with pytest.raises(ValueError, match=r"experts=.fp8.*fp8_loop"):
        mw.EPMoE(_cfg(), comm="local", wire="fp8", experts="fp8")
    layer = mw.EPMoE(_cfg(), comm="local", wire="fp8", experts="fp8_loop")  # runs anywhere
    layer.load_experts(*_weights())
    assert layer(torch.randn(3, H), torch.randn(3, E)).shape == (3, H)


def test_epmoe_without_process_group_names_the_fix():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"init_process_group.*comm='local'"):
        mw.EPMoE(_cfg(), None, wire="bf16", comm="allgather")


def test_calibration_on_all_nan_says_nan():
    layer = mw.EPMoE(_cfg(), comm="local", wire="nvfp4")
    layer.load_experts(*_weights())
    with pytest.raises(ValueError, match="every rank's x was NaN/Inf or zero"):
        layer(torch.full((3, H), float("nan")), torch.randn(3, E))
    with pytest.raises(ValueError, match=r"every rank's x was zero \(or empty\)"):
        layer(torch.zeros(3, H), torch.randn(3, E))


def test_calibrated_global_scale_is_in_state_dict():
    w13, w2 = _weights()
    lazy = mw.EPMoE(_cfg(), comm="local", wire="nvfp4")
    lazy.load_experts(w13, w2)
    assert int(lazy.state_dict()["global_scale_bits"]) == 0  # not calibrated yet
    x, logits = torch.randn(5, H) * 3, torch.randn(5, E)
    y = lazy(x, logits)
    state = lazy.state_dict()
    g = float(state["global_scale_bits"].view(torch.float32))
    assert g == lazy.spec.global_scale
    restored = mw.EPMoE(_cfg(), comm="local", wire="nvfp4")
    restored.load_experts(w13, w2)
    restored.load_state_dict(state)
    assert restored.spec.global_scale == g
    restored.to(torch.bfloat16)  # a dtype cast must not round the scale
    assert restored.spec.global_scale == g
    assert torch.equal(restored(x, logits), y)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["bench", "quantize", "--tokens", "0"], "routine quantize needs at least one --tokens"),
        (["bench", "--world-size", "0"], "--world-size must be >= 1, got 0"),
        (["formats", "--topk", "9", "--experts", "8"], "--topk 9 is more than --experts 8"),
    ],
)
def test_cli_bad_arguments_are_one_line_errors(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_worker_value_error_comes_back_as_one_line():
    e = _user_error(RankOutcome(1, 1234, 1, error=ValueError("bad hidden"), traceback="tb"))
    assert isinstance(e, ValueError) and str(e) == "rank 1: bad hidden"
    other = RankOutcome(0, 1, 1, error=KeyError("x"), traceback="Traceback\nKeyError: 'x'\n")
    assert _user_error(other) is None  # a bug keeps its traceback


def _rank_one_rejects(ctx) -> None:
    if ctx.rank == 1:
        raise ValueError("bad hidden")
    dist.barrier()  # rank 0 waits for a peer that never comes: the launcher must not hang


def test_launch_reports_a_worker_value_error_once():
    from types import SimpleNamespace

    from moewire.bench.runner import launch

    args = SimpleNamespace(device="cpu", world_size=2, timeout=30.0)
    with pytest.raises(ValueError, match=r"^rank 1: bad hidden$"):
        launch(_rank_one_rejects, args)


# ------------------------------------------------------------------ combine: handle, width
@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


ROW_SPEC = mw.WireSpec("bf16", H)


def _dispatched(name: str, t: int, spec: mw.WireSpec | None = ROW_SPEC):
    """A comm of ``name`` (with ``spec``), its received rows and handle for ``t`` tokens;
    token ``i`` routes to experts ``2i % E, 2i % E + 1`` (one rank of 2)."""
    comm = make_comm(name, None, spec=spec, num_experts=E)
    rows_TR = ROW_SPEC.pack(torch.randn(t, H))
    recv_NR, handle = comm.dispatch(rows_TR, torch.arange(t * K).view(t, K) % E)
    return comm, recv_NR, handle


def _error(fn, *args) -> str:
    try:
        fn(*args)
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("name", COMMS)
def test_combine_twice_on_one_handle_is_an_error(one_rank_group, name):
    comm, recv_NR, handle = _dispatched(name, 3)
    fresh = replace(handle)  # made before the combine: a copy is a fresh, unused handle
    partial_NH = torch.randn(recv_NR.shape[0], H)
    first = comm.combine(partial_NH, handle)
    msg = _error(comm.combine, partial_NH, handle)
    assert msg.startswith(f"{name} combine: this handle was already combined; each dispatch's")
    assert "dispatch again" in msg and "\n" not in msg
    assert torch.equal(comm.combine(partial_NH, fresh), first)
    assert torch.equal(comm.combine(partial_NH, replace(handle)), first)  # after, too


@pytest.mark.parametrize("name", COMMS)
def test_combine_partial_of_another_hidden_size_is_an_error(one_rank_group, name):
    comm, recv_NR, handle = _dispatched(name, 3)
    n = recv_NR.shape[0]
    msg = _error(comm.combine, torch.zeros(n, 4), handle)
    assert msg == (
        f"partial has hidden size 4, but this {name} comm's spec has hidden={H}: "
        "combine takes [N, spec.hidden] partial rows"
    )
    assert comm.combine(torch.ones(n, H), handle).shape == (3, H)  # not used up by the error
    if name != "grouped":  # grouped needs a spec; without one any width goes
        plain, recv_NR, handle = _dispatched(name, 3, spec=None)
        assert plain.combine(torch.ones(recv_NR.shape[0], 4), handle).shape == (3, 4)


def _combine_edges_worker() -> dict:
    """Both combine errors on 2 ranks (rank 1 has no tokens), then a clean combine."""
    rank, out = dist.get_rank(), {}
    for name in COMMS:
        comm, recv_NR, handle = _dispatched(name, 3 - 3 * rank)
        ones_NH = torch.ones(recv_NR.shape[0], H)
        out[name, "width"] = _error(comm.combine, ones_NH[:, :4], handle)
        out[name, "sum"] = comm.combine(ones_NH, handle)
        out[name, "twice"] = _error(comm.combine, ones_NH, handle)
        out[name, "copy"] = comm.combine(ones_NH, replace(handle))
    return out


@pytest.mark.timeout(120)
def test_combine_edges_on_two_ranks():
    """Every rank raises alike before any collective; the group stays usable."""
    for rank, res in enumerate(run_distributed(_combine_edges_worker, 2, timeout=90)):
        for name in COMMS:
            assert res[name, "width"].startswith(f"partial has hidden size 4, but this {name}")
            assert res[name, "twice"].startswith(f"{name} combine: this handle was already")
            hits = 1.0 if name == "alltoall" else 2.0  # ranks that got each token
            want = torch.full((3 - 3 * rank, H), hits)
            assert torch.equal(res[name, "sum"], want), (name, rank)
            assert torch.equal(res[name, "copy"], want), (name, rank)
