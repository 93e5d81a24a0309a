"""``moewire bench``: run the routines on every rank, print and write the report on rank 0."""

from __future__ import annotations

import argparse
import sys

from moewire.bench import routines
from moewire.bench.presets import PRESETS, ModelShape
from moewire.bench.routines import ROUTINES
from moewire.bench.runner import (
    BenchContext,
    cpu_cores,
    launch,
    resolve_world,
    write_csv,
    write_json,
    write_plot,
)
from moewire.bench.verdict import (
    LEGENDS,
    annotate,
    skipped_notes,
    verdict_lines,
)

DEFAULT_ROUTINES = ("quantize", "dispatch", "combine", "layer")
CPU_TOKENS = (16, 128, 512)
GPU_TOKENS = (1, 64, 256, 1024, 4096, 8192, 16384)


def resolve_shape(args: argparse.Namespace, on_gpu: bool) -> ModelShape:
    """The preset (``--model``; default deepseek-r1 on GPU, cpu-small on CPU) with the
    explicit overrides applied."""
    name = args.model or ("deepseek-r1" if on_gpu else "cpu-small")
    base = PRESETS[name]
    fields = {
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "num_experts": args.experts,
        "top_k": args.topk,
    }
    changed = {k: v for k, v in fields.items() if v is not None}
    if not changed:
        return base
    from dataclasses import replace

    return replace(base, name=f"{base.name} (modified)", **changed)


def _print_report(ctx: BenchContext, shape: ModelShape, records: list[dict]) -> None:
    env = ctx.env
    notes = skipped_notes(ctx.args, shape.hidden, ctx.is_cuda)
    from moewire.bench.routines.layer import fp8_skip_reason

    reason = fp8_skip_reason(ctx)
    if reason:
        notes["layer"].append(reason)
    annotate(records)
    print(
        f"\nmoewire bench: {env['card']} x{env['world_size']} ({env['backend']}), "
        f"torch {env['torch']}"
        + (f", NCCL {env['nccl']}" if "nccl" in env else "")
        + (f", triton {env['triton']}" if "triton" in env else "")
        + f", {env['date']}"
    )
    print(
        f"shape {shape.name}: hidden={shape.hidden} intermediate={shape.intermediate} "
        f"experts={shape.num_experts} top-k={shape.top_k}; "
        f"times are medians of {ctx.args.iters} iterations after {ctx.args.warmup} warm-up, "
        "slowest rank (layer on CPU and model: fewer, stated with their tables)"
    )
    for routine in dict.fromkeys(r["routine"] for r in records):
        recs = [r for r in records if r["routine"] == routine]
        print(f"\n## {routine}")
        print(routines.get(routine).render(ctx, recs))
        print(f"({LEGENDS[routine]})" if routine in LEGENDS else "", end="")
        for note in notes.get(routine, []):
            print(f"\n- {note}", end="")
        print()
    print("\n## verdict")
    print("\n".join(verdict_lines(records, ctx.env, cpu_cores())))


def bench_main(ctx: BenchContext) -> None:
    args = ctx.args
    shape = resolve_shape(args, ctx.is_cuda)
    if getattr(args, "model_tokens", None) is None:
        from moewire.bench.routines.model import CPU_SEQ, GPU_SEQ

        args.model_tokens = args.tokens or [GPU_SEQ if ctx.is_cuda else CPU_SEQ]
    if args.tokens is None:
        args.tokens = list(GPU_TOKENS if ctx.is_cuda else CPU_TOKENS)
    selected = args.routines or list(DEFAULT_ROUTINES)
    ctx.total_steps = sum(routines.get(r).steps(ctx, shape) for r in selected)
    records: list[dict] = []
    for routine in selected:
        records += routines.get(routine).run(ctx, shape)
    if ctx.rank != 0:
        return
    _print_report(ctx, shape, records)
    if args.json:
        write_json(args.json, ctx.env, records)
        print(f"\nwrote {args.json}")
    if args.csv:
        write_csv(args.csv, records)
        print(f"wrote {args.csv}")
    if args.plot:
        write_plot(args.plot, ctx.env, [r for r in records if "time_us" in r])
        print(f"wrote {args.plot}")
    sys.stdout.flush()


def add_arguments(p: argparse.ArgumentParser) -> None:
    _shape_arguments(p)
    _case_arguments(p)
    _run_arguments(p)


def _shape_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "routines",
        nargs="*",
        metavar="ROUTINE",
        help=f"any of {', '.join(ROUTINES)} (default: {' '.join(DEFAULT_ROUTINES)})",
    )
    p.add_argument(
        "--model",
        choices=sorted(PRESETS),
        default=None,
        help="shape preset (default: deepseek-r1 on GPU, cpu-small on CPU)",
    )
    p.add_argument("--hidden", type=int, help="override the preset's hidden size")
    p.add_argument("--intermediate", type=int, help="override the preset's expert width")
    p.add_argument("--experts", type=int, help="override the preset's number of experts")
    p.add_argument("--topk", type=int, help="override the preset's experts per token")
    p.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        help=f"tokens per rank (default: {' '.join(map(str, GPU_TOKENS))} on GPU, "
        f"{' '.join(map(str, CPU_TOKENS))} on CPU); routine model: prompt length per rank "
        "(default 2048 on GPU, 64 on CPU)",
    )
    p.add_argument(
        "--layers",
        type=int,
        help="routine model: decoder layers (default: as many as fit in 60%% of GPU memory; "
        "2 on CPU)",
    )
    p.add_argument(
        "--batch", type=int, default=1, help="routine model: prompts per rank (default 1)"
    )


def _case_arguments(p: argparse.ArgumentParser) -> None:
    from moewire.formats import FORMATS
    from moewire.formats.combine import COMBINE_WIRES

    p.add_argument(
        "--formats",
        nargs="+",
        choices=FORMATS,
        default=[f for f in FORMATS if f != "bf16"],
        help="quantized wire formats to measure (default: all)",
    )
    p.add_argument(
        "--combine-wires",
        nargs="+",
        choices=COMBINE_WIRES,
        default=[w for w in COMBINE_WIRES if w != "bf16"],
        help="quantized combine wires the combine routine measures after the unquantized "
        "cases (default: all)",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        choices=("allgather", "alltoall", "grouped"),
        default=["allgather", "alltoall"],
        help="dispatch backends (default: allgather alltoall; the baseline always runs)",
    )
    p.add_argument(
        "--routing",
        nargs="+",
        choices=("logits", "topk"),
        default=["logits", "topk"],
        help="what travels with each token (default: both)",
    )
    p.add_argument(
        "--skew",
        choices=("even", "skewed"),
        default="even",
        help="tokens per rank: the same on every rank, or split 1:2:..:W (default even)",
    )
    p.add_argument(
        "--fp8-expert-wires",
        nargs="+",
        choices=FORMATS,
        default=[],
        metavar="FORMAT",
        help="routine layer: also run fp8 experts fed by rows of these wire formats, "
        "quantized before the dispatch (default: none; fp8 rows always run)",
    )
    p.add_argument(
        "--graph",
        action="store_true",
        help="routine layer: also time the layer captured in a CUDA graph (GPU only)",
    )


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--world-size",
        type=int,
        help="ranks to spawn (default: one per GPU; on CPU 4, at most one per core)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if visible")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 20/50)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 3/10)")
    p.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    p.add_argument("--timeout", type=float, default=600.0, help="collective timeout, seconds")
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    p.add_argument("--csv", metavar="PATH", help="write every figure as CSV")
    p.add_argument("--plot", metavar="PATH", help="write a PNG plot")


def run(args: argparse.Namespace) -> int:
    import torch

    on_gpu = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    # Routine model: one forward is heavy, so fewer iterations unless asked.
    args.model_iters = args.iters if args.iters is not None else (5 if on_gpu else 2)
    args.model_warmup = args.warmup if args.warmup is not None else (2 if on_gpu else 1)
    if args.iters is None:
        args.iters = 50 if on_gpu else 20
    if args.warmup is None:
        args.warmup = 10 if on_gpu else 3
    unknown = [r for r in args.routines if r not in ROUTINES]
    if unknown:
        raise ValueError(f"unknown routine(s) {unknown}; choose from {list(ROUTINES)}")
    for name in ("iters", "hidden", "intermediate", "experts", "topk", "layers", "batch"):
        v = getattr(args, name, None)
        if v is not None and v <= 0:
            raise ValueError(f"--{name} must be positive, got {v}")
    if args.tokens and any(t < 0 for t in args.tokens):
        raise ValueError(f"--tokens must be >= 0, got {args.tokens}")
    if args.tokens and max(args.tokens) == 0:
        if "quantize" in args.routines:
            raise ValueError(
                f"routine quantize needs at least one --tokens value > 0 (got {args.tokens}): "
                "it times pack and dequantize of that many tokens"
            )
        if not args.routines:
            args.routines = [r for r in DEFAULT_ROUTINES if r != "quantize"]
            print("moewire bench: routine quantize skipped: every --tokens is 0", file=sys.stderr)
    shape = resolve_shape(args, on_gpu)  # validate overrides before spawning
    from moewire.bench.routines.layer import layer_config

    layer_config(shape)
    if "model" in args.routines:
        from moewire.bench.routines.model import model_shape

        if model_shape(shape, on_gpu).router != "deepseek_v3":
            raise ValueError(
                f"bench model builds DeepSeek-V3 models; shape {shape.name!r} has router "
                f"{shape.router!r} (use --model deepseek-r1 or cpu-small)"
            )
    _, world, _ = resolve_world(args)
    if shape.num_experts % world:
        raise ValueError(
            f"{shape.name}: num_experts={shape.num_experts} must be a multiple of the world "
            f"size {world} (experts are sharded contiguously); pick --world-size or --experts"
        )
    launch(bench_main, args)
    return 0
