"""Tier a: the MoE layer in one process (``comm="local"``, the unsharded reference layer).

What is checked, and how exactly:
- the layer against an independent per-token float64 oracle (tolerance: the three bf16
  roundings of the expert FFN, see ``test_layer_matches_per_token_oracle``);
- ``loop`` vs ``grouped`` bitwise on CPU (torch's CPU ``_grouped_mm`` is a per-group mm);
- ``fp8_loop`` (the fp8 GEMM path's math) against ``loop`` by SQNR;
- ``quantize="before"`` vs ``"after"`` and ``routing="logits"`` vs ``"topk"``: bitwise;
- zero tokens, non-finite tokens, the shared expert, bad input.

Shape legend: ``T`` tokens, ``H`` hidden, ``I`` intermediate, ``E`` experts, ``K`` top-k.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moewire as mw
from moewire.moe.experts import _grouped_mm_runs_on_cpu, resolve_impl
from moewire.testing.data import sqnr_db

H, I, E, K = 128, 64, 8, 2
G_NVFP4 = 2688.0 / 6.0  # nvfp4 global scale for activations with amax ~6
WIRES = ("bf16", "fp8", "fp8_block128", "mxfp8", "nvfp4", "mxfp4")


def make_config(router: str = "softmax", **kw) -> mw.MoEConfig:
    if router == "deepseek_v3":
        kw = {"n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, **kw}
    kw = {"top_k": K, **kw}
    return mw.MoEConfig(hidden=H, intermediate=I, num_experts=E, router=router, **kw)


def make_weights(seed: int = 0, e: int = E, h: int = H, i: int = I):
    """bf16 ``w13 [E, 2I, H]``, ``w2 [E, H, I]``, fp32 ``bias [E]``; outputs of order 1."""
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(e, 2 * i, h, generator=g) / h**0.5).to(torch.bfloat16)
    w2 = (torch.randn(e, h, i, generator=g) / i**0.5).to(torch.bfloat16)
    bias = torch.randn(e, generator=g) * 0.1
    return w13, w2, bias


def make_inputs(t: int, seed: int = 1, dtype: torch.dtype = torch.bfloat16, h: int = H):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    logits = torch.randn(t, E, generator=g)
    return x, logits


def make_layer(cfg, w13, w2, bias=None, *, wire="bf16", group=None, comm="local", **kw):
    # fp32 partial sums: the sharded-vs-unsharded bounds of the tests are fp32 reassociation
    # bounds (test_bf16_combine_default covers the layer's bf16 default)
    kw.setdefault("combine_dtype", torch.float32)
    layer = mw.EPMoE(
        cfg, group, wire=wire, comm=comm, global_scale=G_NVFP4 if wire == "nvfp4" else None, **kw
    )
    layer.load_experts(w13, w2, router_bias=bias if cfg.router == "deepseek_v3" else None)
    return layer


def oracle(cfg, spec, x_TH, logits_TE, w13, w2, bias=None):
    """Per token, per k, in float64: the dequantized wire row through each chosen expert.

    Returns ``(y_TH, mag_TH)`` with ``mag = sum_k |w_k| * (|w2_e| @ |silu(g) * u|)``, the
    scale the layer's bf16 roundings are relative to."""
    from moewire.moe import route

    ids, w = route(cfg, logits_TE, bias)
    bare = spec.with_extras(None)
    a = bare.dequantize(bare.pack(x_TH.to(torch.bfloat16))).double()
    out = torch.zeros(x_TH.shape, dtype=torch.float64)
    mag = torch.zeros(x_TH.shape, dtype=torch.float64)
    for t in range(x_TH.shape[0]):
        for k in range(cfg.top_k):
            e = int(ids[t, k])
            gate, up = (w13[e].double() @ a[t]).chunk(2)
            act = F.silu(gate) * up
            out[t] += w[t, k].double() * (w2[e].double() @ act)
            mag[t] += w[t, k].double().abs() * (w2[e].double().abs() @ act.abs())
    return out, mag


# ----------------------------------------------------------------- correctness
@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("router", ["softmax", "deepseek_v3"])
def test_layer_matches_per_token_oracle(wire, router):
    """Tolerance: the layer rounds ``a @ w13.T``, the SwiGLU output and ``act @ w2.T`` to bf16
    (relative error <= 2^-9 each; the wire values and weights are exact), so an output value
    is off by at most a few times 2^-9 of the magnitude of its terms: ``|y - ref| <= 2^-6 *
    mag`` elementwise (``mag`` from the oracle), and SQNR > 40 dB overall."""
    cfg = make_config(router)
    w13, w2, bias = make_weights()
    x, logits = make_inputs(40, dtype=torch.float32)
    layer = make_layer(cfg, w13, w2, bias, wire=wire, experts="loop")
    y = layer(x, logits)
    assert y.dtype == torch.float32 and y.shape == (40, H)
    ref, mag = oracle(
        cfg, layer.spec, x, logits, w13, w2, bias if router == "deepseek_v3" else None
    )
    err = (y.double() - ref).abs()
    assert (err <= 2**-6 * mag).all(), (err / mag).max()
    assert sqnr_db(ref, y) > 40


@pytest.mark.skipif(not _grouped_mm_runs_on_cpu(), reason="torch._grouped_mm has no CPU kernel")
@pytest.mark.parametrize("wire", ["bf16", "nvfp4"])
def test_grouped_equals_loop_on_cpu(wire):
    cfg = make_config()
    w13, w2, _ = make_weights()
    x, logits = make_inputs(64)
    y_loop = make_layer(cfg, w13, w2, wire=wire, experts="loop")(x, logits)
    y_grouped = make_layer(cfg, w13, w2, wire=wire, experts="grouped")(x, logits)
    assert torch.equal(y_loop, y_grouped)
    assert resolve_impl("auto", torch.device("cpu")) == "grouped"


def test_fp8_loop_accuracy():
    """The fp8 GEMM path's math (e4m3 weights per channel, e4m3 SwiGLU output per row) is
    within fp8 quantization noise of the bf16 loop."""
    cfg = make_config()
    w13, w2, _ = make_weights()
    x, logits = make_inputs(64, dtype=torch.float32)
    y_bf16 = make_layer(cfg, w13, w2, wire="fp8", experts="loop")(x, logits)
    y_fp8 = make_layer(cfg, w13, w2, wire="fp8", experts="fp8_loop")(x, logits)
    s = sqnr_db(y_bf16, y_fp8)
    assert 22 < s < 60, s


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("router", ["softmax", "deepseek_v3"])
def test_before_after_logits_topk_bitwise(x_dtype, router):
    """For every wire format: quantize before/after and route by logits/topk give the same
    bytes out. x is rounded to bf16 at the layer boundary, so fp32 x qualifies too."""
    cfg = make_config(router)
    w13, w2, bias = make_weights()
    x, logits = make_inputs(33, dtype=x_dtype)
    for wire in WIRES:
        outs = [
            make_layer(cfg, w13, w2, bias, wire=wire, quantize=q, routing=r)(x, logits)
            for q in ("before", "after")
            for r in ("logits", "topk")
        ]
        assert outs[0].dtype == x_dtype
        for o in outs[1:]:
            assert torch.equal(o, outs[0]), wire


def test_zero_tokens_and_non_finite():
    cfg = make_config()
    w13, w2, _ = make_weights()
    for wire in ("bf16", "fp8", "nvfp4", "mxfp4"):
        layer = make_layer(cfg, w13, w2, wire=wire)
        y = layer(torch.empty(0, H, dtype=torch.bfloat16), torch.empty(0, E))
        assert y.shape == (0, H) and y.dtype == torch.bfloat16
        x, logits = make_inputs(6)
        x[2, 5] = float("nan")
        x[4, 7] = float("inf")
        y = layer(x, logits)
        assert y[[2, 4]].isnan().any(dim=1).all(), wire
        clean = [0, 1, 3, 5]
        assert torch.equal(y[clean], layer(x[clean], logits[clean])), wire


def test_shared_expert_is_added_on_unquantized_input():
    cfg = make_config()
    w13, w2, _ = make_weights()
    x, logits = make_inputs(10, dtype=torch.float32)
    shared = torch.nn.Linear(H, H, bias=False)
    seen = []

    def shared_fn(x_TH):
        seen.append(x_TH)
        return shared(x_TH)

    y0 = make_layer(cfg, w13, w2, wire="nvfp4")(x, logits)
    y1 = make_layer(cfg, w13, w2, wire="nvfp4", shared_expert=shared_fn)(x, logits)
    assert seen[0] is x
    torch.testing.assert_close(y1, y0 + shared(x), rtol=1e-6, atol=1e-6)


def test_weights_shard_and_dtype():
    cfg = make_config()
    w13, w2, _ = make_weights()
    layer = make_layer(cfg, w13.float(), w2.float())
    assert layer.local_experts.w13_L2IH.dtype == torch.bfloat16
    assert layer.num_local == E and layer.first_expert == 0


# ----------------------------------------------------------------- bad input
def test_layer_errors():
    cfg = make_config()
    w13, w2, bias = make_weights()
    x, logits = make_inputs(4)
    layer = mw.EPMoE(cfg, comm="local")
    with pytest.raises(RuntimeError, match="load_experts"):
        layer(x, logits)
    with pytest.raises(ValueError, match=r"w13 must have shape \[8, 128, 128\]"):
        layer.load_experts(w13[:, :64], w2)
    with pytest.raises(TypeError, match="w2 must be floating point"):
        layer.load_experts(w13, w2.to(torch.int32))
    with pytest.raises(ValueError, match="only used by router='deepseek_v3'"):
        layer.load_experts(w13, w2, router_bias=bias)
    layer.load_experts(w13, w2)
    with pytest.raises(TypeError, match="x must be bfloat16, float16 or float32"):
        layer(x.to(torch.float64), logits)
    with pytest.raises(ValueError, match=r"x must be \[T, hidden=128\]"):
        layer(x[:, :64], logits)
    with pytest.raises(ValueError, match=r"router_logits must be \[T=4, E=8\]"):
        layer(x, logits[:3])
    for kwargs, match in (
        ({"comm": "nccl"}, "comm must be one of"),
        ({"routing": "ids"}, "routing must be one of"),
        ({"quantize": "during"}, "quantize must be one of"),
        ({"experts": "cutlass"}, "experts must be one of"),
        ({"combine_dtype": torch.float16}, "combine_dtype must be one of"),
        ({"wire": "nvfp4", "global_scale": -1.0}, "global_scale must be finite and > 0"),
        ({"wire": "fp4"}, "unknown format"),
    ):
        with pytest.raises(ValueError, match=match):
            mw.EPMoE(cfg, **{"comm": "local", **kwargs})
    with pytest.raises(TypeError, match="config must be a MoEConfig"):
        mw.EPMoE({"hidden": 64}, comm="local")


def test_received_ids_out_of_range_never_reach_an_index():
    """routing='topk': expert ids arriving in rows are checked before use."""
    cfg = make_config()
    w13, w2, _ = make_weights()
    layer = make_layer(cfg, w13, w2, wire="fp8", routing="topk")

    class Corrupting:
        def dispatch(self, rows_TR, topk_ids_TK=None):
            rows = rows_TR.clone()
            layer.spec.unpack(rows).extras["topk_ids"][1, 0] = E + 3
            return rows, None

        def combine(self, partial_NH, handle):
            return partial_NH

    layer.comm = Corrupting()
    x, logits = make_inputs(3)
    with pytest.raises(ValueError, match=r"received topk_ids: expert ids must be in \[0, 8\)"):
        layer(x, logits)


def test_nvfp4_global_scale_calibrated_on_first_forward():
    """wire='nvfp4' without a global scale: g = 448*6/max|x| from the first forward, then
    fixed; the layer equals one built with that g."""
    cfg = make_config()
    w13, w2, _ = make_weights()
    x = torch.randn(9, H) * 3
    x[2, 5] = float("nan")  # non-finite values are left out of the calibration amax
    logits = torch.randn(9, E)
    lazy = mw.EPMoE(cfg, comm="local", wire="nvfp4")
    lazy.load_experts(w13, w2)
    assert lazy.spec is None
    y = lazy(x, logits)
    finite = torch.nan_to_num(x.to(torch.bfloat16).float().abs(), nan=0.0)
    g = mw.nvfp4_global_scale(float(finite.max()))
    assert lazy.spec.global_scale == g
    fixed = mw.EPMoE(cfg, comm="local", wire="nvfp4", global_scale=g)
    fixed.load_experts(w13, w2)
    same = (y == fixed(x, logits)) | (torch.isnan(y) & torch.isnan(fixed(x, logits)))
    assert bool(same.all())
    assert lazy(x * 100, logits).shape == x.shape and lazy.spec.global_scale == g  # fixed now
    zero = mw.EPMoE(cfg, comm="local", wire="nvfp4")
    zero.load_experts(w13, w2)
    with pytest.raises(ValueError, match="calibrates on the first forward"):
        zero(torch.zeros(3, H), torch.randn(3, E))


def test_bf16_combine_default():
    """The layer's default partial sums are bf16: each rank's fp32 sum rounded once, so on
    one rank the output is the fp32-partials layer's output rounded to bf16, bitwise."""
    cfg = make_config()
    w13, w2, _ = make_weights()
    x, logits = make_inputs(6, dtype=torch.float32)
    default = mw.EPMoE(cfg, comm="local", wire="mxfp8")
    assert default.combine_dtype == torch.bfloat16
    default.load_experts(w13, w2)
    f32 = make_layer(cfg, w13, w2, wire="mxfp8")  # fp32 partials
    y, y32 = default(x, logits), f32(x, logits)
    assert torch.equal(y, y32.to(torch.bfloat16).float())
