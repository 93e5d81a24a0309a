"""Tier b: ``moewire bench model`` on CPU (a tiny DeepSeek-V3 over 2 gloo ranks).

Two checks: the routine end to end (the JSON has a record per case, tokens/s > 0, the
baseline's speedup is 1), and the bench's way of building the model (meta init, only this
rank's expert shard) gives bitwise the logits of ``expert_parallel`` applied to the full
model with the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

TINY = ["--hidden", "128", "--intermediate", "64", "--experts", "16", "--topk", "4"]


def test_bench_model_cpu_two_ranks(tmp_path):
    out = tmp_path / "model.json"
    cmd = [
        sys.executable,
        "-m",
        "moewire",
        "bench",
        "model",
        "--world-size",
        "2",
        *TINY,
        "--tokens",
        "24",
        "--batch",
        "2",
        "--layers",
        "2",
        "--json",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "## model" in r.stdout and "fp8 cases skipped" in r.stdout
    recs = json.loads(out.read_text())["records"]
    assert [x["case"] for x in recs] == [
        "bf16 rows (before PR 30014), bf16 experts",
        "nvfp4 rows, bf16 experts",
    ]
    assert recs[0]["baseline"] and recs[0]["speedup"] == 1.0
    assert recs[0]["sqnr_vs_first_db"] == float("inf")
    for x in recs:
        assert x["tokens_per_s"] > 0 and x["time_us"] > 0
        assert (x["layers"], x["batch"], x["seq"]) == (2, 2, 24)
        assert x["tokens_per_s"] == pytest.approx(2 * 2 * 24 / (x["time_us"] / 1e6))
    assert 5.0 < recs[1]["sqnr_vs_first_db"] < 60.0  # nvfp4 rows: lossy, not garbage


def _equivalence_worker() -> dict:
    import torch.distributed as dist

    from moewire.bench.presets import ModelShape
    from moewire.bench.routines.model_build import build_model, expert_shard, model_config, swap_in
    from moewire.integrations.transformers import expert_parallel

    rank, world = dist.get_rank(), dist.get_world_size()
    shape = ModelShape("t", 128, 64, 8, 2, "deepseek_v3", 4, 2, 2.5)
    cfg = model_config(shape, 2, on_gpu=False)
    cpu = torch.device("cpu")
    bench = build_model(cfg, cpu, seed=3)
    dense_state = {k: v.clone() for k, v in bench.state_dict().items()}
    blocks = [layer.mlp for layer in bench.model.layers]
    local = 8 // world
    shards = [expert_shard(cfg, i, rank * local, local, cpu, seed=3) for i in range(2)]
    swap_in(bench, blocks, shards, None, None, wire="bf16", experts="auto")

    ref = transformers.DeepseekV3ForCausalLM(cfg).to(torch.bfloat16).eval()
    missing, unexpected = ref.load_state_dict(dense_state, strict=False)
    assert not unexpected and all(".mlp.experts." in k for k in missing), missing
    ref.model.rotary_emb = bench.model.rotary_emb  # fp32 inv_freq, as the bench builds it
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            w13, w2 = expert_shard(cfg, i, 0, 8, cpu, seed=3)
            layer.mlp.experts.gate_up_proj.copy_(w13)
            layer.mlp.experts.down_proj.copy_(w2)
            assert torch.equal(w13[rank * local : (rank + 1) * local], shards[i][0])
    expert_parallel(ref, None, wire="bf16", comm="allgather")
    ids = torch.randint(0, cfg.vocab_size, (1, 11), generator=torch.Generator().manual_seed(rank))
    with torch.inference_mode():
        a = bench(input_ids=ids, use_cache=False).logits
        b = ref(input_ids=ids, use_cache=False).logits
    return {"bench": a, "ref": b}


def test_bench_build_equals_expert_parallel():
    from moewire.testing import spawn as dist_helper

    for res in dist_helper.run_distributed(_equivalence_worker, 2, timeout=120):
        assert res["bench"].isfinite().all()
        assert torch.equal(res["bench"], res["ref"])
