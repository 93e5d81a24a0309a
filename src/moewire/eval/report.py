"""The eval's table rows and the recommendation, as ``moewire eval`` prints them."""

from __future__ import annotations

from moewire.eval.configs import MAX_PPL_RATIO, MIN_TOP1_SAME_PCT, recommended

HEADERS = (
    "dispatch",
    "combine",
    "routing",
    "quantize",
    "PPL",
    "PPL ratio",
    "KL mean",
    "KL p99",
    "top-1 same %",
    "tokens",
    "recommended",
)


def mark_recommended(records: list[dict]) -> None:
    """Add ``recommended`` (the rule of :func:`~moewire.eval.configs.recommended`) to each
    record; the reference row (``ppl_ratio`` exactly 1, first) is marked ``None``."""
    for i, r in enumerate(records):
        r["recommended"] = None if i == 0 else recommended(r["ppl_ratio"], r["top1_same_pct"])


def table_rows(records: list[dict]) -> list[list[str]]:
    """One row of :data:`HEADERS` per record (the first is the unquantized reference)."""
    rows = []
    for r in records:
        rec = r.get("recommended")
        rows.append(
            [
                r["wire"],
                r["combine_wire"],
                r["routing"],
                r["quantize"],
                f"{r['ppl']:.4f}",
                f"{r['ppl_ratio']:.4f}",
                f"{r['kl_mean']:.2e}",
                f"{r['kl_p99']:.2e}",
                f"{r['top1_same_pct']:.2f}",
                str(r["tokens"]),
                "reference" if rec is None else ("yes" if rec else "no"),
            ]
        )
    return rows


def summary_lines(result: dict) -> list[str]:
    """The rule, which configurations pass it, and the before/after check."""
    recs = result["records"][1:]
    passing = [r["config"] for r in recs if r["recommended"]]
    lines = [
        f"recommended when PPL ratio <= {MAX_PPL_RATIO} and top-1 same >= "
        f"{MIN_TOP1_SAME_PCT:g}%: {len(passing)} of {len(recs)} pass"
        + (f": {', '.join(passing)}" if passing else ""),
    ]
    ba = result["before_after"]
    if ba:
        bad = [name for name, ok in ba.items() if not ok]
        tokens = result["before_after_tokens"]
        if bad:
            lines.append(f"quantize before vs after: DIFFERENT logits for {', '.join(bad)}")
        else:
            lines.append(
                f"quantize before vs after: logits bitwise identical for all {len(ba)} "
                f"quantized configurations (first batch, {tokens} tokens)"
            )
    return lines
