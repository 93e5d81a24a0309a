"""Routing in one kernel: router logits -> top-k ids and weights, bitwise as ``route``.

One program per token computes what ``moewire.moe.routing.route`` computes with a chain of
torch ops (some fifty small kernels at decode sizes), with the same fp32 operations in the
same order (launched with ``enable_fp_fusion=False``: no multiply-add is contracted):

- ``exp_f32``: the clamp, Cody-Waite reduction, Cephes polynomial and exact power-of-two
  scaling of the reference, and its two ``where`` for overflow and underflow;
- ``tree_sum``: the same pairwise tree (the row padded with zeros to a power of two, then
  ``v[:h] + v[h:]`` level by level);
- division correctly rounded (``div_rn``), as torch divides;
- top-k as a stable descending sort: the largest first, NaN above every number, ties to
  the lower expert id;
- ``deepseek_v3``: each group's score is its two best biased scores added, the
  ``topk_group`` best groups kept (the rest at ``-inf``), the weights the unbiased scores.

Shape legend: ``T`` tokens, ``E`` experts (``EP`` padded to a power of two), ``K`` top-k,
``G`` groups of ``S`` experts.
"""

from __future__ import annotations

import triton
import triton.language as tl

_LOG2E: tl.constexpr = tl.constexpr(1.44269504088896341)
_LN2_HI: tl.constexpr = tl.constexpr(0.693359375)
_LN2_LO: tl.constexpr = tl.constexpr(-2.12194440e-4)
_P0: tl.constexpr = tl.constexpr(1.9875691500e-4)
_P1: tl.constexpr = tl.constexpr(1.3981999507e-3)
_P2: tl.constexpr = tl.constexpr(8.3334519073e-3)
_P3: tl.constexpr = tl.constexpr(4.1665795894e-2)
_P4: tl.constexpr = tl.constexpr(1.6666665459e-1)
_P5: tl.constexpr = tl.constexpr(5.0000001201e-1)
_EXP_MAX: tl.constexpr = tl.constexpr(88.72283905206835)
_EXP_MIN: tl.constexpr = tl.constexpr(-87.33654475055310898657)


@triton.jit
def _pow2(n):
    """``2**n`` for integer-valued fp32 ``n`` in ``[-126, 127]``, exactly (the exponent bits)."""
    return ((n.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def exp_f32(x):
    """``routing.exp_f32``, operation for operation."""
    xc = tl.minimum(tl.maximum(x, _EXP_MIN), _EXP_MAX)
    xc = tl.where(x != x, x, xc)  # torch.clamp keeps NaN
    n = tl.floor(xc * _LOG2E + 0.5)
    r = xc - n * _LN2_HI
    r = r - n * _LN2_LO
    p = tl.zeros_like(r) + _P0
    p = p * r + _P1
    p = p * r + _P2
    p = p * r + _P3
    p = p * r + _P4
    p = p * r + _P5
    y = (p * (r * r) + r) + 1.0
    half = tl.floor(n * 0.5)
    y = y * _pow2(half) * _pow2(n - half)
    y = tl.where(x > _EXP_MAX, float("inf"), y)
    return tl.where(x < _EXP_MIN, 0.0, y)


@triton.jit
def tree_sum(v, WIDTH: tl.constexpr, LOG: tl.constexpr):
    """``routing.tree_sum`` of a ``[WIDTH]`` vector (``WIDTH = 2**LOG``, zero-padded)."""
    for i in tl.static_range(LOG):
        v = tl.sum(tl.reshape(v, (2, WIDTH >> (i + 1))), axis=0)
    return tl.sum(v, axis=0)


@triton.jit
def _pick(v, live, lane, EP: tl.constexpr):
    """The lane a stable descending sort puts first among ``live`` lanes of ``v``: the
    lowest NaN lane if there is one, else the lowest lane holding the largest value."""
    nan = live & (v != v)
    first_nan = tl.min(tl.where(nan, lane, EP), axis=0)
    top = tl.max(tl.where(live & ~nan, v, float("-inf")), axis=0)
    first_top = tl.min(tl.where(live & ~nan & (v == top), lane, EP), axis=0)
    return tl.where(first_nan < EP, first_nan, first_top)


@triton.jit
def _pick_rows(v, live, sub, S: tl.constexpr):
    """:func:`_pick` for each row of a ``[R, S]`` tile (``sub``: ``arange(S)``)."""
    nan = live & (v != v)
    first_nan = tl.min(tl.where(nan, sub[None, :], S), axis=1)
    top = tl.max(tl.where(live & ~nan, v, float("-inf")), axis=1)
    first_top = tl.min(tl.where(live & ~nan & (v == top[:, None]), sub[None, :], S), axis=1)
    return tl.where(first_nan < S, first_nan, first_top)


@triton.jit
def _at(v, lane, i):
    """``v[i]`` (one lane of a vector)."""
    return tl.sum(tl.where(lane == i, v, 0.0), axis=0)


@triton.jit
def _keep_groups(choice, lane, G: tl.constexpr, S: tl.constexpr, TOPK_GROUP: tl.constexpr):
    """DeepSeek-V3's group limit: ``choice`` with every expert outside the ``TOPK_GROUP``
    best groups (by the sum of a group's two best scores) set to ``-inf``."""
    sub = tl.arange(0, S)
    grp = tl.arange(0, G)
    per = tl.reshape(choice, (G, S))
    # a group's best, then its second
    live = sub[None, :] >= 0
    i1 = _pick_rows(per, live, sub, S)
    i2 = _pick_rows(per, live & (sub[None, :] != i1[:, None]), sub, S)
    v1 = tl.sum(tl.where(sub[None, :] == i1[:, None], per, 0.0), axis=1)
    v2 = tl.sum(tl.where(sub[None, :] == i2[:, None], per, 0.0), axis=1)
    score = v1 + v2
    keep = grp < 0
    live = grp >= 0
    for _ in tl.static_range(TOPK_GROUP):
        g = _pick(score, live, grp, G)
        keep = keep | (grp == g)
        live = live & (grp != g)
    keep_e = tl.reshape(tl.broadcast_to(keep[:, None], (G, S)), (G * S,))
    return tl.where(keep_e, choice, float("-inf"))


@triton.jit
def route_kernel(
    logits_ptr,
    stride_t,
    bias_ptr,
    ids_ptr,
    weights_ptr,
    E,
    scaling,
    EP: tl.constexpr,
    EP_LOG: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    KP_LOG: tl.constexpr,
    SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    G: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    RENORM: tl.constexpr,
    SCALE: tl.constexpr,
):
    """Program ``t``: logits ``[T, E]`` fp32 (row stride ``stride_t``, unit column stride)
    -> ids int64 ``[T, K]`` and weights fp32 ``[T, K]`` (contiguous). ``G > 1``: groups of
    ``EP / G`` experts (``E == EP`` then), the ``TOPK_GROUP`` best kept."""
    t = tl.program_id(0)
    lane = tl.arange(0, EP)
    real = lane < E
    x = tl.load(logits_ptr + t.to(tl.int64) * stride_t + lane, mask=real, other=0.0)
    if SIGMOID:
        scores = tl.math.div_rn(tl.zeros_like(x) + 1.0, 1.0 + exp_f32(-x))
        choice = scores
        if HAS_BIAS:
            choice = scores + tl.load(bias_ptr + lane, mask=real, other=0.0)
        if G > 1:
            choice = _keep_groups(choice, lane, G, EP // G, TOPK_GROUP)
    else:
        any_nan = tl.max(tl.where(real & (x != x), 1, 0), axis=0)
        m = tl.max(tl.where(real, x, float("-inf")), axis=0)
        m = tl.where(any_nan > 0, float("nan"), m)  # torch.amax propagates NaN
        e = tl.where(real, exp_f32(x - m), 0.0)
        scores = tl.math.div_rn(e, tree_sum(e, EP, EP_LOG) + tl.zeros_like(e))
        choice = scores
    kl = tl.arange(0, KP)
    ids = tl.zeros([KP], tl.int32)
    w = tl.zeros([KP], tl.float32)
    live = real
    for j in tl.static_range(K):
        i = _pick(choice, live, lane, EP)
        live = live & (lane != i)
        ids = tl.where(kl == j, i, ids)
        w = tl.where(kl == j, _at(scores, lane, i), w)
    if RENORM:
        s = tree_sum(w, KP, KP_LOG)
        if SIGMOID:
            s = s + 1e-20
        w = tl.math.div_rn(w, s + tl.zeros_like(w))
    if SCALE:
        w = w * scaling
    out = t.to(tl.int64) * K + kl
    tl.store(ids_ptr + out, ids.to(tl.int64), mask=kl < K)
    tl.store(weights_ptr + out, w, mask=kl < K)
