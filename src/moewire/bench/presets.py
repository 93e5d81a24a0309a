"""Model shape presets for ``moewire bench --model``.

Each preset is the MoE layer of a published model, taken from its ``config.json`` on the
Hugging Face Hub (fields named in parentheses):

- ``deepseek-r1``: deepseek-ai/DeepSeek-R1 (DeepSeek-V3 architecture): hidden_size 7168,
  moe_intermediate_size 2048, n_routed_experts 256, num_experts_per_tok 8, scoring_func
  sigmoid, n_group 8, topk_group 4, routed_scaling_factor 2.5, norm_topk_prob true,
  n_shared_experts 1.
- ``qwen3-235b-a22b``: Qwen/Qwen3-235B-A22B: hidden_size 4096, moe_intermediate_size 1536,
  num_experts 128, num_experts_per_tok 8, norm_topk_prob true.
- ``qwen3-30b-a3b``: Qwen/Qwen3-30B-A3B: hidden_size 2048, moe_intermediate_size 768,
  num_experts 128, num_experts_per_tok 8, norm_topk_prob true.
- ``mixtral-8x7b``: mistralai/Mixtral-8x7B-v0.1: hidden_size 4096, intermediate_size 14336,
  num_local_experts 8, num_experts_per_tok 2.
- ``gpt-oss-120b``: openai/gpt-oss-120b: hidden_size 2880, intermediate_size 2880,
  num_local_experts 128, num_experts_per_tok 4 (softmax over the top-k logits).

``cpu-small`` is not a model: DeepSeek-R1's routing (256 experts, top-8) with hidden and
intermediate sizes scaled down so that the default CPU run finishes in about a minute.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """The MoE-layer shape of a model."""

    name: str
    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    router: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    renormalize: bool = True

    def __post_init__(self) -> None:
        for f in ("hidden", "intermediate", "num_experts", "top_k"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{f} must be a positive int, got {v!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} > num_experts={self.num_experts}")


PRESETS: dict[str, ModelShape] = {
    p.name: p
    for p in (
        ModelShape("deepseek-r1", 7168, 2048, 256, 8, "deepseek_v3", 8, 4, 2.5, renormalize=True),
        ModelShape("qwen3-235b-a22b", 4096, 1536, 128, 8),
        ModelShape("qwen3-30b-a3b", 2048, 768, 128, 8),
        ModelShape("mixtral-8x7b", 4096, 14336, 8, 2),
        ModelShape("gpt-oss-120b", 2880, 2880, 128, 4),
        ModelShape("cpu-small", 1024, 256, 256, 8, "deepseek_v3", 8, 4, 2.5, renormalize=True),
    )
}
