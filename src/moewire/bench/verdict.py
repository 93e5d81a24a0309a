"""What ``moewire bench`` concludes: a legend under each table, the rows it skipped and
why, a 95% interval for every speedup, and a short verdict per routine in plain words.

Speedup interval: the speedup is ``median(baseline) / median(case)`` over the timed
iterations (each iteration's time is the slowest rank's); its 95% interval is a percentile
bootstrap of that ratio (both sample sets resampled with replacement, 2000 times, a fixed
generator, so a report is reproducible from its JSON).
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from moewire.bench.runner import fmt_speedup

#: One line per table: what its columns mean.
LEGENDS = {
    "quantize": "T: tokens; MB moved: bytes read + written; time us: median (min-max) per "
    "call; GB/s: MB moved / median. CPU: the torch reference on one rank (a GPU runs the "
    "Triton kernels instead).",
    "dispatch": "case: format + what travels per token (logits: fp32 router logits; topk: "
    "ids + weights), backend; B/token: bytes per token on the wire; time us: pack + dispatch, "
    "median (min-max) over iterations, slowest rank; bus GB/s: bytes*(W-1)/W/time; % of "
    "all-gather: vs the group's own all-gather of as many bytes; dispatch only us: the "
    "comm's dispatch of rows packed beforehand (median), and / all-gather: that over the "
    "group's own all-gather; SQNR dB: accuracy of the "
    "format on these tokens (inf: lossless); speedup: baseline median / case median "
    "[95% interval].",
    "combine": "case: what the partial sums travel as, backend; B/token: bytes per token "
    "sent back; time us: median (min-max), slowest rank; bus GB/s: bytes*(W-1)/W/time; "
    "speedup: vs the bf16 reduce-scatter [95% interval].",
    "layer": "stage columns: median us of pack, dispatch, experts (routing included) and "
    "combine; total us: median (min-max) of the whole eager forward, slowest rank; replay us: "
    "one call of the layer captured in a CUDA graph, the GPU idle before it (--graph, GPU); "
    "replay b2b us: per call of 20 captured calls back to back (the GPU time of a serving "
    "loop whose host runs ahead); speedup: vs the first case [95% "
    "interval]; experts / bare: the experts stage over the bare grouped GEMMs of its "
    "precision on the same pairs (ref rows, GPU); layer / read: the eager forward over the "
    "time to read the hit experts' weights at the copy bandwidth measured in the run (ref "
    "rows); SQNR vs bf16 dB: the output vs the all-bf16 layer's.",
    "model": "tok/s total: W * batch * seq / median forward time; speedup: vs the first "
    "case; logits SQNR vs first dB: accuracy against the first case's logits.",
}

CPU_CAVEAT = (
    "These timings come from CPU processes and do not predict a GPU cluster: the "
    "collectives run over gloo through shared memory on this machine, and quantization runs "
    "as the torch reference on {cores} core(s) shared by {world} rank(s) (a GPU runs fused "
    "Triton kernels and NCCL over NVLink/InfiniBand). Bytes per token and SQNR are the same "
    "on every device. For GPU figures see BENCHMARKS.md's GPU tables (README, 'Results')."
)


def skipped_notes(args: argparse.Namespace, hidden: int, is_cuda: bool) -> dict[str, list[str]]:
    """Per routine, the rows the run leaves out and why (one line each)."""
    from moewire.bench.routines.combine import CPU_QUANTIZED_COMBINE_MAX_TOKENS
    from moewire.formats import format_class

    notes: dict[str, list[str]] = {r: [] for r in LEGENDS}
    for fmt in args.formats:
        block = format_class(fmt).block
        if hidden % block:
            why = f"{fmt}: skipped, hidden {hidden} is not a multiple of its block {block}"
            notes["quantize"].append(why)
            notes["dispatch"].append(why)
    if is_cuda and 0 in args.tokens:
        notes["quantize"].append("T=0: skipped (nothing to time)")
    wires = [w for w in args.combine_wires if w != "bf16"]
    big = [t for t in args.tokens if t > CPU_QUANTIZED_COMBINE_MAX_TOKENS]
    if not is_cuda and wires and big:
        notes["combine"].append(
            f"quantized combine rows ({', '.join(wires)}) at T={', '.join(map(str, big))}: "
            f"skipped on CPU above {CPU_QUANTIZED_COMBINE_MAX_TOKENS} tokens per rank (the "
            "torch reference codec is slow there and is not what GPU figures are about)"
        )
    if not is_cuda:
        notes["layer"].append("peak GB: CUDA memory only, so not shown on CPU")
    return notes


def speedup_interval(base_us: list[float], case_us: list[float]) -> tuple[float, float]:
    """95% percentile-bootstrap interval of ``median(base_us) / median(case_us)``."""
    rng = np.random.default_rng(0)
    b = np.asarray(base_us)[rng.integers(0, len(base_us), (2000, len(base_us)))]
    c = np.asarray(case_us)[rng.integers(0, len(case_us), (2000, len(case_us)))]
    ratio = np.median(b, axis=1) / np.median(c, axis=1)
    lo, hi = np.percentile(ratio, [2.5, 97.5])
    return float(lo), float(hi)


def annotate(records: list[dict]) -> None:
    """Add ``speedup_ci95`` to every record that has samples and a baseline with samples
    (the baseline of its routine at the same tokens per rank)."""
    base = {
        (r["routine"], r["tokens"]): r for r in records if r.get("baseline") and "samples_us" in r
    }
    for r in records:
        b = base.get((r["routine"], r.get("tokens")))
        if b is not None and r.get("speedup") and r.get("samples_us"):
            r["speedup_ci95"] = list(speedup_interval(b["samples_us"], r["samples_us"]))


def _words(r: dict) -> str:
    """The speedup in words: faster / slower only where the 95% interval excludes 1."""
    ci = r.get("speedup_ci95")
    if not ci:
        return f"{r['speedup']:.2f}x"
    if ci[0] > 1:
        word = "faster"
    elif ci[1] < 1:
        word = "slower"
    else:
        word = "no clear difference"
    return f"{fmt_speedup(r)}, {word}"


def _at_largest(recs: list[dict]) -> tuple[int, list[dict]]:
    t = max(r["tokens"] for r in recs)
    return t, [r for r in recs if r["tokens"] == t]


def _dispatch(recs: list[dict]) -> list[str]:
    t, rows = _at_largest(recs)
    base = next(r for r in rows if r.get("baseline"))
    out = [
        f"dispatch at {t} tokens/rank: the baseline (bf16 + fp32 logits, one collective per "
        f"tensor) sends {base['bytes_per_token']} B/token in {base['time_us']:.0f} us."
    ]
    for fmt in dict.fromkeys(r["format"] for r in rows if not r.get("baseline")):
        mine = [r for r in rows if r["format"] == fmt and not r.get("baseline")]
        lo = min(r["bytes_per_token"] for r in mine)
        hi = max(r["bytes_per_token"] for r in mine)
        best = max(mine, key=lambda r: r["speedup"] or 0)
        sq = best["sqnr_db"]
        acc = "lossless" if sq is None or math.isinf(sq) else f"SQNR {sq:.1f} dB"
        b = base["bytes_per_token"]
        if lo != hi:
            size = f"{lo}-{hi} B/token ({b / hi:.1f}-{b / lo:.1f}x fewer)"
        elif lo == b:
            size = f"{lo} B/token (as many as the baseline)"
        else:
            size = f"{lo} B/token ({b / lo:.1f}x fewer)"
        out.append(f"  {fmt}: {size}, {acc}; fastest case {best['case']}: {_words(best)}")
    return out


def _combine(recs: list[dict]) -> list[str]:
    t = max(r["tokens"] for r in recs)
    out = [f"combine at {t} tokens/rank, vs the bf16 reduce-scatter:"]
    for wire in dict.fromkeys(r["combine_wire"] for r in recs):
        mine = [r for r in recs if r["combine_wire"] == wire and not r.get("baseline")]
        if not mine:
            continue
        tw = max(r["tokens"] for r in mine)
        best = max((r for r in mine if r["tokens"] == tw), key=lambda r: r["speedup"] or 0)
        where = "" if tw == t else f" (at {tw} tokens/rank, the largest it ran)"
        out.append(f"  {best['case']}: {best['bytes_per_token']} B/token, {_words(best)}{where}")
    return out


def _layer(recs: list[dict]) -> list[str]:
    t, rows = _at_largest([r for r in recs if not r.get("reference")])
    out = [f"layer at {t} tokens/rank, vs {rows[0]['case']} ({rows[0]['time_us']:.0f} us):"]
    for r in rows[1:]:
        out.append(f"  {r['case']}: {_words(r)}; output SQNR {r['sqnr_vs_bf16_db']:.1f} dB vs bf16")
    return out


def _quantize(recs: list[dict]) -> list[str]:
    t, rows = _at_largest(recs)
    packs = [r for r in rows if r.get("op") == "pack" and "time_us" in r]
    if not packs:
        return []
    times = ", ".join(f"{r['format']} {r['time_us']:.0f} us" for r in packs)
    how = "torch reference" if "torch reference" in packs[0]["case"] else "Triton kernels"
    return [f"quantize: pack of {t} tokens takes {times} (median, {how})."]


def _model(recs: list[dict]) -> list[str]:
    return [f"model: {r['case']}: {r['speedup']:.3f}x" for r in recs[1:]]


def verdict_lines(records: list[dict], env: dict, cores: int) -> list[str]:
    """The verdict: a few plain lines per routine that ran, then the CPU caveat on CPU."""
    out: list[str] = []
    makers = {
        "quantize": _quantize,
        "dispatch": _dispatch,
        "combine": _combine,
        "layer": _layer,
        "model": _model,
    }
    for routine in dict.fromkeys(r["routine"] for r in records):
        recs = [r for r in records if r["routine"] == routine and "time_us" in r]
        if recs and routine in makers:
            out += makers[routine](recs)
    if env.get("device") == "cpu":
        out += ["", CPU_CAVEAT.format(cores=cores, world=env.get("world_size"))]
    return out
