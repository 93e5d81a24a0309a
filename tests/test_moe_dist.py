"""Tier b: the sharded layer on gloo groups of 1, 2 and 4 ranks against the unsharded layer.

One spawned group per world size runs every case (2 routers x 4 wire formats x 3 comms x
2 routing modes x 2 quantize modes); the parent checks the results:

- ``quantize="before"`` == ``"after"`` and ``routing="logits"`` == ``"topk"``: bitwise.
- sharded == unsharded (``comm="local"``, same wire format, run in the parent on all ranks'
  tokens): with one rank bitwise; with ``W`` ranks each output value is the same ``K = 3``
  fp32 terms (the weighted expert outputs, bitwise equal: same rows, same routing, same
  GEMMs) summed in another association (per rank in ``k`` order, then across ranks by the
  combine), so ``|y - ref| <= K * 2^-24 * sum_k |term_k|``; checked as ``<= 2^-20 * mag``
  with ``mag >= sum_k |term_k|`` from the float64 oracle of ``test_moe`` (x is fp32 so the
  output is not rounded further).
- ``allgather``, ``alltoall`` and ``grouped`` agree to the same bound.

Token counts differ per rank and one rank of four has none.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moewire.testing import spawn as dist_helper
from test_moe import make_config, make_inputs, make_layer, make_weights, oracle

COUNTS = {1: (9,), 2: (9, 4), 4: (9, 0, 13, 4)}
ROUTERS = ("softmax", "deepseek_v3")
DIST_WIRES = ("bf16", "fp8", "nvfp4", "mxfp4")
COMMS = ("allgather", "alltoall", "grouped")
TOP_K = 3


def _inputs(world_size: int):
    total = sum(COUNTS[world_size])
    return make_inputs(total, seed=7, dtype=torch.float32)


def _layer_worker(world_size: int) -> dict:
    rank = dist.get_rank()
    counts = COUNTS[world_size]
    lo = sum(counts[:rank])
    x_all, logits_all = _inputs(world_size)
    x, logits = x_all[lo : lo + counts[rank]], logits_all[lo : lo + counts[rank]]
    w13, w2, bias = make_weights()
    out = {}
    for router in ROUTERS:
        cfg = make_config(router, top_k=TOP_K)
        for wire in DIST_WIRES:
            for comm in COMMS:
                for routing in ("logits", "topk"):
                    for quantize in ("before", "after"):
                        layer = make_layer(
                            cfg,
                            w13,
                            w2,
                            bias,
                            wire=wire,
                            group=None,
                            comm=comm,
                            routing=routing,
                            quantize=quantize,
                        )
                        y = layer(x, logits)
                        assert layer.num_local == 8 // world_size
                        out[router, wire, comm, routing, quantize] = y
    return out


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_sharded_equals_unsharded(world_size):
    results = dist_helper.run_distributed(_layer_worker, world_size, world_size, timeout=240)
    x_all, logits_all = _inputs(world_size)
    w13, w2, bias = make_weights()
    counts = COUNTS[world_size]
    for router in ROUTERS:
        cfg = make_config(router, top_k=TOP_K)
        for wire in DIST_WIRES:
            ref_layer = make_layer(cfg, w13, w2, bias, wire=wire)
            ref = ref_layer(x_all, logits_all)
            _, mag = oracle(
                cfg,
                ref_layer.spec,
                x_all,
                logits_all,
                w13,
                w2,
                bias if router == "deepseek_v3" else None,
            )
            bound = 2**-20 * mag.float()
            for rank, res in enumerate(results):
                lo = sum(counts[:rank])
                sl = slice(lo, lo + counts[rank])
                first = res[router, wire, "allgather", "logits", "before"]
                assert first.shape == (counts[rank], cfg.hidden)
                for comm in COMMS:
                    base = res[router, wire, comm, "logits", "before"]
                    for routing in ("logits", "topk"):
                        for quantize in ("before", "after"):
                            y = res[router, wire, comm, routing, quantize]
                            key = (router, wire, comm, routing, quantize, rank)
                            assert torch.equal(y, base), key
                    err = (base - ref[sl]).abs()
                    assert (err <= bound[sl]).all(), (router, wire, comm, rank)
                    if world_size == 1:
                        assert torch.equal(base, ref[sl]), (router, wire, comm)
                    assert ((base - first).abs() <= 2 * bound[sl]).all(), (router, wire, comm)


def _calibration_worker() -> dict:
    rank = dist.get_rank()
    cfg = make_config()
    w13, w2, _ = make_weights()
    import moewire as mw

    layer = mw.EPMoE(cfg, None, wire="nvfp4", comm="allgather")  # no global scale
    layer.load_experts(w13, w2)
    x = torch.full((3, w13.shape[2]), 2.0 if rank == 0 else 5.0)  # amax differs per rank
    layer(x, torch.randn(3, cfg.num_experts))
    return {"g": layer.spec.global_scale}


def test_nvfp4_calibration_agrees_across_ranks():
    """wire='nvfp4' without a global scale calibrates on the largest |x| of every rank, so
    all ranks end up with the same g (the dispatch's agreement check would refuse others)."""
    import moewire as mw

    results = dist_helper.run_distributed(_calibration_worker, 2, timeout=120)
    assert results[0]["g"] == results[1]["g"] == mw.nvfp4_global_scale(5.0)
