"""The ``moewire`` command (also ``python -m moewire``).

Subcommands: ``formats`` (bytes per token and accuracy of every wire format),
``bench`` (measurement routines), ``check`` (correctness self-test on this machine),
``eval`` (what each dispatch/combine configuration does to a trained model's outputs).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from moewire.bench.runner import render_table
from moewire.formats import FORMATS, WireSpec, format_class, nvfp4_global_scale
from moewire.moe.routing import ROUTING_MODES, routing_extras


def baseline_row_bytes(hidden: int, num_experts: int) -> int:
    """Bytes per token of the baseline: bf16 activations plus fp32 router logits."""
    return WireSpec("bf16", hidden, extras=routing_extras("logits", num_experts, 1)).row_bytes


def formats_table(
    hidden: int, num_experts: int, top_k: int, tokens: int = 256, seed: int | None = None
) -> list[dict]:
    """One record per (format, routing mode): row bytes, ratio vs the baseline, and SQNR (dB)
    of the format on Gaussian and heavy-tailed activations (``tokens`` x ``hidden``)."""
    from moewire.testing.data import gaussian, heavy_tailed, sqnr_db

    gen = torch.Generator()
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    data = {
        "gaussian": gaussian(tokens, hidden, generator=gen),
        "heavy_tailed": heavy_tailed(tokens, hidden, generator=gen),
    }
    base = baseline_row_bytes(hidden, num_experts)
    records = []
    for fmt in FORMATS:
        block = format_class(fmt).block
        if hidden % block:
            records.extend(
                {
                    "format": fmt,
                    "routing": mode,
                    "error": f"hidden {hidden} is not a multiple of the format's block {block}",
                }
                for mode in ROUTING_MODES
            )
            continue
        sqnr = {}
        for name, x in data.items():
            g = nvfp4_global_scale(x) if format_class(fmt).needs_global_scale else None
            spec = WireSpec(fmt, hidden, global_scale=g)
            sqnr[name] = sqnr_db(x, spec.dequantize(spec.pack(x), torch.float32))
        for mode in ROUTING_MODES:
            spec = WireSpec(
                fmt,
                hidden,
                global_scale=1.0 if format_class(fmt).needs_global_scale else None,
                extras=routing_extras(mode, num_experts, top_k),
            )
            sec = spec.sections
            extras_bytes = sum(sec[n].nbytes for n in spec.extras)
            records.append(
                {
                    "format": fmt,
                    "routing": mode,
                    "payload_bytes": sec["payload"].nbytes,
                    "scale_bytes": sec["scales"].nbytes,
                    "extras_bytes": extras_bytes,
                    "row_bytes": spec.row_bytes,
                    "baseline_row_bytes": base,
                    "ratio_vs_baseline": base / spec.row_bytes,
                    "sqnr_gaussian_db": sqnr["gaussian"],
                    "sqnr_heavy_tailed_db": sqnr["heavy_tailed"],
                }
            )
    return records


def _cmd_formats(args: argparse.Namespace) -> int:
    records = formats_table(args.hidden, args.experts, args.topk, args.tokens, args.seed)
    if args.json:
        json.dump(
            {
                "hidden": args.hidden,
                "experts": args.experts,
                "topk": args.topk,
                "tokens": args.tokens,
                "formats": records,
            },
            sys.stdout,
            indent=2,
        )
        print()
        return 0
    base = baseline_row_bytes(args.hidden, args.experts)
    print(
        f"wire rows for hidden={args.hidden}, experts={args.experts}, top-k={args.topk}; "
        f"baseline (vLLM before its PR 30014): bf16 + fp32 router logits = "
        f"{base} bytes/token"
    )
    print(
        f"SQNR measured now on {args.tokens} random tokens "
        "(nvfp4 global scale calibrated on the same data)\n"
    )
    rows = [
        [
            r["format"],
            r["routing"],
            r["payload_bytes"],
            r["scale_bytes"],
            r["extras_bytes"],
            r["row_bytes"],
            f"{r['baseline_row_bytes']} -> {r['row_bytes']}",
            f"{r['ratio_vs_baseline']:.2f}x",
            f"{r['sqnr_gaussian_db']:.2f}",
            f"{r['sqnr_heavy_tailed_db']:.2f}",
        ]
        if "error" not in r
        else [r["format"], r["routing"], "-", "-", "-", "-", "-", "-", "-", "-"]
        for r in records
    ]
    notes = {f"{r['format']}: {r['error']}" for r in records if "error" in r}
    headers = [
        "format",
        "routing",
        "payload B",
        "scales B",
        "extras B",
        "row B",
        "vs baseline",
        "smaller",
        "SQNR gauss dB",
        "SQNR heavy dB",
    ]
    print(render_table(headers, rows))
    for note in sorted(notes):
        print(f"- {note}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from moewire.check import CHECKS, run_checks

    unknown = [c for c in args.checks if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; choose from {list(CHECKS)}")
    return run_checks(args.checks or None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moewire",
        description="Quantize MoE token activations before they cross ranks.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("formats", help="bytes per token and measured accuracy of every wire format")
    f.add_argument("--hidden", type=int, default=7168, help="hidden size H (default 7168)")
    f.add_argument("--experts", type=int, default=256, help="number of experts E (default 256)")
    f.add_argument("--topk", type=int, default=8, help="experts per token K (default 8)")
    f.add_argument("--tokens", type=int, default=256, help="random tokens for SQNR (default 256)")
    f.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")
    f.add_argument("--json", action="store_true", help="print JSON instead of a table")
    f.set_defaults(func=_cmd_formats)

    from moewire.bench import main as bench

    b = sub.add_parser(
        "bench",
        help="quantize / dispatch / combine / layer benchmarks",
        description="Measure the routines side by side, baseline first. With no GPU: up to "
        "4 CPU processes (one per core) with gloo and small shapes; with GPUs: NCCL on every "
        "visible GPU and DeepSeek-R1 shapes. Also runs unchanged under torchrun.",
    )
    bench.add_arguments(b)
    b.set_defaults(func=bench.run)

    c = sub.add_parser(
        "check",
        help="correctness self-test on this machine (bit-exactness, invariance, layer)",
    )
    c.add_argument(
        "checks",
        nargs="*",
        metavar="CHECK",
        help="any of formats, kernels, invariance, layer (default: all)",
    )
    c.set_defaults(func=_cmd_check)

    from moewire.bench.routines import eval as eval_main

    ev = sub.add_parser(
        "eval",
        help="perplexity, KL and top-1 agreement of a trained MoE model per configuration",
        description="Run a transformers MoE causal LM over held-out text, its MoE layers "
        "expert-parallel, once unquantized and once per dispatch/combine configuration.",
    )
    eval_main.add_arguments(ev)
    ev.set_defaults(func=eval_main.run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("hidden", "experts", "topk", "tokens", "seq_len", "batch"):
        value = getattr(args, name, None)
        if isinstance(value, int) and value <= 0:
            print(f"moewire: error: --{name} must be positive, got {value}", file=sys.stderr)
            return 2
    experts, topk = getattr(args, "experts", None), getattr(args, "topk", None)
    if experts is not None and topk is not None and topk > experts:
        print(
            f"moewire: error: --topk {topk} is more than --experts {experts} "
            "(each token picks top-k distinct experts)",
            file=sys.stderr,
        )
        return 2
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        print(f"moewire: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
