"""Tier b: ``moewire.integrations.in_step`` keeps 2 gloo ranks in step while they generate
with different batch sizes, prompt lengths and ``max_new_tokens`` (a tiny Qwen3-MoE
model, random weights). Each rank's output equals the one-process model's (``comm="local"``,
the same wire format) token for token."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from moewire.testing.spawn import run_distributed

pytest.importorskip("transformers")

from moewire.integrations.in_step import generate, in_step
from moewire.integrations.transformers import expert_parallel
from test_transformers import prompts, tiny_model

NEW_TOKENS = (3, 8)  # per rank


def _generate_worker(wire: str) -> dict:
    rank = dist.get_rank()
    model = tiny_model("qwen3_moe")
    local = copy.deepcopy(model)
    g = 89.6 if wire == "nvfp4" else None
    expert_parallel(model, None, wire=wire, comm="allgather", global_scale=g)
    expert_parallel(local, None, wire=wire, comm="local", global_scale=g)
    ids_BS = prompts(rank)
    n = NEW_TOKENS[rank]
    kw = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), in_step(model) as stepper:
        out = model.generate(ids_BS, **kw)
    again = generate(model, ids_BS, **kw)  # the wrapper, a second time on the same group
    with torch.no_grad():
        ref = local.generate(ids_BS, **kw)
    return {
        "ids": ids_BS,
        "out": out,
        "again": again,
        "ref": ref,
        "steps": stepper.steps,
        "idle": stepper.idle_steps,
    }


@pytest.mark.parametrize("wire", ["bf16", "nvfp4"])
def test_generate_with_different_lengths_per_rank(wire):
    res = run_distributed(_generate_worker, 2, wire, timeout=120)
    for rank, r in enumerate(res):
        b, s = r["ids"].shape
        assert r["out"].shape == (b, s + NEW_TOKENS[rank])
        assert torch.equal(r["out"][:, :s], r["ids"])
        assert torch.equal(r["out"], r["ref"]), (rank, r["out"], r["ref"])
        assert torch.equal(r["again"], r["out"])
    # one forward per generated token; the rank done first stepped the difference idle
    assert [r["steps"] for r in res] == list(NEW_TOKENS)
    assert res[0]["idle"] == NEW_TOKENS[1] - NEW_TOKENS[0] and res[1]["idle"] == 0


def test_in_step_needs_sharded_layers():
    model = tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match="no EPMoE layer with a process group"):
        in_step(model)
