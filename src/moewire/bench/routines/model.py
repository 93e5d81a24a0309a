"""Routine ``model`` of ``moewire bench``: prefill throughput of a DeepSeek-V3 model.

What is measured: tokens per second of one prefill forward (input length ``--tokens``,
default 2048; output length 1, so the LM head runs on the last position only) of the
transformers implementation of DeepSeek-V3 (``DeepseekV3ForCausalLM``) with random
weights, attention data-parallel (each rank runs its own ``--batch`` prompts, default 1)
and every MoE layer replaced by moewire's :class:`~moewire.EPMoE` over all ranks
(``comm="allgather"``, ``routing="logits"``, as in vLLM PR 30014). Throughput is
``W * batch * seq / time``, with ``time`` the median forward time of the slowest rank.

Cases, vLLM's path before its PR 30014 first (the baseline of the speedup column):

1. ``bf16 rows (before PR 30014), bf16 experts``: bf16 rows plus fp32 router logits gathered;
2. ``nvfp4 rows, bf16 experts``: PR 30014's change (4-bit rows on the wire; on Hopper the
   experts dequantize and run in bf16, there is no FP4 GEMM), one static global scale per
   layer, calibrated on case 1's inputs of that layer (``448*6 / amax`` over all ranks);
3. ``fp8 after dispatch (pre-PR-30014 path), fp8 experts``: bf16 rows travel, the receiver
   quantizes to fp8 for the fp8 grouped GEMM (the Hopper analogue of PR 30014's "before");
4. ``fp8 before dispatch, fp8 experts``: fp8 rows on the wire, consumed by the fp8 GEMM.

Cases 3 and 4 need ``torch._scaled_grouped_mm`` (CUDA sm90+) and are skipped elsewhere,
with the reason printed. Before timing, every case's forward must complete on every rank
with finite logits; the SQNR of each case's last-position logits against case 1 (same
prompts, same weights) is reported, worst rank.

The model: DeepSeek-R1's layer sizes on GPU (hidden 7168, 128 heads, q_lora_rank 1536,
kv_lora_rank 512, qk_nope/rope 128/64, v_head_dim 128, 256 routed experts of width 2048,
top-8 in 8 groups (top-4 groups), routed_scaling_factor 2.5, one shared expert, vocab
129280), ``first_k_dense_replace=0`` (every layer MoE), RoPE without YaRN scaling (it
changes nothing that is timed), and ``--layers`` layers (default: as many as fit in 60%
of the GPU's memory, counting each rank's ``E/W`` experts per layer in bf16 plus their fp8
copies, the full attention, router and shared expert per layer, and the embeddings and
LM head; computed from parameter counts). On CPU: 2 layers of a tiny model (hidden 256,
16 experts, top-4, 4 heads, vocab 512) unless the shape options say otherwise.

The model is built on the meta device, its dense weights materialized with ``to_empty``
and filled with seeded normal values (std ``initializer_range``, norms 1, the router's
score correction bias 0; the same on every rank), and the routed experts never exist in
full: each rank fills only its shard ``[E/W, 2I, H]`` (each expert from its own seed, so a
shard is exactly the slice of the global weights) and the swap builds what
:func:`moewire.integrations.transformers.expert_parallel` builds
(``EPMoEBlock(gate, EPMoE(..., shared_expert=shared_experts), fp32_logits=True)``);
tests/test_bench_model.py checks that the two give bitwise the same logits.

How it differs from vLLM PR 30014's benchmark (69219 -> 73714 tok/s, +6.5%, 4x GB200,
the full 61-layer model with FP4 weights): no serving engine (no KV cache, no batching
scheduler, no CUDA graphs or fused attention/MLA kernels): transformers' own attention
(``sdpa``) in eager PyTorch, bf16 (or fp8) expert weights, fewer layers; so the absolute
tokens/s are not comparable, only the ratios between the cases of one run.

Commands (NCCL on all visible GPUs; CPU with 4 gloo ranks when there is no GPU)::

    python -m moewire bench model                       # 4 GPUs: W=4, 2048 tokens/rank
    python -m moewire bench model --world-size 2        # or CUDA_VISIBLE_DEVICES=0,1

Shape legend: ``B`` batch per rank, ``S`` sequence, ``V`` vocabulary, ``L`` local experts,
``H`` hidden, ``I`` expert width.
"""

from __future__ import annotations

import gc

import torch
from torch import nn

from moewire.bench.presets import PRESETS, ModelShape
from moewire.bench.routines.layer import FP8_CASES, fp8_skip_reason
from moewire.bench.routines.model_build import (
    build_model,
    expert_shard,
    model_config,
    swap_in,
    weight_bytes,
)
from moewire.bench.runner import BenchContext
from moewire.formats import format_class
from moewire.testing.data import sqnr_db

#: Fraction of GPU memory the default layer count fills with weights.
MEMORY_FRACTION = 0.6
#: Default sequence length per rank (PR 30014's input length) and the CPU default.
GPU_SEQ, CPU_SEQ = 2048, 64
#: The CPU default shape (when the preset is the unmodified ``cpu-small``).
CPU_TINY = ModelShape("cpu-tiny-model", 256, 128, 16, 4, "deepseek_v3", 4, 2, 2.5)


def model_cases(ctx: BenchContext) -> list[tuple[str, dict]]:
    """``(label, EPMoE keyword arguments)`` per case, the baseline first."""
    cases = [
        ("bf16 rows (before PR 30014), bf16 experts", {"wire": "bf16", "experts": "auto"}),
        ("nvfp4 rows, bf16 experts", {"wire": "nvfp4", "experts": "auto"}),
    ]
    if fp8_skip_reason(ctx) is None:
        cases += FP8_CASES
    return cases


def model_shape(shape: ModelShape, on_gpu: bool) -> ModelShape:
    """The MoE shape of the model: the preset, except the tiny CPU default for an
    unmodified ``cpu-small`` on CPU."""
    return CPU_TINY if not on_gpu and shape == PRESETS["cpu-small"] else shape


def fit_layers(ctx: BenchContext, shape: ModelShape, fp8: bool) -> int:
    """Layers whose weights fit in :data:`MEMORY_FRACTION` of the smallest GPU (CPU: 2)."""
    if not ctx.is_cuda:
        return 2
    cfg = model_config(shape, 1, True)
    fixed, per_layer = weight_bytes(cfg, ctx.world_size, fp8)
    total = torch.cuda.get_device_properties(ctx.device).total_memory
    total = -ctx.max_over_ranks(-float(total))
    n = int((MEMORY_FRACTION * total - fixed) // per_layer)
    if n < 1:
        raise ValueError(
            f"bench model: one layer ({per_layer / 1e9:.1f} GB per rank) plus embeddings "
            f"({fixed / 1e9:.1f} GB) do not fit in {MEMORY_FRACTION:.0%} of "
            f"{total / 1e9:.1f} GB; use more ranks or --layers"
        )
    return n


def _moe_input_amax(model: nn.Module, fn) -> list[float]:
    """Per layer, the largest |input| of the MoE block during ``fn()`` (this rank)."""
    amax = [0.0] * len(model.model.layers)
    hooks = []
    for idx, layer in enumerate(model.model.layers):

        def hook(_m, inputs, idx=idx):
            x = inputs[0]
            if x.numel():
                amax[idx] = max(amax[idx], float(x.abs().max()))

        hooks.append(layer.mlp.register_forward_pre_hook(hook))
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return amax


def _describe(cfg, world_size: int) -> str:
    return (
        f"DeepSeek-V3 ({type(cfg).__name__}, random weights, bf16): "
        f"{cfg.num_hidden_layers} layers (all MoE), hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads, q/kv lora {cfg.q_lora_rank}/{cfg.kv_lora_rank}, "
        f"vocab {cfg.vocab_size}, {cfg.n_routed_experts} experts x "
        f"{cfg.moe_intermediate_size} ({cfg.n_routed_experts // world_size}/rank), "
        f"top-{cfg.num_experts_per_tok}, 1 shared expert; attention {cfg._attn_implementation}"
    )


def run_model(ctx: BenchContext, shape: ModelShape) -> list[dict]:
    """Prefill tokens/s of each case (see the module docstring) for each sequence length.

    Options read from ``ctx.args``: ``model_tokens`` (sequence lengths per rank),
    ``batch``, ``layers`` (None: fit), ``model_iters``, ``model_warmup``, ``seed``.
    Returns one record per (sequence length, case).
    """
    args = ctx.args
    shape = model_shape(shape, ctx.is_cuda)
    cases = model_cases(ctx)
    has_fp8 = any(kw["wire"] == "fp8" for _, kw in cases)
    layers = args.layers or fit_layers(ctx, shape, has_fp8)
    cfg = model_config(shape, layers, ctx.is_cuda)
    seqs = list(args.model_tokens)
    _check_lengths(cfg, args.batch, seqs)
    if ctx.rank == 0 and (reason := fp8_skip_reason(ctx)):
        print(reason, flush=True)
    model = build_model(cfg, ctx.device, args.seed)
    blocks = [layer.mlp for layer in model.model.layers]
    local = cfg.n_routed_experts // ctx.world_size
    first = ctx.rank * local
    shards = [expert_shard(cfg, idx, first, local, ctx.device, args.seed) for idx in range(layers)]
    ctx.barrier()
    records = []
    for seq in seqs:
        records += _seq_records(ctx, model, blocks, shards, cases, seq)
    for layer in model.model.layers:  # release the EPMoE layers (and their comms)
        layer.mlp = None
    shards.clear()
    gc.collect()
    ctx.barrier()
    return records


def _check_lengths(cfg, batch: int, seqs: list[int]) -> None:
    if batch <= 0 or any(s <= 0 for s in seqs):
        raise ValueError(f"bench model: --batch and --tokens must be >= 1, got {batch}, {seqs}")
    if max(seqs) > cfg.max_position_embeddings:
        raise ValueError(
            f"--tokens {max(seqs)} > max_position_embeddings {cfg.max_position_embeddings}"
        )


def _seq_records(ctx: BenchContext, model, blocks, shards, cases, seq: int) -> list[dict]:
    """Every case at prompt length ``seq``, the baseline first: swapped in, run once
    (the baseline's run calibrates the nvfp4 scales), checked, timed."""
    args, batch = ctx.args, ctx.args.batch
    gen = torch.Generator().manual_seed(args.seed * 7919 + ctx.rank)
    ids_BS = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen).to(ctx.device)

    def forward(ids=ids_BS) -> torch.Tensor:
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

    records, base_time, ref_BV, scales = [], None, None, None
    for label, kw in cases:
        ctx.progress(f"model S={seq} {label}")
        needs_g = format_class(kw["wire"]).needs_global_scale
        if needs_g and scales is None:
            raise RuntimeError("internal: the nvfp4 case needs case 1's calibration")
        swap_in(model, blocks, shards, ctx.group, scales if needs_g else None, **kw)
        with torch.inference_mode():
            if ref_BV is None:
                logits_BV, scales = _calibrated_forward(ctx, model, forward)
            else:
                logits_BV = forward()
            logits_BV = logits_BV[:, -1].float()
            ref_BV = logits_BV if ref_BV is None else ref_BV
            sq, t = _checked_time(ctx, forward, label, logits_BV, ref_BV)
        peak = None
        if ctx.is_cuda:
            peak = ctx.max_over_ranks(float(torch.cuda.max_memory_allocated(ctx.device)))
        base_time = base_time or t
        records.append(
            {
                "routine": "model",
                "case": label,
                "baseline": label == cases[0][0],
                "layers": model.config.num_hidden_layers,
                "batch": batch,
                "seq": seq,
                "tokens": batch * seq,
                "tokens_per_s": ctx.world_size * batch * seq / t,
                "time_us": t * 1e6,
                "speedup": base_time / t,
                "peak_mem_GB": peak / 1e9 if peak is not None else None,
                "sqnr_vs_first_db": sq,
                "bytes_per_token": model.model.layers[0].mlp.moe.travel_spec.row_bytes,
                "model": _describe(model.config, ctx.world_size),
            }
        )
    return records


def _calibrated_forward(ctx: BenchContext, model: nn.Module, forward) -> tuple:
    """The logits of one ``forward()``, and the nvfp4 global scale of each layer calibrated
    on its MoE inputs there (largest over ranks)."""
    from moewire.formats.nvfp4 import nvfp4_global_scale

    out: dict = {}
    amax = _moe_input_amax(model, lambda: out.setdefault("y", forward()))
    scales = [nvfp4_global_scale(max(ctx.max_over_ranks(a), 1e-6)) for a in amax]
    return out["y"], scales


def _checked_time(ctx: BenchContext, forward, label: str, logits_BV, ref_BV) -> tuple:
    """``(SQNR of logits vs ref (worst rank), seconds per forward)`` once the logits are
    finite on every rank; the peak-memory counter is reset before the timed forwards."""
    if not ctx.all_true(bool(torch.isfinite(logits_BV).all())):
        raise RuntimeError(f"bench model: {label}: non-finite logits on some rank")
    sq = -ctx.max_over_ranks(-sqnr_db(ref_BV, logits_BV))
    if ctx.is_cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    return sq, ctx.time(forward, ctx.args.model_iters, ctx.args.model_warmup)


def render(ctx: BenchContext, recs: list[dict]) -> str:
    """The model named, its timing line and its table."""
    from moewire.bench.runner import fmt_num, render_table

    headers = ["case", "layers", "B x S /rank", "tok/s total", "ms/forward", "speedup",
               "peak GB", "logits SQNR vs first dB"]  # fmt: skip
    rows = [
        [r["case"], r["layers"], f"{r['batch']} x {r['seq']}", fmt_num(r["tokens_per_s"], 0),
         fmt_num(r["time_us"] / 1e3, 2), f"{r['speedup']:.3f}x", fmt_num(r["peak_mem_GB"], 1),
         fmt_num(r["sqnr_vs_first_db"], 1)]
        for r in recs
    ]  # fmt: skip
    return (
        f"{recs[0]['model']}\ntimes: median of {ctx.args.model_iters} forwards after "
        f"{ctx.args.model_warmup} warm-up, slowest rank; speedup vs the first case\n"
        + render_table(headers, rows)
    )


def steps(ctx: BenchContext, shape: ModelShape) -> int:
    """Progress steps: one per case and sequence length."""
    return len(ctx.args.model_tokens) * len(model_cases(ctx))
