"""``moewire eval`` end to end on a trained Qwen3-MoE (byte tokens, 32 experts, top-4).

Tier a: corpus, sequences, configurations, the recommendation rule, metrics on known
distributions. Tier b (2 gloo ranks), on a model trained here for a few steps (the default
run; ``test_eval_slow`` repeats it on the fully trained CPU model and the whole table):

- quantize before == after: logits bitwise equal (the eval's own check, every config);
- bf16 dispatch, sharded over 2 ranks == unsharded (``comm="local"``): the same up to the
  association of the fp32 expert sum (tests/test_moe_dist.py), which the bf16 model rounds
  away almost everywhere. Bound: PPL within 1e-4 relative, top-1 same >= 99.9%, mean KL
  <= 1e-6 (measured here on the few-step model: log-probs of the first batches bitwise
  equal, KL 0, top-1 100%: the bf16 model rounds the fp32 differences away);
- every quantized row has finite figures and a PPL ratio that is not below 1 by more than
  noise: ``ln(ratio) >= -3 * se``, ``se`` the standard error of the mean per-token NLL
  difference to the reference (reported by the eval as ``ln_ppl_ratio_se``).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from moewire.eval.configs import REFERENCE, EvalConfig, grid, recommended
from moewire.eval.corpus import builtin_text, byte_ids, sequences
from moewire.eval.metrics import Metrics, log_probs

FAST_CONFIGS = [
    EvalConfig("fp8"),
    EvalConfig("nvfp4", "nvfp4"),
    EvalConfig("mxfp4", "fp8"),
    EvalConfig("fp8_block128", "bf16", "topk"),
]


# ----------------------------------------------------------------------------- tier a
def test_corpus_splits_are_disjoint_files():
    train, held = builtin_text("train"), builtin_text("heldout")
    assert len(train) > 6_000_000 and len(held) > 600_000
    heads = lambda data: {l for l in data.decode().splitlines() if l.startswith("# ==== ")}  # noqa: E731
    assert heads(train).isdisjoint(heads(held)) and len(heads(held)) >= 30


def test_sequences():
    ids = torch.arange(1000)
    s = sequences(ids, 10, 95, 2)
    assert s.shape == (8, 11) and torch.equal(s[1], torch.arange(10, 21))
    assert sequences(ids, 10, 10**6, 3).shape == (99, 11)  # capped by the text
    with pytest.raises(ValueError, match="text too short"):
        sequences(ids[:20], 10, 1000, 2)


def test_configs_and_rule():
    g = grid(["bf16", "fp8"], ["bf16", "nvfp4"], ["logits"], ["before"])
    assert REFERENCE not in g and [c.name for c in g] == [
        "bf16/nvfp4/logits/before",
        "fp8/bf16/logits/before",
        "fp8/nvfp4/logits/before",
    ]
    with pytest.raises(ValueError, match="dispatch format"):
        EvalConfig("int8")
    with pytest.raises(ValueError, match="combine_wire"):
        EvalConfig("fp8", "int4")
    assert recommended(1.01, 97.0) and not recommended(1.0101, 99.0)
    assert not recommended(1.0, 96.99)


def test_metrics_known_values():
    ref = log_probs(torch.tensor([[0.0, 0.0], [0.0, 0.0]]))
    q = torch.log(torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    target = torch.tensor([1, 0])
    m = Metrics(torch.device("cpu"))
    m.add(ref, q, target)
    s = m.summary(None, reference_ppl=2.0)
    nll = -(math.log(0.75) + math.log(0.5)) / 2
    assert s["ppl"] == pytest.approx(math.exp(nll)) and s["tokens"] == 2
    assert s["ppl_ratio"] == pytest.approx(math.exp(nll) / 2.0)
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert s["kl_mean"] == pytest.approx(kl0 / 2, rel=1e-6)
    assert s["top1_same_pct"] == 50.0  # [0.5, 0.5] argmax 0; [0.25, 0.75] argmax 1


# ----------------------------------------------------------------------------- tier b
def eval_worker(path: str, seqs, configs, batch: int) -> dict:
    """One rank: the eval over its sequences, plus the unsharded model's reference."""
    import torch.distributed as dist

    from moewire.eval.runner import run_eval
    from moewire.integrations.checkpoint import load_expert_parallel

    rank, world = dist.get_rank(), dist.get_world_size()
    local = seqs[rank::world]
    f32 = {"combine_dtype": torch.float32}  # as moewire eval loads it
    model, _ = load_expert_parallel(path, None, device="cpu", comm="allgather", **f32)
    result = run_eval(model, None, local, configs, batch=batch)
    whole, _ = load_expert_parallel(path, None, device="cpu", comm="local", **f32)
    result["unsharded"] = run_eval(whole, None, local, [], batch=batch)["records"][0]
    with torch.no_grad():
        a = log_probs(model(local[:batch, :-1]).logits.flatten(0, 1))
        b = log_probs(whole(local[:batch, :-1]).logits.flatten(0, 1))
    m = Metrics(torch.device("cpu"))
    m.add(b, a, local[:batch, 1:].reshape(-1))
    result["sharded_vs_unsharded"] = m.summary(None, None)
    return result


def check_result(result: dict, n_configs: int) -> None:
    """The assertions of the module docstring on one rank's result."""
    records = result["records"]
    assert len(records) == n_configs + 1 and records[0]["config"] == REFERENCE.name
    quantized = [r for r in records[1:] if r["wire"] != "bf16" or r["combine_wire"] != "bf16"]
    assert len(result["before_after"]) == len([r for r in quantized if r["quantize"] == "before"])
    assert all(result["before_after"].values()), result["before_after"]
    ref, unsharded = records[0], result["unsharded"]
    assert unsharded["tokens"] == ref["tokens"]
    assert abs(unsharded["ppl"] / ref["ppl"] - 1) <= 1e-4, (unsharded["ppl"], ref["ppl"])
    vs = result["sharded_vs_unsharded"]
    assert vs["top1_same_pct"] >= 99.9 and vs["kl_mean"] <= 1e-6, vs
    for r in records[1:]:
        for key in ("ppl", "kl_mean", "kl_p99", "top1_same_pct"):
            assert math.isfinite(r[key]), r
        assert r["kl_mean"] >= -1e-6 and r["kl_p99"] >= r["kl_mean"] - 1e-6, r
        noise = 3 * r["ln_ppl_ratio_se"]
        assert math.log(r["ppl_ratio"]) >= -noise, r


@pytest.fixture(scope="module")
def few_step_model(tmp_path_factory):
    from moewire.eval.train import train

    path = tmp_path_factory.mktemp("moe_few_steps")
    log = train("cpu", path, steps=4, log=lambda s: None)
    assert log["steps_run"] == 4 and math.isfinite(log["curve"][-1]["heldout_loss"])
    return path


def test_eval_two_ranks_few_steps(few_step_model):
    from moewire.testing import spawn as dist_helper

    seqs = sequences(byte_ids(builtin_text("heldout")), 128, 2048, 2)
    results = dist_helper.run_distributed(
        eval_worker, 2, str(few_step_model), seqs, FAST_CONFIGS, 4, timeout=280
    )
    for res in results:
        check_result(res, len(FAST_CONFIGS))
    assert results[0]["records"] == results[1]["records"]  # every rank reports the same


def test_cli_eval_prints_table(few_step_model, tmp_path, capfd):
    """Rank 0 (a spawned process) prints the table: read at the file-descriptor level."""
    from moewire.cli import main

    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(few_step_model), "--tokens", "1024", "--batch", "4"]
    argv += ["--formats", "nvfp4", "--combine", "bf16,nvfp4", "--json", str(out)]
    assert main(argv) == 0
    text = capfd.readouterr().out
    assert "top-1 same %" in text and "reference" in text
    assert "recommended when PPL ratio <= 1.01 and top-1 same >= 97%" in text
    assert "logits bitwise identical for all 2 quantized configurations" in text
    doc = json.loads(out.read_text())
    assert [r["config"] for r in doc["records"]] == [
        "bf16/bf16/logits/before",
        "nvfp4/bf16/logits/before",
        "nvfp4/nvfp4/logits/before",
    ]
    assert doc["environment"]["world_size"] == 2 and doc["records"][0]["tokens"] == 1024
