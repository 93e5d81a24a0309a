"""``moewire eval`` on the fully trained CPU model: the whole table on 2 gloo ranks.

The CPU size of ``moewire.eval.train`` (150 steps, about a minute on 2 free cores), then
every dispatch format x combine wire, plus ``topk`` routing for two of them, on 8192
held-out tokens; the assertions of ``test_eval.check_result`` (before == after bitwise,
bf16 sharded == unsharded, every quantized row finite and not below PPL ratio 1 by more
than 3 standard errors). Marked slow: a few minutes on 2 shared cores.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from moewire.eval.configs import COMBINE_WIRES, DISPATCH_FORMATS, EvalConfig, grid
from moewire.eval.corpus import builtin_text, byte_ids, sequences
from test_eval import check_result, eval_worker

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def test_eval_trained_cpu_model(tmp_path):
    from moewire.eval.train import SIZES, train

    log = train("cpu", tmp_path, log=print)
    curve = log["curve"]
    assert log["steps_run"] == SIZES["cpu"].steps
    assert curve[0]["step"] == 0 and curve[-1]["heldout_ppl"] < 0.1 * curve[0]["heldout_ppl"]
    configs = grid(list(DISPATCH_FORMATS), list(COMBINE_WIRES), ["logits"], ["before"])
    configs += [EvalConfig("fp8", "bf16", "topk"), EvalConfig("nvfp4", "nvfp4", "topk")]
    dist_helper = pytest.importorskip("dist", reason="tests/dist.py not present")
    seqs = sequences(byte_ids(builtin_text("heldout")), 128, 8192, 2)
    results = dist_helper.run_distributed(
        eval_worker, 2, str(tmp_path), seqs, configs, 8, timeout=600
    )
    for res in results:
        check_result(res, len(configs))
    for r in results[0]["records"]:
        print(
            f"{r['config']:<28} ppl {r['ppl']:.4f} ratio {r['ppl_ratio']:.4f} "
            f"KL {r['kl_mean']:.2e} p99 {r['kl_p99']:.2e} top1 {r['top1_same_pct']:.2f}"
        )
