"""The model that routine ``model`` times: a ``transformers`` DeepSeek-V3 with random
weights, built on the meta device and materialized without its routed experts, each rank
holding only its own experts' shard, every MoE block swapped for moewire's
:class:`~moewire.integrations.transformers.EPMoEBlock` (what
:func:`~moewire.integrations.transformers.expert_parallel` builds). See ``model.py``'s
docstring for the sizes and the seeding.

Shape legend: ``L`` local experts, ``H`` hidden, ``I`` expert width.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moewire.bench.presets import ModelShape

#: DeepSeek-R1's attention and vocabulary (config.json of deepseek-ai/DeepSeek-R1).
R1_ATTENTION = {
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "vocab_size": 129280,
    "intermediate_size": 18432,
    "max_position_embeddings": 163840,
}
TINY_ATTENTION = {
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 64,
    "kv_lora_rank": 32,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 32,
    "v_head_dim": 32,
    "vocab_size": 512,
    "intermediate_size": 512,
    "max_position_embeddings": 4096,
}


def model_config(shape: ModelShape, layers: int, on_gpu: bool):
    """A ``transformers.DeepseekV3Config``: the MoE sizes of ``shape``, DeepSeek-R1's
    attention and vocabulary on GPU (tiny ones on CPU), ``layers`` MoE layers, bf16."""
    import transformers

    if shape.router != "deepseek_v3":
        raise ValueError(
            f"bench model builds DeepSeek-V3 models; shape {shape.name!r} has router "
            f"{shape.router!r} (use --model deepseek-r1 or cpu-small)"
        )
    if layers <= 0:
        raise ValueError(f"--layers must be positive, got {layers}")
    return transformers.DeepseekV3Config(
        **(R1_ATTENTION if on_gpu else TINY_ATTENTION),
        hidden_size=shape.hidden,
        moe_intermediate_size=shape.intermediate,
        n_routed_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        n_group=shape.n_group,
        topk_group=shape.topk_group,
        routed_scaling_factor=shape.routed_scaling_factor,
        norm_topk_prob=shape.renormalize,
        n_shared_experts=1,
        first_k_dense_replace=0,
        num_hidden_layers=layers,
        attn_implementation="sdpa",
        dtype=torch.bfloat16,
    )


def weight_bytes(cfg, world_size: int, fp8: bool) -> tuple[int, int]:
    """``(fixed, per layer)`` bytes of weights one rank holds: embeddings, final norm and
    LM head; and per layer the attention, norms, router and shared expert (bf16) plus the
    rank's ``E/W`` routed experts (bf16, and their e4m3 copies and fp32 channel scales
    when ``fp8``)."""
    import transformers

    one = transformers.DeepseekV3Config(**{**cfg.to_dict(), "num_hidden_layers": 1})
    with torch.device("meta"):
        m = transformers.DeepseekV3ForCausalLM(one)
    layer = sum(p.numel() for n, p in m.model.layers[0].named_parameters() if ".experts." not in n)
    fixed = sum(p.numel() for n, p in m.named_parameters() if ".layers." not in n)
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    local = cfg.n_routed_experts // world_size
    experts = local * 3 * h * i * (2 + (1 if fp8 else 0)) + (local * 3 * h * 4 if fp8 else 0)
    return 2 * fixed, 2 * layer + experts


def build_model(cfg, device: torch.device, seed: int) -> nn.Module:
    """``DeepseekV3ForCausalLM`` in bf16 on ``device`` without its routed experts.

    Built on the meta device, then every remaining weight materialized and filled from a
    generator seeded with ``seed`` (the same values on every rank): normal with std
    ``initializer_range``, RMSNorm weights 1, score correction bias 0. Each MoE block
    keeps its ``gate`` and ``shared_experts``; ``experts`` is deleted.
    """
    import transformers

    with torch.device("meta"):
        model = transformers.DeepseekV3ForCausalLM(cfg)
    model.to(torch.bfloat16)
    for layer in model.model.layers:
        del layer.mlp.experts
    model.to_empty(device=device)
    rotary = type(model.model.rotary_emb)
    with torch.device(device):
        model.model.rotary_emb = rotary(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, cfg.initializer_range, generator=gen)
        for layer in model.model.layers:
            layer.mlp.gate.e_score_correction_bias.zero_()
    return model.eval()


def expert_shard(
    cfg, layer: int, first: int, num: int, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts ``[first, first + num)`` of layer ``layer``: bf16 ``w13 [L, 2I, H]`` (gate
    rows, then up rows) and ``w2 [L, H, I]``, normal with std ``initializer_range``; expert
    ``e`` comes from its own seed, so any shard is the slice of the global weights."""
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    w13 = torch.empty(num, 2 * i, h, dtype=torch.bfloat16, device=device)
    w2 = torch.empty(num, h, i, dtype=torch.bfloat16, device=device)
    gen = torch.Generator(device=device)
    std = cfg.initializer_range
    for j in range(num):
        gen.manual_seed(((seed * 1000 + layer) * 100_000 + first + j) * 2 + 1)
        w13[j].normal_(0.0, std, generator=gen)
        w2[j].normal_(0.0, std, generator=gen)
    return w13, w2


def swap_in(
    model: nn.Module,
    blocks: list[nn.Module],
    shards: list[tuple[torch.Tensor, torch.Tensor]],
    group: dist.ProcessGroup,
    scales: list[float] | None,
    **layer_kwargs,
) -> None:
    """Put one ``EPMoEBlock`` per layer into ``model`` (what ``expert_parallel`` builds),
    from the original blocks' ``gate``/``shared_experts`` and this rank's expert shards.
    Each layer's previous block is released before the next one is built."""
    from moewire.bench.routines.layer import layer_config
    from moewire.integrations.transformers import EPMoEBlock
    from moewire.moe import EPMoE

    for idx, (layer, block, (w13, w2)) in enumerate(
        zip(model.model.layers, blocks, shards, strict=True)
    ):
        layer.mlp = None
        cfg = layer_config(_shape_of(model.config))
        moe = EPMoE(
            cfg,
            group,
            comm="allgather",
            routing="logits",
            global_scale=scales[idx] if scales else None,
            shared_expert=block.shared_experts,
            **layer_kwargs,
        )
        # only this rank's slice exists (the global weights of a DeepSeek-R1 layer take
        # 22 GB); bf16 contiguous weights are kept without a copy, shared by the layers
        moe.load_local_experts(w13, w2, block.gate.e_score_correction_bias.detach())
        layer.mlp = EPMoEBlock(block.gate, moe, fp32_logits=True)


def _shape_of(cfg) -> ModelShape:
    return ModelShape(
        "model",
        cfg.hidden_size,
        cfg.moe_intermediate_size,
        cfg.n_routed_experts,
        cfg.num_experts_per_tok,
        "deepseek_v3",
        cfg.n_group,
        cfg.topk_group,
        float(cfg.routed_scaling_factor),
        renormalize=bool(cfg.norm_topk_prob),
    )
