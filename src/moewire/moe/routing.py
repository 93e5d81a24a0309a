"""Routing: router logits -> top-k expert ids and weights, in fp32, deterministically.

Every rank that routes the same logits row picks the same experts with bitwise the same
weights, whatever else is in its batch and on any device. That is what lets
``routing="logits"`` route after the dispatch (as vLLM PR 30014 does) and agree with the sender
(``alltoall`` sends by the sender's routing; the receiver routes again). torch's own
kernels do not promise it: on CPU, ``torch.exp``/``sigmoid`` take a vectorized or a scalar
path depending on where an element falls in the tensor (the tail of a chunk), and the two
differ in the last bit; reductions pick their order by layout. So:

- ``exp`` is Cody-Waite range reduction plus the Cephes ``expf`` polynomial (about 1 ulp),
  written with IEEE ``+ - * /`` and exact power-of-two scaling only: every element is
  computed by the same correctly rounded operations, on any device, in any batch.
- sums over experts are a fixed pairwise tree of elementwise adds.
- top-k is a stable descending sort: ties go to the lower expert id
  (``torch.topk`` leaves tie order unspecified).

Softmax and sigmoid therefore differ from ``torch.softmax``/``torch.sigmoid`` by an ulp or
two, well inside the fp32 rounding that the transformers routers are compared at.

Shape legend: ``T`` tokens, ``E`` experts, ``K`` top-k, ``G`` expert groups, ``S`` experts
per group.
"""

from __future__ import annotations

import torch

from moewire.formats._launch import arg_key, launcher
from moewire.formats.spec import pick_backend
from moewire.moe.config import MoEConfig

#: How a token's routing travels: router logits (every rank routes after the gather) or this
#: rank's top-k ids and weights.
ROUTING_MODES = ("logits", "topk")


def routing_extras(mode: str, num_experts: int, top_k: int) -> dict[str, tuple[torch.dtype, int]]:
    """The extras that travel with each token in a routing mode: fp32 router logits
    (``logits``), or int32 top-k ids and fp32 top-k weights (``topk``)."""
    if mode == "logits":
        return {"router_logits": (torch.float32, num_experts)}
    if mode == "topk":
        return {"topk_ids": (torch.int32, top_k), "topk_weights": (torch.float32, top_k)}
    raise ValueError(f"routing must be one of {ROUTING_MODES}, got {mode!r}")


#: The most experts the routing kernel takes (one program holds a token's whole row).
_KERNEL_MAX_EXPERTS = 1024

#: Added to the denominator of the DeepSeek-V3 renormalization (as in its reference code).
DSV3_RENORM_EPS = 1e-20


# Cephes expf: exp(x) = 2^n * exp(r), r = x - n*ln2 (ln2 split in two: n*_LN2_HI is exact),
# exp(r) = 1 + r + r^2 * P(r) on |r| <= ln2/2.
_LOG2E = 1.44269504088896341
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1)
_EXP_P_LAST = 5.0000001201e-1
#: exp overflows above this (fp32) and is flushed to 0 below ``_EXP_MIN`` (no subnormals).
_EXP_MAX = 88.72283905206835
_EXP_MIN = -87.33654475055310898657
_F32_EXP_BIAS = 127
_F32_MANT_BITS = 23


def _pow2(n: torch.Tensor) -> torch.Tensor:
    """``2.0**n`` (fp32, exact) for integer-valued fp32 ``n`` in ``[-126, 127]``."""
    return ((n.to(torch.int32) + _F32_EXP_BIAS) << _F32_MANT_BITS).view(torch.float32)


def exp_f32(x: torch.Tensor) -> torch.Tensor:
    """``exp`` of fp32 ``x`` (about 1 ulp), bitwise the same on every device and batch size.

    ``+inf`` above 88.72, ``0`` below -87.34, NaN stays NaN."""
    xc = x.clamp(_EXP_MIN, _EXP_MAX)
    n = torch.floor(xc * _LOG2E + 0.5)
    r = xc - n * _LN2_HI
    r = r - n * _LN2_LO
    p = torch.full_like(r, _EXP_P[0])
    for c in _EXP_P[1:]:
        p = p * r + c
    p = p * r + _EXP_P_LAST
    y = (p * (r * r) + r) + 1.0
    half = torch.floor(n * 0.5)
    y = y * _pow2(half) * _pow2(n - half)
    y = torch.where(x > _EXP_MAX, float("inf"), y)
    return torch.where(x < _EXP_MIN, 0.0, y)


def tree_sum(v: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim in a fixed pairwise order (``[.., n] -> [..]``), the same on
    every device and batch size."""
    n = v.shape[-1]
    width = 1 << max(0, (n - 1).bit_length())
    if width != n:
        v = torch.nn.functional.pad(v, (0, width - n))
    while v.shape[-1] > 1:
        h = v.shape[-1] // 2
        v = v[..., :h] + v[..., h:]
    return v[..., 0]


def softmax_f32(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of fp32 logits, batch- and device-invariant."""
    e = exp_f32(logits - logits.amax(dim=-1, keepdim=True))
    return e / tree_sum(e).unsqueeze(-1)


def sigmoid_f32(logits: torch.Tensor) -> torch.Tensor:
    """``1 / (1 + exp(-x))`` of fp32 logits, batch- and device-invariant."""
    return 1.0 / (1.0 + exp_f32(-logits))


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
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's experts and their weights.

    Args:
        config: the layer (its ``router``, ``top_k``, ``renormalize``, groups, scaling).
        router_logits_TE: ``[T, E]`` float logits (any float dtype; upcast to fp32 first).
        router_bias_E: ``deepseek_v3`` only: the ``[E]`` per-expert correction bias added to
            the sigmoid scores for selection only (None = zeros).
        backend: ``"torch"`` (the chain of torch ops below, the reference), ``"triton"``
            (one kernel, ``_kernels/routing.py``, bitwise the same; CUDA, or CPU under
            ``TRITON_INTERPRET=1``) or None (the kernel on CUDA where triton is importable
            and the shape fits it: ``E <= 1024``, groups of a power of two).

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
    if logits.shape[0] == 0:
        empty = logits.new_empty((0, k))
        return empty.long(), empty
    if pick_backend(backend, logits.device) == "triton" and _kernel_fits(config):
        return _route_triton(config, logits, router_bias_E)

    if config.router == "softmax":
        ids, weights = _route_softmax(config, logits)
    else:
        ids, weights = _route_deepseek_v3(config, logits, router_bias_E)
    if config.routed_scaling_factor != 1.0:
        weights = weights * config.routed_scaling_factor
    return ids, weights


def _kernel_fits(config: MoEConfig) -> bool:
    """Whether ``route_kernel`` takes this router: at most 1024 experts, and with a group
    limit a power-of-two number of experts and of groups."""
    e, g = config.num_experts, config.n_group
    if e > _KERNEL_MAX_EXPERTS:
        return False
    grouped = config.router == "deepseek_v3" and config.topk_group < g
    return not grouped or (e & (e - 1) == 0 and g & (g - 1) == 0)


def _route_triton(
    config: MoEConfig, logits_TE: torch.Tensor, router_bias_E: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`route` in one kernel (``_kernels/routing.py``), bitwise the same."""
    from moewire.moe._kernels.routing import route_kernel

    t, e = logits_TE.shape
    k = config.top_k
    ep, kp = 1 << (e - 1).bit_length(), 1 << (k - 1).bit_length()
    if logits_TE.stride(1) != 1:
        logits_TE = logits_TE.contiguous()
    sigmoid = config.router == "deepseek_v3"
    bias = logits_TE
    if router_bias_E is not None:
        bias = router_bias_E.to(device=logits_TE.device, dtype=torch.float32).contiguous()
    groups = config.n_group if sigmoid and config.topk_group < config.n_group else 1
    ids = torch.empty((t, k), dtype=torch.int64, device=logits_TE.device)
    weights = torch.empty((t, k), dtype=torch.float32, device=logits_TE.device)
    scale = config.routed_scaling_factor
    args = (logits_TE, logits_TE.stride(0), bias, ids, weights, e, float(scale))
    launcher(
        route_kernel, EP=ep, EP_LOG=ep.bit_length() - 1, K=k, KP=kp, KP_LOG=kp.bit_length() - 1,
        SIGMOID=sigmoid, HAS_BIAS=router_bias_E is not None, G=groups,
        TOPK_GROUP=config.topk_group, RENORM=config.renormalize, SCALE=scale != 1.0,
        num_warps=max(1, min(8, ep // 64)), enable_fp_fusion=False,
    )((t,), arg_key(*args), *args)  # fmt: skip
    return ids, weights


def _route_softmax(config: MoEConfig, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weights_TK, ids_TK = _topk(softmax_f32(logits_TE), config.top_k)
    if config.renormalize:
        weights_TK = weights_TK / tree_sum(weights_TK).unsqueeze(-1)
    return ids_TK, weights_TK


def _route_deepseek_v3(
    config: MoEConfig, logits_TE: torch.Tensor, router_bias_E: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection on the biased sigmoid scores within the best ``topk_group`` groups;
    weights from the unbiased scores."""
    scores_TE = sigmoid_f32(logits_TE)
    choice_TE = scores_TE
    if router_bias_E is not None:
        choice_TE = scores_TE + router_bias_E.to(device=scores_TE.device, dtype=torch.float32)
    if config.topk_group < config.n_group:
        choice_TE = _mask_to_best_groups(config, choice_TE)
    ids_TK = _topk(choice_TE, config.top_k)[1]
    weights_TK = scores_TE.gather(1, ids_TK)
    if config.renormalize:
        weights_TK = weights_TK / (tree_sum(weights_TK).unsqueeze(-1) + DSV3_RENORM_EPS)
    return ids_TK, weights_TK


def _mask_to_best_groups(config: MoEConfig, choice_TE: torch.Tensor) -> torch.Tensor:
    """``-inf`` outside each token's ``topk_group`` best groups (a group's score is the sum
    of its two best scores)."""
    (t, e), g = choice_TE.shape, config.n_group
    per_group_TGS = choice_TE.view(t, g, config.group_size)
    top2_TG2 = _topk(per_group_TGS, 2)[0]
    group_idx = _topk(top2_TG2[..., 0] + top2_TG2[..., 1], config.topk_group)[1]
    keep_TG = torch.zeros((t, g), dtype=torch.bool, device=choice_TE.device)
    keep_TG.scatter_(1, group_idx, True)
    keep_TE = keep_TG.unsqueeze(-1).expand(t, g, config.group_size).reshape(t, e)
    return choice_TE.masked_fill(~keep_TE, float("-inf"))
