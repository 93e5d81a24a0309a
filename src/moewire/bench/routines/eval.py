"""The ``moewire eval`` command: arguments, launching the ranks, the printed report.

The measurement itself is :mod:`moewire.eval`; this module is its command-line front, beside
the benchmark's (it reuses the benchmark's launcher: torchrun's group when its variables
are set, else ``--world-size`` spawned processes, NCCL on GPUs or gloo on CPU).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from moewire.bench.runner import launch, render_table, write_csv, write_json
from moewire.eval.configs import COMBINE_WIRES, DISPATCH_FORMATS, grid
from moewire.eval.report import HEADERS, mark_recommended, summary_lines, table_rows


def _names(s: str) -> list[str]:
    return [v for v in s.split(",") if v]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``moewire eval``."""
    p.add_argument(
        "--model",
        help="local transformers checkpoint directory (default: the "
        "built-in Qwen3-MoE model, trained on first use)",
    )
    p.add_argument("--text", help="held-out text file (default: the built-in held-out split)")
    p.add_argument("--tokens", type=int, default=32768, help="tokens to evaluate (default 32768)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--batch", type=int, default=16, help="sequences per forward per rank")
    p.add_argument(
        "--formats",
        type=_names,
        default=list(DISPATCH_FORMATS),
        help="dispatch wire formats, comma separated (default: all)",
    )
    p.add_argument(
        "--combine",
        type=_names,
        default=list(COMBINE_WIRES),
        help="combine wires, comma separated (default bf16,fp8,nvfp4)",
    )
    p.add_argument("--routing", type=_names, default=["logits"], help="logits and/or topk")
    p.add_argument("--quantize", type=_names, default=["before"], help="before and/or after")
    p.add_argument("--comm", default="allgather", choices=["allgather", "alltoall"])
    p.add_argument("--world-size", type=int, help="ranks to spawn (default: GPUs, or 2 on CPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a checkpoint whose model code lives in the checkpoint",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="collective timeout (s)")
    p.add_argument("--json", metavar="PATH", help="write the records as JSON")
    p.add_argument("--csv", metavar="PATH", help="write the records as CSV")


def run(args: argparse.Namespace) -> int:
    """Check everything in this process (one-line errors), then run every rank."""
    from moewire.bench.runner import resolve_world
    from moewire.eval.setup import (
        check_configs,
        ensure_builtin_model,
        held_out_sequences,
        model_shape,
    )

    on_gpu = args.device != "cpu" and torch.cuda.is_available()
    if args.world_size is None and "WORLD_SIZE" not in os.environ and not on_gpu:
        args.world_size = 2
    _, world, _ = resolve_world(args)
    args.configs = grid(args.formats, args.combine, args.routing, args.quantize)
    if args.model is None:
        args.model = str(ensure_builtin_model(lambda s: print(s, file=sys.stderr, flush=True)))
    hidden, experts, _ = model_shape(args.model, args.trust_remote_code)
    check_configs(args.configs, hidden, experts, world)
    args.seqs = held_out_sequences(
        args.model, args.text, args.seq_len, args.tokens, world, args.trust_remote_code
    )
    launch(worker, args)
    return 0


def worker(ctx) -> None:
    """One rank: load its shard of the model, evaluate, and (rank 0) report."""
    from moewire.eval.runner import run_eval
    from moewire.integrations.checkpoint import load_expert_parallel

    args, rank = ctx.args, ctx.rank
    model, names = load_expert_parallel(
        args.model,
        ctx.group,
        device=ctx.device,
        comm=args.comm,
        trust_remote_code=args.trust_remote_code,
        # unquantized reference: the experts' partial sums travel in fp32, so bf16 rows
        # with the bf16 combine wire are the unsharded model up to fp32 reassociation
        combine_dtype=torch.float32,
    )
    seqs = args.seqs[rank :: ctx.world_size]

    def progress(line: str) -> None:
        if rank == 0:
            print(f"[eval] {line}", file=sys.stderr, flush=True)

    progress(
        f"{args.model}: {len(names)} MoE blocks expert-parallel over {ctx.world_size} "
        f"rank(s) ({args.comm}); {args.seqs.shape[0]} sequences of {args.seq_len} tokens; "
        f"{len(args.configs)} configurations + the unquantized reference"
    )
    result = run_eval(model, ctx.group, seqs, args.configs, batch=args.batch, progress=progress)
    if rank == 0:
        _report(args, ctx.env, result)


def _report(args: argparse.Namespace, env: dict, result: dict) -> None:
    records = result["records"]
    mark_recommended(records)
    print(
        f"moewire eval: {args.model}, {env['card']}, {env['world_size']} rank(s), "
        f"{records[0]['tokens']} tokens, seq-len {args.seq_len}, comm {args.comm}"
    )
    print(render_table(HEADERS, table_rows(records)))
    for line in summary_lines(result):
        print(line)
    env = {
        **env,
        "model": args.model,
        "seq_len": args.seq_len,
        "comm": args.comm,
        "before_after": result["before_after"],
        "before_after_tokens": result["before_after_tokens"],
    }
    if args.json:
        write_json(args.json, env, records)
    if args.csv:
        write_csv(args.csv, records)
