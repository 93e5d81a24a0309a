"""Tier a: both routers against hand-worked cases, determinism (ties, batch invariance),
and against the transformers router modules when transformers is installed.

Shape legend: ``T`` tokens, ``E`` experts, ``K`` top-k.
"""

from __future__ import annotations

import math

import pytest
import torch

from moewire.comm.expert_ids import check_topk_ids
from moewire.moe import MoEConfig, route
from moewire.moe.routing import exp_f32, sigmoid_f32, softmax_f32, tree_sum


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# ----------------------------------------------------------------- softmax, by hand
def test_softmax_hand_worked():
    # softmax([0, ln2, ln3, ln4]) = [1, 2, 3, 4] / 10; top-2 = experts 3, 2 with .4, .3.
    logits_TE = torch.tensor([[0.0, math.log(2), math.log(3), math.log(4)]])
    cfg = MoEConfig(hidden=16, intermediate=16, num_experts=4, top_k=2, renormalize=False)
    ids, w = route(cfg, logits_TE)
    assert ids.tolist() == [[3, 2]] and ids.dtype == torch.int64
    torch.testing.assert_close(w, torch.tensor([[0.4, 0.3]]), rtol=1e-6, atol=0)
    # renormalized: .4/.7, .3/.7
    ids, w = route(MoEConfig(16, 16, 4, 2, renormalize=True), logits_TE)
    torch.testing.assert_close(w, torch.tensor([[4 / 7, 3 / 7]]), rtol=1e-6, atol=0)
    # routed_scaling_factor multiplies the final weights
    ids, w = route(MoEConfig(16, 16, 4, 2, routed_scaling_factor=2.0), logits_TE)
    torch.testing.assert_close(w, torch.tensor([[8 / 7, 6 / 7]]), rtol=1e-6, atol=0)


def test_softmax_ties_go_to_lower_id():
    cfg = MoEConfig(hidden=16, intermediate=16, num_experts=6, top_k=3)
    logits_TE = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, 2.0], [0.0] * 6])
    ids, w = route(cfg, logits_TE)
    assert ids.tolist() == [[1, 2, 4], [0, 1, 2]]
    assert torch.equal(w[1], torch.full((3,), 1 / 3))


def test_top1_renormalized_weight_is_one():
    cfg = MoEConfig(hidden=16, intermediate=16, num_experts=8, top_k=1)
    _, w = route(cfg, torch.randn(5, 8))
    assert torch.equal(w, torch.ones(5, 1))


# ----------------------------------------------------------------- DeepSeek-V3, by hand
DSV3 = MoEConfig(
    hidden=16,
    intermediate=16,
    num_experts=8,
    top_k=2,
    router="deepseek_v3",
    renormalize=True,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
)
# sigmoid scores per expert; groups of 2: {0,1} {2,3} {4,5} {6,7}
SCORES = [0.9, 0.05, 0.6, 0.5, 0.2, 0.7, 0.3, 0.35]


def test_deepseek_v3_hand_worked_with_bias():
    # choice = s + bias = [.9, .05, .6, .5, .2, .7, .7, .75]; group score = sum of the top 2
    # = [.95, 1.1, .9, 1.45] -> groups 3, 1 -> candidates 2, 3, 6, 7 -> experts 7 (.75), 6 (.7).
    # Expert 0 has the best score but its group loses. Weights are the unbiased scores
    # .35, .3, renormalized (/.65) and scaled by 2.5.
    logits_TE = torch.tensor([[logit(p) for p in SCORES]])
    bias_E = torch.tensor([0, 0, 0, 0, 0, 0, 0.4, 0.4])
    ids, w = route(DSV3, logits_TE, bias_E)
    assert ids.tolist() == [[7, 6]]
    torch.testing.assert_close(w, torch.tensor([[0.35 / 0.65 * 2.5, 0.3 / 0.65 * 2.5]]))


def test_deepseek_v3_hand_worked_without_bias():
    # group scores [.95, 1.1, .9, .65] -> groups 1, 0 -> experts 0 (.9), 2 (.6)
    logits_TE = torch.tensor([[logit(p) for p in SCORES]])
    ids, w = route(DSV3, logits_TE)
    assert ids.tolist() == [[0, 2]]
    torch.testing.assert_close(w, torch.tensor([[0.9 / 1.5 * 2.5, 0.6 / 1.5 * 2.5]]))
    # without renormalization the weights are the raw scores times the scaling factor
    cfg = MoEConfig(16, 16, 8, 2, router="deepseek_v3", renormalize=False, n_group=4, topk_group=2)
    ids, w = route(cfg, logits_TE)
    torch.testing.assert_close(w, torch.tensor([[0.9, 0.6]]))


def test_deepseek_v3_one_group_is_plain_sigmoid_topk():
    cfg = MoEConfig(16, 16, 8, 3, router="deepseek_v3", renormalize=False)
    logits_TE = torch.randn(20, 8)
    ids, w = route(cfg, logits_TE)
    ref_w, ref_ids = logits_TE.sigmoid().sort(dim=-1, descending=True, stable=True)
    assert torch.equal(ids, ref_ids[:, :3])
    # routing's own sigmoid (device-invariant exp, < 1 ulp) may differ from torch's in the
    # last bit, so the weights agree to a few ulps, not bitwise
    torch.testing.assert_close(w, ref_w[:, :3], rtol=1e-6, atol=0)


# ----------------------------------------------------------------- determinism
@pytest.mark.parametrize("router", ["softmax", "deepseek_v3"])
def test_batch_invariant_and_dtype_upcast(router):
    """A token's route does not depend on which other tokens are routed with it: ranks in
    routing='logits' mode route different batches than the single-process reference."""
    kw = {"n_group": 4, "topk_group": 2} if router == "deepseek_v3" else {}
    cfg = MoEConfig(64, 32, 8, 3, router=router, **kw)
    g = torch.Generator().manual_seed(0)
    logits_TE = torch.randn(257, 8, generator=g)
    bias = torch.randn(8, generator=g) * 0.1 if router == "deepseek_v3" else None
    ids, w = route(cfg, logits_TE, bias)
    for lo, hi in ((0, 1), (3, 70), (70, 257), (100, 101)):
        ids_p, w_p = route(cfg, logits_TE[lo:hi], bias)
        assert torch.equal(ids_p, ids[lo:hi]) and torch.equal(w_p, w[lo:hi])
    # bf16 logits route as their fp32 upcast
    l16 = logits_TE.to(torch.bfloat16)
    a, b = route(cfg, l16, bias), route(cfg, l16.float(), bias)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_exp_f32_accuracy_and_edges():
    x = torch.linspace(-87.3, 88.7, 200_001)
    ref = torch.exp(x.double())
    rel = ((exp_f32(x).double() - ref) / ref).abs().max().item()
    assert rel < 2 * torch.finfo(torch.float32).eps, rel
    edge = exp_f32(torch.tensor([0.0, float("inf"), -float("inf"), 89.0, -88.0, float("nan")]))
    assert edge[:5].tolist() == [1.0, float("inf"), 0.0, float("inf"), 0.0]
    assert edge[5].isnan()


def test_elementwise_math_is_layout_invariant():
    """The case torch's CPU sigmoid gets wrong: 8 experts, an odd token count, so some rows
    fall in the scalar tail of the vectorized loop; and a strided view (a row's extras)."""
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(1001, 24, generator=g)
    x = wide[:, 5:13]  # strided [1001, 8]
    for fn in (sigmoid_f32, softmax_f32):
        whole = fn(x)
        assert torch.equal(whole, torch.cat([fn(x[i : i + 1]) for i in range(x.shape[0])]))
        assert torch.equal(whole, fn(x.contiguous()))
    torch.testing.assert_close(sigmoid_f32(x), torch.sigmoid(x), rtol=3e-7, atol=0)
    torch.testing.assert_close(softmax_f32(x), torch.softmax(x, -1), rtol=5e-7, atol=0)
    v = torch.randn(7, 13, generator=g)
    torch.testing.assert_close(tree_sum(v), v.sum(-1), rtol=1e-6, atol=1e-6)


def test_empty_and_nan():
    cfg = MoEConfig(16, 16, 8, 2)
    ids, w = route(cfg, torch.empty(0, 8))
    assert ids.shape == (0, 2) and w.shape == (0, 2)
    ids, w = route(cfg, torch.tensor([[float("nan")] * 8]))
    assert ((ids >= 0) & (ids < 8)).all() and w.isnan().all()


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"hidden": 0}, ValueError, "hidden must be positive"),
        ({"top_k": 9}, ValueError, "top_k must be <= num_experts"),
        ({"top_k": 2.0}, TypeError, "top_k must be an int"),
        ({"router": "sigmoid"}, ValueError, "router must be one of"),
        ({"n_group": 2}, ValueError, "only used by router='deepseek_v3'"),
        ({"renormalize": 1}, TypeError, "renormalize must be a bool"),
        ({"routed_scaling_factor": 0.0}, ValueError, "routed_scaling_factor"),
        ({"router": "deepseek_v3", "n_group": 3}, ValueError, "groups of at least 2"),
        ({"router": "deepseek_v3", "n_group": 8}, ValueError, "groups of at least 2"),
        ({"router": "deepseek_v3", "n_group": 2, "topk_group": 3}, ValueError, "topk_group"),
        (
            {"router": "deepseek_v3", "n_group": 4, "topk_group": 1, "top_k": 3},
            ValueError,
            "exceeds the experts",
        ),
    ],
)
def test_config_errors(kwargs, exc, match):
    base = {"hidden": 16, "intermediate": 16, "num_experts": 8, "top_k": 2}
    with pytest.raises(exc, match=match):
        MoEConfig(**{**base, **kwargs})


def test_route_errors():
    cfg = MoEConfig(16, 16, 8, 2)
    with pytest.raises(ValueError, match=r"router_logits must be \[T, E=8\]"):
        route(cfg, torch.randn(3, 7))
    with pytest.raises(TypeError, match="floating point"):
        route(cfg, torch.zeros(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="only used by router='deepseek_v3'"):
        route(cfg, torch.randn(3, 8), torch.zeros(8))
    with pytest.raises(ValueError, match=r"router_bias must be \[E=8\]"):
        route(DSV3, torch.randn(3, 8), torch.zeros(4))
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 8\), got \[-1, 8\]"):
        check_topk_ids(torch.tensor([[0, 8], [-1, 3]]), 8)


# ----------------------------------------------------------------- against transformers
def _hf_router(kind: str, hidden: int, num_experts: int, top_k: int):
    transformers = pytest.importorskip("transformers")
    common = {"hidden_size": hidden, "num_experts_per_tok": top_k}
    if kind == "qwen3":
        from transformers.models.qwen3_moe import modeling_qwen3_moe as m

        cfg = transformers.Qwen3MoeConfig(**common, num_experts=num_experts, norm_topk_prob=True)
        mine = MoEConfig(hidden, 16, num_experts, top_k, renormalize=True)
        return m.Qwen3MoeTopKRouter(cfg), mine
    if kind == "qwen3_no_norm":
        from transformers.models.qwen3_moe import modeling_qwen3_moe as m

        cfg = transformers.Qwen3MoeConfig(**common, num_experts=num_experts, norm_topk_prob=False)
        mine = MoEConfig(hidden, 16, num_experts, top_k, renormalize=False)
        return m.Qwen3MoeTopKRouter(cfg), mine
    if kind == "mixtral":
        from transformers.models.mixtral import modeling_mixtral as m

        cfg = transformers.MixtralConfig(**common, num_local_experts=num_experts)
        return m.MixtralTopKRouter(cfg), MoEConfig(hidden, 16, num_experts, top_k)
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m

    cfg = transformers.DeepseekV3Config(
        **common, n_routed_experts=num_experts, n_group=4, topk_group=2, routed_scaling_factor=2.5
    )
    mine = MoEConfig(
        hidden,
        16,
        num_experts,
        top_k,
        router="deepseek_v3",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
    )
    return m.DeepseekV3TopkRouter(cfg), mine


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_no_norm", "mixtral", "deepseek_v3"])
def test_against_transformers_routers(kind):
    """Same experts as the transformers router modules; same weights up to the order in
    which the top-k weights are summed for renormalization (DeepSeek-V3's ``topk`` is
    unsorted there), so weights are compared at fp32 rounding (rtol 1e-6)."""
    torch.manual_seed(0)
    router, cfg = _hf_router(kind, 32, 16, 4)
    with torch.no_grad():
        router.weight.normal_()
        bias = None
        if kind == "deepseek_v3":
            router.e_score_correction_bias.normal_(0, 0.3)
            bias = router.e_score_correction_bias
        x_TH = torch.randn(300, 32)
        logits_TE, hf_w, hf_ids = router(x_TH)
    ids, w = route(cfg, logits_TE, bias)
    hf_ids, order = hf_ids.sort(dim=-1)
    hf_w = hf_w.gather(1, order)
    ids, order = ids.sort(dim=-1)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(w.gather(1, order), hf_w.float(), rtol=1e-6, atol=0)
