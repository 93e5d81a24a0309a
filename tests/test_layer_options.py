"""Tier a: ``LayerOptions``, the frozen, validated choices of an ``EPMoE``, and its keyword
front (``EPMoE(cfg, group, wire=..., ...)`` builds the same options).

Shape legend: ``T`` tokens, ``H`` hidden, ``E`` experts.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moewire as mw
from moewire.comm import AllGatherComm, AllToAllComm, Comm, GroupedComm
from moewire.comm.local import LocalComm
from moewire.moe.layer_checks import check_padding
from moewire.moe.options import LAYER_COMMS, OPTION_NAMES, LayerOptions

H, I, E, K = 64, 32, 8, 2


def _cfg() -> mw.MoEConfig:
    return mw.MoEConfig(hidden=H, intermediate=I, num_experts=E, top_k=K)


def _weights(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(torch.bfloat16)
    return w13, w2


def test_defaults_exported_and_frozen():
    assert mw.LayerOptions is LayerOptions and "LayerOptions" in mw.__all__
    opts = LayerOptions()
    assert (opts.wire, opts.comm, opts.routing, opts.quantize) == (
        "bf16",
        "allgather",
        "logits",
        "before",
    )
    assert (opts.global_scale, opts.experts, opts.combine_dtype, opts.combine_wire) == (
        None,
        "auto",
        torch.bfloat16,
        "bf16",
    )
    assert opts.check == "once"
    assert tuple(f.name for f in dataclasses.fields(LayerOptions)) == OPTION_NAMES
    assert LAYER_COMMS == ("allgather", "alltoall", "grouped", "local")
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.wire = "fp8"  # type: ignore[misc]
    assert LayerOptions(wire="fp8") == LayerOptions(wire="fp8")
    assert hash(LayerOptions(wire="fp8")) == hash(LayerOptions(wire="fp8"))


def test_global_scale_kept_as_fp32_value():
    g = mw.nvfp4_global_scale(6.0)
    from_tensor = LayerOptions(wire="nvfp4", global_scale=torch.tensor(g))
    assert from_tensor.global_scale == g and isinstance(from_tensor.global_scale, float)
    assert from_tensor == LayerOptions(wire="nvfp4", global_scale=g)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"wire": "fp4"}, ValueError, "unknown format 'fp4'"),
        ({"wire": 4}, TypeError, "format must be a str"),
        ({"comm": "nccl"}, ValueError, r"comm must be one of \('allgather'.*got 'nccl'"),
        ({"routing": "ids"}, ValueError, r"routing must be one of \('logits', 'topk'\)"),
        ({"quantize": "during"}, ValueError, "quantize must be one of.*'during'"),
        ({"experts": "cutlass"}, ValueError, "experts must be one of.*'cutlass'"),
        ({"combine_dtype": torch.float16}, ValueError, "combine_dtype must be one of"),
        ({"combine_wire": "int4"}, ValueError, r"combine_wire must be one of \('bf16', 'fp8'"),
        (
            {"comm": "grouped", "combine_wire": "fp8"},
            ValueError,
            "combine_wire='fp8': comm='grouped'.*supports only combine_wire='bf16'",
        ),
        ({"check": "always"}, ValueError, "check must be one of"),
        ({"wire": "nvfp4", "global_scale": -1.0}, ValueError, "global_scale must be finite"),
        ({"wire": "nvfp4", "global_scale": "2"}, TypeError, "global_scale must be a float"),
    ],
)
def test_validated_once_at_construction(kwargs, err, match):
    with pytest.raises(err, match=match):
        LayerOptions(**kwargs)
    with pytest.raises(err, match=match):  # the keyword front raises the same
        mw.EPMoE(_cfg(), None, **{"comm": "local", **kwargs})
    with pytest.raises(err, match=match):  # dataclasses.replace validates again
        dataclasses.replace(LayerOptions(comm="local"), **kwargs)


def test_keyword_front_builds_the_same_options():
    kw = {"wire": "mxfp8", "comm": "local", "routing": "topk", "combine_dtype": torch.float32}
    opts = LayerOptions(**kw)
    by_kw, by_opts = mw.EPMoE(_cfg(), None, **kw), mw.EPMoE(_cfg(), None, opts)
    assert by_kw.options == by_opts.options == opts
    assert by_opts.options is opts
    assert (by_opts.comm_name, by_opts.routing, by_opts.combine_dtype) == (
        "local",
        "topk",
        torch.float32,
    )
    assert (by_opts.quantize, by_opts.experts_impl, by_opts.combine_wire) == (
        "before",
        "auto",
        "bf16",
    )
    w13, w2 = _weights()
    by_kw.load_experts(w13, w2)
    by_opts.load_experts(w13, w2)
    x, logits = torch.randn(5, H, dtype=torch.bfloat16), torch.randn(5, E)
    assert torch.equal(by_kw(x, logits), by_opts(x, logits))
    assert repr(by_kw) == repr(by_opts)


def test_options_and_keywords_together_is_a_type_error():
    opts = LayerOptions(comm="local")
    with pytest.raises(TypeError, match=r"not both.*\['wire'\]"):
        mw.EPMoE(_cfg(), None, opts, wire="fp8")
    with pytest.raises(TypeError, match=r"options must be a moewire.LayerOptions.*str"):
        mw.EPMoE(_cfg(), None, "fp8")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['wires'\]"):
        mw.EPMoE(_cfg(), None, comm="local", wires="fp8")
    layer = mw.EPMoE(_cfg(), None, opts, shared_expert=torch.nn.Identity())  # not an option
    assert isinstance(layer.shared_expert, torch.nn.Identity)


def test_layer_attributes_follow_the_options():
    layer = mw.EPMoE(_cfg(), None, LayerOptions(comm="local", wire="fp8"))
    with pytest.raises(AttributeError):
        layer.routing = "topk"  # read-only: the options are frozen
    assert "wire='fp8', comm='local'" in repr(layer)


def test_comms_say_what_dispatch_needs():
    """The layer calls every comm alike; the comm says whether it needs the sender's
    routing and whether rows arrive rank by rank (padded batches)."""
    for cls in (AllGatherComm, GroupedComm, LocalComm):
        assert not cls.needs_topk_ids and cls.rank_ordered, cls
    assert AllToAllComm.needs_topk_ids and not AllToAllComm.rank_ordered
    assert not Comm.needs_topk_ids and Comm.rank_ordered
    valid = torch.tensor([2], dtype=torch.int32)
    with pytest.raises(ValueError, match="comm='alltoall' does not deliver rows rank by rank"):
        check_padding(AllToAllComm, 1, 2, [2], valid)
    check_padding(LocalComm, 1, 2, [2], valid)
