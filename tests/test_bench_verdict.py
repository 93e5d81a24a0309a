"""Tier a: ``moewire.bench.verdict`` (legends, skipped rows, speedup intervals, the verdict
lines) and the CPU default world size, on synthetic records (no timing)."""

from __future__ import annotations

import argparse

from moewire.bench.runner import cpu_cores, resolve_world
from moewire.bench.verdict import annotate, skipped_notes, speedup_interval, verdict_lines


def _args(**kw) -> argparse.Namespace:
    base = {
        "formats": ["fp8", "fp8_block128", "mxfp8", "nvfp4", "mxfp4"],
        "combine_wires": ["fp8", "nvfp4"],
        "tokens": [16, 512],
        "device": None,
        "world_size": None,
    }
    return argparse.Namespace(**{**base, **kw})


def test_hidden_100_names_the_four_skipped_formats():
    notes = skipped_notes(_args(), 100, is_cuda=False)
    for fmt in ("fp8_block128", "mxfp8", "nvfp4", "mxfp4"):
        assert any(n.startswith(f"{fmt}: skipped, hidden 100") for n in notes["quantize"])
        assert any(n.startswith(f"{fmt}: skipped, hidden 100") for n in notes["dispatch"])
    assert not any(n.startswith("fp8:") for n in notes["dispatch"])  # fp8 works at any H
    assert "T=512" in notes["combine"][0] and "above 128 tokens" in notes["combine"][0]
    assert notes["layer"] == ["peak GB: CUDA memory only, so not shown on CPU"]


def test_speedup_interval_brackets_the_ratio():
    same = [10.0, 11.0, 9.0, 10.5, 9.5] * 4
    lo, hi = speedup_interval(same, same)
    assert lo <= 1.0 <= hi
    lo, hi = speedup_interval([2 * v for v in same], same)
    assert 1.5 < lo <= 2.0 <= hi < 2.5


def test_verdict_states_bytes_accuracy_speedup_and_the_cpu_caveat():
    def rec(case, fmt, bytes_, us, base=False):
        return {
            "routine": "dispatch",
            "case": case,
            "format": fmt,
            "baseline": base,
            "tokens": 64,
            "bytes_per_token": bytes_,
            "time_us": us,
            "samples_us": [us * f for f in (0.9, 1.0, 1.1, 1.0, 0.95, 1.05)],
            "sqnr_db": 29.0 if fmt == "nvfp4" else float("inf"),
            "speedup": 1000.0 / us,
        }

    records = [
        rec("baseline: bf16+logits, one collective per tensor", "bf16", 3072, 1000.0, True),
        rec("nvfp4+topk, alltoall", "nvfp4", 640, 400.0),
        rec("nvfp4+logits, allgather", "nvfp4", 1600, 2000.0),
    ]
    annotate(records)
    assert "speedup_ci95" in records[1] and "speedup_ci95" in records[0]
    text = "\n".join(verdict_lines(records, {"device": "cpu", "world_size": 2}, 2))
    assert "the baseline (bf16 + fp32 logits, one collective per tensor) sends 3072" in text
    assert "nvfp4: 640-1600 B/token (1.9-4.8x fewer), SQNR 29.0 dB" in text
    assert "fastest case nvfp4+topk, alltoall: 2.50x [" in text and "], faster" in text
    assert "gloo through shared memory" in text and "BENCHMARKS.md" in text


def test_cpu_default_world_size_is_at_most_the_cores():
    _, world, _ = resolve_world(_args(device="cpu"))
    assert world == min(4, cpu_cores())
    assert resolve_world(_args(device="cpu", world_size=3))[1] == 3  # explicit: as asked
