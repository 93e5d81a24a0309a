"""Run an expert-parallel model over held-out sequences once per configuration.

Every rank takes its own sequences (``seqs[rank::W]``: attention data-parallel, as in
serving) and runs the model batch by batch. For each batch the model runs once with the
unquantized layers (:data:`~moewire.eval.configs.REFERENCE`), then once per configuration:
each MoE block's :class:`~moewire.EPMoE` is swapped for that configuration's, which shares
the rank's expert weights (no copy). So every configuration sees exactly the same tokens,
and the reference's log-probabilities are held one batch at a time (memory does not grow
with the vocabulary times the tokens).

nvfp4 dispatch calibrates its global scale per layer on the first batch (the largest
``|x|`` over every rank, ``EPMoE(global_scale=None)``), then keeps it, as a served model
keeps a calibrated scale.

Quantize before vs after: on the first batch, every quantized configuration with
``quantize="before"`` also runs with ``"after"`` and the logits are compared bitwise.

Shape legend: ``N`` sequences on this rank, ``B`` a batch of them, ``S`` sequence length,
``V`` vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from moewire.constants import ceil_div
from moewire.eval.configs import REFERENCE, EvalConfig
from moewire.eval.metrics import Metrics, log_probs
from moewire.integrations.transformers import EPMoEBlock
from moewire.moe import EPMoE


def _blocks(model: nn.Module) -> list[EPMoEBlock]:
    blocks = [m for m in model.modules() if isinstance(m, EPMoEBlock)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no expert-parallel MoE block")
    return blocks


def layers_for(blocks: list[EPMoEBlock], cfg: EvalConfig, group) -> list[EPMoE]:
    """One :class:`EPMoE` per block in configuration ``cfg``, on the blocks' expert shards.

    Raises:
        ValueError: the model cannot take ``cfg`` (e.g. hidden size not a multiple of the
            format's block), naming the configuration.
    """
    out = []
    for block in blocks:
        base = block.moe
        try:
            layer = EPMoE(
                base.config,
                group,
                comm=base.comm_name,
                experts="auto",
                combine_dtype=base.combine_dtype,
                shared_expert=base.shared_expert,
                **cfg.layer_kwargs(),
            )
        except ValueError as e:
            raise ValueError(f"configuration {cfg.name}: {e}") from None
        ex = base.local_experts
        layer.load_local_experts(ex.w13_L2IH, ex.w2_LHI, base.router_bias_E)
        out.append(layer)
    return out


def _forward(model, blocks, layers, ids_BS: torch.Tensor) -> torch.Tensor:
    for block, layer in zip(blocks, layers, strict=True):
        block.moe = layer
    with torch.no_grad():
        logits = model(input_ids=ids_BS, use_cache=False).logits
    return logits.reshape(-1, logits.shape[-1])


def run_eval(
    model: nn.Module,
    group: dist.ProcessGroup | None,
    seqs_NS: torch.Tensor,
    configs: list[EvalConfig],
    *,
    batch: int,
    progress: Callable[[str], None] = lambda s: None,
) -> dict:
    """Evaluate ``configs`` against the unquantized reference on this rank's sequences.

    Args:
        model: a causal LM whose MoE blocks are expert-parallel (:func:`expert_parallel`),
            on the device where it runs; every rank of ``group`` calls this together.
        group: the expert-parallel group (None: the default group).
        seqs_NS: int64 ``[N, S+1]`` this rank's sequences (inputs, then targets shifted by
            one); ``N`` the same on every rank.
        configs: the configurations to compare (the reference is added first).
        batch: sequences per forward.
        progress: called with one line per batch (rank 0 prints them).

    Returns:
        ``{"records": [reference's figures, then one dict per configuration: its fields,
        ppl, ppl_ratio, kl_mean, kl_p99, top1_same_pct, tokens], "before_after": {config
        name: bitwise equal (on every rank)}, "before_after_tokens": tokens compared}``.
    """
    blocks = _blocks(model)
    device = next(model.parameters()).device
    all_cfgs = [REFERENCE, *configs]
    layers = {cfg: layers_for(blocks, cfg, group) for cfg in all_cfgs}
    checks = [c for c in configs if c.quantize == "before" and c.quantized]
    metrics = {cfg: Metrics(device) for cfg in all_cfgs}
    equal: dict[EvalConfig, bool] = {}
    seqs_NS = seqs_NS.to(device)
    n_batches = ceil_div(seqs_NS.shape[0], batch)
    t0 = time.perf_counter()
    for i in range(n_batches):
        ids_BS = seqs_NS[i * batch : (i + 1) * batch]
        inputs, target = ids_BS[:, :-1], ids_BS[:, 1:].reshape(-1)
        ref = log_probs(_forward(model, blocks, layers[REFERENCE], inputs))
        metrics[REFERENCE].add(ref, ref, target)
        for cfg in configs:
            logits = _forward(model, blocks, layers[cfg], inputs)
            metrics[cfg].add(ref, log_probs(logits), target)
            if i == 0 and cfg in checks:
                after = layers_for(blocks, cfg.with_quantize("after"), group)
                equal[cfg] = torch.equal(logits, _forward(model, blocks, after, inputs))
        done = min((i + 1) * batch, seqs_NS.shape[0]) * inputs.shape[1]
        progress(
            f"batch {i + 1}/{n_batches}: {done} tokens per rank x {len(all_cfgs)} "
            f"configurations, {time.perf_counter() - t0:.1f} s"
        )
    for block, layer in zip(blocks, layers[REFERENCE], strict=True):
        block.moe = layer
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    checked = min(batch, seqs_NS.shape[0]) * (seqs_NS.shape[1] - 1) * world
    return _summarize(metrics, equal, group, checked, device)


def _summarize(metrics, equal, group, tokens_checked, device) -> dict:
    ref_cfg = next(iter(metrics))
    ref = metrics[ref_cfg].summary(group, None)
    records = [{**ref_cfg.layer_kwargs(), "config": ref_cfg.name, **ref}]
    for cfg, m in list(metrics.items())[1:]:
        records.append({**cfg.layer_kwargs(), "config": cfg.name, **m.summary(group, ref["ppl"])})
    flags = torch.tensor([int(v) for v in equal.values()], dtype=torch.int32, device=device)
    if dist.is_initialized() and flags.numel():
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
    before_after = {cfg.name: bool(f) for cfg, f in zip(equal, flags.tolist(), strict=True)}
    return {"records": records, "before_after": before_after, "before_after_tokens": tokens_checked}
