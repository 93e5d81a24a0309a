"""``moewire eval`` on the fully trained CPU model: the whole table on 2 gloo ranks.

The CPU size of ``moewire.eval.train`` (150 steps, about a minute on 2 free cores; reused
from ``$MOEWIRE_CACHE`` when already trained there), then
every dispatch format x combine wire, plus ``topk`` routing for two of them, on 8192
held-out tokens; the assertions of ``test_eval.check_result`` (before == after bitwise,
bf16 sharded == unsharded, every quantized row finite and not below PPL ratio 1 by more
than 3 standard errors). Marked slow: a few minutes on 2 shared cores.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from moewire.eval.configs import COMBINE_WIRES, DISPATCH_FORMATS, EvalConfig, grid
from moewire.eval.corpus import builtin_text, byte_ids, sequences
from test_eval import check_result, eval_worker

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def test_eval_trained_cpu_model():
    """The built-in model (trained on first use into ``$MOEWIRE_CACHE``, as ``moewire eval``
    does without ``--model``)."""
    from moewire.eval.setup import ensure_builtin_model
    from moewire.eval.train import SIZES

    path = ensure_builtin_model()
    log = json.loads((path / "train_log.json").read_text())
    assert log["steps_run"] == SIZES["cpu"].steps
    # it learned: a uniform guess over 256 bytes has perplexity 256
    assert log["curve"][-1]["heldout_ppl"] < 25.6, log["curve"]
    configs = grid(list(DISPATCH_FORMATS), list(COMBINE_WIRES), ["logits"], ["before"])
    configs += [EvalConfig("fp8", "bf16", "topk"), EvalConfig("nvfp4", "nvfp4", "topk")]
    from moewire.testing import spawn as dist_helper

    seqs = sequences(byte_ids(builtin_text("heldout")), 128, 8192, 2)
    results = dist_helper.run_distributed(eval_worker, 2, str(path), seqs, configs, 8, timeout=1800)
    for res in results:
        check_result(res, len(configs))
    for r in results[0]["records"]:
        print(
            f"{r['config']:<28} ppl {r['ppl']:.4f} ratio {r['ppl_ratio']:.4f} "
            f"KL {r['kl_mean']:.2e} p99 {r['kl_p99']:.2e} top1 {r['top1_same_pct']:.2f}"
        )
