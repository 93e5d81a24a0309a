"""Train the small Qwen3-MoE causal LM that ``moewire eval`` runs on, from scratch.

    python tools/train_moe.py --size cpu --out ~/.cache/moewire/qwen3moe-cpu-s0
    python tools/train_moe.py --size gpu --out /tmp/qwen3moe-gpu          # one H200, < 8 min

No pretrained MoE checkpoint can be downloaded on these machines, so the model is trained
here on the built-in corpus (CPython's standard library source, :mod:`moewire.eval.corpus`)
with the byte tokenizer. Two sizes (:data:`SIZES`): ``cpu`` (32 experts, top-4, trains in
about a minute on 2 cores) and ``gpu`` (64 experts, top-8, a few minutes on one H200). The
expert count and top-k are those of real MoE models' regimes, so routing matters; the load
balancing loss of Qwen3-MoE keeps every expert in use.

Deterministic given the seed on CPU (batches from a seeded generator, fixed step count);
on GPU up to CUDA's nondeterministic reductions. ``time_limit_s`` stops early (and says so
in the log) rather than overrun a machine's time box. The checkpoint is saved in bf16 with
``save_pretrained`` (safetensors), plus ``train_log.json`` (the perplexity curve) and the
byte-tokenizer marker.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moewire.eval.corpus import BYTE_VOCAB, builtin_text, byte_ids, write_byte_tokenizer


@dataclass(frozen=True)
class TrainSize:
    """Model shape and training schedule of one size."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    experts: int
    top_k: int
    moe_intermediate: int
    seq_len: int
    batch: int
    steps: int
    lr: float
    eval_every: int


SIZES = {
    "cpu": TrainSize(128, 2, 4, 2, 32, 4, 64, 128, 16, 150, 3e-3, 25),
    "gpu": TrainSize(256, 6, 4, 2, 64, 8, 128, 256, 128, 1500, 2e-3, 100),
}


def model_config(size: TrainSize):
    """The ``Qwen3MoeConfig`` of a size (byte vocabulary, every layer MoE)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=BYTE_VOCAB,
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        head_dim=size.hidden // size.heads,
        intermediate_size=2 * size.hidden,
        moe_intermediate_size=size.moe_intermediate,
        num_experts=size.experts,
        num_experts_per_tok=size.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        max_position_embeddings=max(1024, size.seq_len),
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def _lr(step: int, size: TrainSize) -> float:
    warm = max(1, size.steps // 20)
    if step < warm:
        return size.lr * (step + 1) / warm
    t = (step - warm) / max(1, size.steps - warm)
    return size.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def heldout_loss(model, held_NS: torch.Tensor, batch: int, amp: bool) -> float:
    """Mean next-token cross entropy (nats) of ``model`` over ``held_NS`` (``[N, S+1]``)."""
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=amp):
        for i in range(0, held_NS.shape[0], batch):
            ids = held_NS[i : i + batch]
            logits = model(ids[:, :-1]).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(nll)
            count += ids[:, 1:].numel()
    return total / count


def _step(model, opt, ids: torch.Tensor, lr: float, amp: bool) -> float:
    for g in opt.param_groups:
        g["lr"] = lr
    with torch.autocast("cuda", torch.bfloat16, enabled=amp):
        out = model(ids[:, :-1])
    logits = out.logits.float()
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )
    loss = ce + model.config.router_aux_loss_coef * out.aux_loss.float()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(ce.detach())


def _build(size: TrainSize, device: torch.device, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    impl = "grouped_mm" if device.type == "cuda" else "eager"
    model = AutoModelForCausalLM.from_config(model_config(size), experts_implementation=impl)
    return model.to(device).train()


def train(
    size_name: str,
    out: str | Path,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    steps: int | None = None,
    time_limit_s: float | None = None,
    log=print,
) -> dict:
    """Train a size from scratch and save it to ``out``; returns the training log (also
    written to ``out/train_log.json``): config, steps run, and the curve
    ``[{step, train_loss, heldout_loss, heldout_ppl, seconds}]``."""
    size = SIZES[size_name]
    steps = size.steps if steps is None else steps
    size = TrainSize(**{**asdict(size), "steps": steps})
    device = torch.device(device)
    amp = device.type == "cuda"
    train_ids = byte_ids(builtin_text("train")).to(device)
    held_NS = _held_out(size.seq_len).to(device)
    model = _build(size, device, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=size.lr, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    t0, stopped = time.perf_counter(), None

    def point(step: int, loss: float | None) -> None:
        h = heldout_loss(model.eval(), held_NS, size.batch, amp)
        model.train()
        sec = time.perf_counter() - t0
        curve.append(
            {
                "step": step,
                "train_loss": loss,
                "heldout_loss": h,
                "heldout_ppl": math.exp(h),
                "seconds": sec,
            }
        )
        train_loss = "" if loss is None else f"  train loss {loss:.3f}"
        log(
            f"[train {size_name}] step {step}/{steps}{train_loss}  held-out loss {h:.3f}  "
            f"ppl {math.exp(h):.3f}  {sec:.0f} s"
        )

    curve: list[dict] = []
    point(0, None)
    for step in range(steps):
        hi = train_ids.numel() - size.seq_len - 1
        starts = torch.randint(0, hi, (size.batch,), generator=gen).to(device)
        ids = train_ids[starts[:, None] + torch.arange(size.seq_len + 1, device=device)]
        loss = _try_step(model, opt, ids, _lr(step, size), amp, step, log)
        last = step + 1 == steps
        over = time_limit_s is not None and time.perf_counter() - t0 > time_limit_s
        if (step + 1) % size.eval_every == 0 or last or over:
            point(step + 1, loss)
        if over and not last:
            stopped = f"time limit {time_limit_s} s reached after {step + 1} of {steps} steps"
            log(f"[train {size_name}] {stopped}")
            break
    return _save(model, out, size_name, size, seed, device, curve, stopped)


def _held_out(seq_len: int, n: int = 64) -> torch.Tensor:
    """The first ``n`` held-out sequences ``[n, seq_len + 1]``: the training curve's."""
    held = byte_ids(builtin_text("heldout"))
    n = min(n, (held.numel() - 1) // seq_len)
    return held[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len)


def _try_step(model, opt, ids, lr, amp, step, log) -> float:
    """One step; on the first, fall back to transformers' eager experts if grouped_mm fails."""
    try:
        return _step(model, opt, ids, lr, amp)
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
        if step != 0 or model.config._experts_implementation == "eager":
            raise
        log(f"[train] grouped_mm experts failed ({type(e).__name__}: {e}); using eager")
        model.set_experts_implementation("eager")
        return _step(model, opt, ids, lr, amp)


def _save(model, out, size_name, size, seed, device, curve, stopped) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out)
    write_byte_tokenizer(out)
    record = {
        "size": size_name,
        "shape": asdict(size),
        "seed": seed,
        "device": str(device),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "corpus": "CPython 3.11.7 stdlib (moewire/eval/data), byte tokens",
        "steps_run": curve[-1]["step"] if curve else 0,
        "stopped_early": stopped,
        "curve": curve,
    }
    (out / "train_log.json").write_text(json.dumps(record, indent=2))
    return record
