"""Routing: router logits -> top-k expert ids and weights, in fp32, deterministically.

Every rank that routes the same logits row picks the same experts with bitwise the same
weights: the math is row-local fp32 and top-k is a stable descending sort, so ties go to
the lower expert id on every device and batch size (``torch.topk`` leaves tie order
unspecified). This is what lets ``routing="logits"`` route after the dispatch (the seed's
way) and still agree with the sender.

Shape legend: ``T`` tokens, ``E`` experts, ``K`` top-k, ``G`` expert groups.
"""

from __future__ import annotations

import torch

from moewire.moe.config import MoEConfig

#: Added to the denominator of the DeepSeek-V3 renormalization (as in its reference code).
DSV3_RENORM_EPS = 1e-20


def _topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest along the last dim, descending, ties to the lower index."""
    values, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], idx[..., :k]


def check_router_bias(config: MoEConfig, router_bias_E: torch.Tensor | None) -> None:
    """Raise unless ``router_bias_E`` fits ``config`` (``deepseek_v3`` only, float ``[E]``)."""
    if router_bias_E is None:
        return
    if config.router != "deepseek_v3":
        raise ValueError(
            f"router_bias (the expert score correction bias) is only used by "
            f"router='deepseek_v3', got it with router={config.router!r}"
        )
    if not isinstance(router_bias_E, torch.Tensor):
        raise TypeError(f"router_bias must be a torch.Tensor, got {type(router_bias_E).__name__}")
    if not router_bias_E.is_floating_point():
        raise TypeError(f"router_bias must be floating point, got dtype {router_bias_E.dtype}")
    if tuple(router_bias_E.shape) != (config.num_experts,):
        raise ValueError(
            f"router_bias must be [E={config.num_experts}], got shape {tuple(router_bias_E.shape)}"
        )


def route(
    config: MoEConfig,
    router_logits_TE: torch.Tensor,
    router_bias_E: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's experts and their weights.

    Args:
        config: the layer (its ``router``, ``top_k``, ``renormalize``, groups, scaling).
        router_logits_TE: ``[T, E]`` float logits (any float dtype; upcast to fp32 first).
        router_bias_E: ``deepseek_v3`` only: the ``[E]`` per-expert correction bias added to
            the sigmoid scores for selection only (None = zeros).

    Returns:
        ``(topk_ids_TK, topk_weights_TK)``: int64 expert ids in ``[0, E)``, in descending
        order of the selection score (ties to the lower id), and their fp32 weights
        (``routed_scaling_factor`` applied).
    """
    if not isinstance(router_logits_TE, torch.Tensor):
        raise TypeError(
            f"router_logits must be a torch.Tensor, got {type(router_logits_TE).__name__}"
        )
    if not router_logits_TE.is_floating_point():
        raise TypeError(f"router_logits must be floating point, got {router_logits_TE.dtype}")
    e, k = config.num_experts, config.top_k
    if router_logits_TE.dim() != 2 or router_logits_TE.shape[1] != e:
        raise ValueError(
            f"router_logits must be [T, E={e}], got shape {tuple(router_logits_TE.shape)}"
        )
    check_router_bias(config, router_bias_E)
    logits = router_logits_TE.float()

    if config.router == "softmax":
        weights, ids = _topk(torch.softmax(logits, dim=-1), k)
        if config.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    else:
        scores = logits.sigmoid()
        choice = scores
        if router_bias_E is not None:
            choice = scores + router_bias_E.to(device=scores.device, dtype=torch.float32)
        g = config.n_group
        if config.topk_group < g:
            t = choice.shape[0]
            per_group = choice.view(t, g, config.group_size)
            group_scores = _topk(per_group, 2)[0].sum(dim=-1)
            group_idx = _topk(group_scores, config.topk_group)[1]
            keep = torch.zeros((t, g), dtype=torch.bool, device=choice.device)
            keep.scatter_(1, group_idx, True)
            keep = keep.unsqueeze(-1).expand(t, g, config.group_size).reshape(t, e)
            choice = choice.masked_fill(~keep, float("-inf"))
        ids = _topk(choice, k)[1]
        weights = scores.gather(1, ids)
        if config.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + DSV3_RENORM_EPS)
    if config.routed_scaling_factor != 1.0:
        weights = weights * config.routed_scaling_factor
    return ids, weights


def check_topk_ids(topk_ids_TK: torch.Tensor, num_experts: int, name: str = "topk_ids") -> None:
    """Raise ``ValueError`` naming the offending values unless every id is in ``[0, E)``.

    Call before any id is used as an index (one host sync)."""
    if topk_ids_TK.numel() == 0:
        return
    lo, hi = topk_ids_TK.min().item(), topk_ids_TK.max().item()
    if lo < 0 or hi >= num_experts:
        bad = topk_ids_TK[(topk_ids_TK < 0) | (topk_ids_TK >= num_experts)]
        raise ValueError(
            f"{name}: expert ids must be in [0, {num_experts}), got {bad[:8].tolist()} "
            f"(min {lo}, max {hi})"
        )
