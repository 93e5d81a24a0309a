"""``MoEConfig``: the shapes and the router of one MoE layer (frozen, validated).

Shape legend: ``H`` hidden, ``I`` expert intermediate size, ``E`` routed experts,
``K`` experts per token (top-k), ``G`` expert groups (DeepSeek-V3 routing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Router names: ``softmax`` (Mixtral, Qwen2/3-MoE) and ``deepseek_v3`` (grouped sigmoid).
ROUTERS = ("softmax", "deepseek_v3")


def _check_pos_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"MoEConfig.{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"MoEConfig.{name} must be positive, got {value}")


@dataclass(frozen=True)
class MoEConfig:
    """One MoE layer: ``E`` SwiGLU experts ``H -> I -> H``, each token uses ``K`` of them.

    Args:
        hidden: ``H``.
        intermediate: ``I``, per expert.
        num_experts: ``E``, routed experts (shared experts are not counted here).
        top_k: ``K``, ``1 <= K <= E``.
        router: ``"softmax"``: ``p = softmax(logits)``, the ``K`` largest (ties to the lower
            expert id), weights ``p_k`` (``p_k / sum p`` with ``renormalize``), as in
            Mixtral / Qwen3-MoE. ``"deepseek_v3"``: ``s = sigmoid(logits)``; experts are
            chosen on ``s + correction_bias`` within the ``topk_group`` best of ``n_group``
            groups (a group's score is the sum of its two best biased scores); weights are
            the unbiased ``s_k`` (``s_k / (sum s + 1e-20)`` with ``renormalize``).
        renormalize: divide the top-k weights by their sum (``norm_topk_prob``).
        n_group: ``G`` (``deepseek_v3`` only): ``E`` is split into ``G`` contiguous groups of
            at least 2 experts.
        topk_group: groups a token may use (``deepseek_v3`` only), ``1 <= topk_group <= G``,
            with ``K <= topk_group * E / G``.
        routed_scaling_factor: multiplies the final top-k weights (1.0 for Mixtral/Qwen).
    """

    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    router: str = "softmax"
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "num_experts", "top_k", "n_group", "topk_group"):
            _check_pos_int(name, getattr(self, name))
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k must be <= num_experts, got top_k={self.top_k}, "
                f"num_experts={self.num_experts}"
            )
        if self.router not in ROUTERS:
            raise ValueError(f"MoEConfig.router must be one of {ROUTERS}, got {self.router!r}")
        if not isinstance(self.renormalize, bool):
            raise TypeError(
                f"MoEConfig.renormalize must be a bool, got {type(self.renormalize).__name__}"
            )
        f = self.routed_scaling_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)):
            raise TypeError(f"MoEConfig.routed_scaling_factor must be a float, got {f!r}")
        if not (math.isfinite(f) and f > 0):
            raise ValueError(f"MoEConfig.routed_scaling_factor must be finite and > 0, got {f}")
        if self.router == "softmax":
            if (self.n_group, self.topk_group) != (1, 1):
                raise ValueError(
                    "MoEConfig: n_group/topk_group are only used by router='deepseek_v3', got "
                    f"n_group={self.n_group}, topk_group={self.topk_group} with router='softmax'"
                )
            return
        e, g = self.num_experts, self.n_group
        if e % g or e // g < 2:
            raise ValueError(
                f"MoEConfig: num_experts={e} must split into n_group={g} groups of at least "
                "2 experts"
            )
        if self.topk_group > g:
            raise ValueError(
                f"MoEConfig.topk_group must be <= n_group, got topk_group={self.topk_group}, "
                f"n_group={g}"
            )
        if self.top_k > self.topk_group * (e // g):
            raise ValueError(
                f"MoEConfig: top_k={self.top_k} exceeds the experts in topk_group="
                f"{self.topk_group} groups of {e // g}"
            )

    @property
    def group_size(self) -> int:
        """Experts per group (``E / G``)."""
        return self.num_experts // self.n_group
