"""Tier a/b: ``moewire.integrations.transformers`` on tiny random-init models.

Models: Qwen3-MoE, Mixtral and DeepSeek-V3 (hidden 64, 2 layers, both MoE, 8 experts,
top-2; DeepSeek-V3 with 4 groups, top-2 groups, a shared expert, a random correction bias),
in bf16 with transformers' default init (std 0.02). The MoE blocks matter: zeroing the
experts moves the logits to 15-26 dB SQNR, so the 40 dB bound below has teeth.

Tolerance of ``wire="bf16"`` vs the unmodified model (bf16 tolerance): the layer and the
original block compute the same bf16 expert GEMMs but round differently (fp32 SwiGLU and
fp32 accumulation of the top-k outputs here; bf16 there), a few bf16 ulps per MoE output,
carried through 2 layers: ``max|dlogits| <= 2^-6 * max|logits|`` (4 bf16 ulps at the
largest logit) and SQNR >= 40 dB. Quantized rows: SQNR of the logits is reported (printed,
and as a junit property) and held above a floor well below what was measured.

Shape legend: ``B`` batch, ``S`` sequence, ``V`` vocabulary.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moewire.integrations.transformers import EPMoEBlock, expert_parallel  # noqa: E402
from moewire.testing.data import sqnr_db  # noqa: E402

VOCAB = 128
ARCHS = ("qwen3_moe", "mixtral", "deepseek_v3")
G_NVFP4 = 2688.0 / 30.0  # hidden states of these models stay below ~30
#: SQNR floors (dB) of the logits with quantized rows; measured 31-46 dB.
SQNR_FLOOR = {"bf16": 40.0, "fp8": 35.0, "nvfp4": 25.0, "mxfp4": 25.0}


def tiny_model(arch: str, seed: int = 0, **config: object) -> torch.nn.Module:
    """A tiny ``arch`` model in bf16 (``config``: fields that replace the defaults below)."""
    common = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "num_experts_per_tok": 2,
    }
    if arch == "qwen3_moe":
        qwen = {
            "head_dim": 16,
            "moe_intermediate_size": 32,
            "intermediate_size": 64,
            "num_experts": 8,
            "norm_topk_prob": True,
        }
        cfg = transformers.Qwen3MoeConfig(**{**common, **qwen, **config})
        cls = transformers.Qwen3MoeForCausalLM
    elif arch == "mixtral":
        cfg = transformers.MixtralConfig(
            **{"head_dim": 16, "intermediate_size": 32, "num_local_experts": 8, **common, **config}
        )
        cls = transformers.MixtralForCausalLM
    else:
        deepseek = {
            "moe_intermediate_size": 32,
            "intermediate_size": 64,
            "n_routed_experts": 8,
            "n_group": 4,
            "topk_group": 2,
            "first_k_dense_replace": 0,
            "n_shared_experts": 1,
            "routed_scaling_factor": 2.5,
            "kv_lora_rank": 16,
            "q_lora_rank": 32,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
        }
        cfg = transformers.DeepseekV3Config(**{**common, **deepseek, **config})
        cls = transformers.DeepseekV3ForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.copy_(torch.randn(8, generator=g) * 0.1)
    return model


def prompts(rank: int) -> torch.Tensor:
    """Each rank its own batch (data parallel), of a different size."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randint(0, VOCAB, (2 - rank % 2, 9 - 2 * rank), generator=g)


def compare(arch: str, ids_BS: torch.Tensor, group, comm: str, wires=tuple(SQNR_FLOOR)) -> dict:
    """Logits of the unmodified model vs after expert_parallel, per wire format:
    ``{wire: (sqnr_db, max|d| / max|ref|, replaced names)}``."""
    model = tiny_model(arch)
    with torch.no_grad():
        ref = model(ids_BS).logits.float()
        out = {}
        for wire in wires:
            m = copy.deepcopy(model)
            names = expert_parallel(
                m, group, wire=wire, comm=comm, global_scale=G_NVFP4 if wire == "nvfp4" else None
            )
            y = m(ids_BS).logits.float()
            rel = ((y - ref).abs().max() / ref.abs().max()).item()
            out[wire] = (sqnr_db(ref, y), rel, names)
    return out


def check(results: dict, arch: str, record_property=None, tag: str = "") -> None:
    for wire, (sqnr, rel, names) in results.items():
        print(f"{arch} {tag} wire={wire}: logits SQNR {sqnr:.1f} dB, max rel diff {rel:.4f}")
        if record_property is not None:
            record_property(f"sqnr_db[{arch}{tag},{wire}]", round(sqnr, 2))
        assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]
        assert sqnr >= SQNR_FLOOR[wire], (arch, wire, sqnr)
        if wire == "bf16":
            assert rel <= 2**-6, (arch, rel)


@pytest.mark.parametrize("arch", ARCHS)
def test_single_process(arch, record_property):
    """comm='local': the whole swap on one process (every expert local)."""
    check(compare(arch, prompts(0), None, "local"), arch, record_property, "/local")


def test_swapped_structure():
    model = tiny_model("deepseek_v3")
    attn_before = model.model.layers[0].self_attn
    expert_parallel(model, None, wire="fp8", comm="local", experts="fp8_loop")
    block = model.model.layers[0].mlp
    assert isinstance(block, EPMoEBlock)
    assert model.model.layers[0].self_attn is attn_before
    assert block.moe.config.router == "deepseek_v3" and block.moe.config.n_group == 4
    assert block.moe.shared_expert is not None and block.moe.router_bias_E is not None
    with torch.no_grad():
        y = model(prompts(0)).logits
    assert y.isfinite().all()


def test_errors():
    with pytest.raises(ValueError, match="Linear has no sparse MoE block"):
        expert_parallel(torch.nn.Linear(4, 4), None, comm="local")
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
    )
    with pytest.raises(ValueError, match="Qwen2MoeForCausalLM has no sparse MoE block"):
        expert_parallel(transformers.Qwen2MoeForCausalLM(cfg), None, comm="local")
    model = tiny_model("qwen3_moe")
    model.model.layers[1].mlp.experts = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
    with pytest.raises(TypeError, match="expected fused expert weights"):
        expert_parallel(model, None, comm="local")
    model = tiny_model("mixtral")
    model.model.layers[0].mlp.experts.act_fn = torch.nn.GELU()
    with pytest.raises(ValueError, match="activation GELU is not SiLU"):
        expert_parallel(model, None, comm="local")
    with pytest.raises(ValueError, match="global_scale: no entry"):
        expert_parallel(
            tiny_model("mixtral"), None, wire="nvfp4", comm="local", global_scale={"x": 1.0}
        )


def test_options_object_same_as_keywords():
    """expert_parallel(model, group, LayerOptions(...)) builds the layers the keywords do;
    options and option keywords together, or a global scale given twice, are TypeErrors."""
    import moewire as mw

    by_kw, by_opts = tiny_model("mixtral"), tiny_model("mixtral")
    expert_parallel(by_kw, None, wire="nvfp4", comm="local", global_scale=G_NVFP4)
    opts = mw.LayerOptions(wire="nvfp4", comm="local", global_scale=G_NVFP4)
    expert_parallel(by_opts, None, opts)
    assert by_opts.model.layers[1].mlp.moe.options == by_kw.model.layers[1].mlp.moe.options
    with torch.no_grad():
        ids = prompts(0)
        assert torch.equal(by_kw(ids).logits, by_opts(ids).logits)
    with pytest.raises(TypeError, match="not both"):
        expert_parallel(tiny_model("mixtral"), None, opts, wire="fp8")
    with pytest.raises(TypeError, match="global_scale given twice"):
        expert_parallel(tiny_model("mixtral"), None, opts, global_scale=G_NVFP4)


def _dp_worker(comm: str) -> dict:
    import torch.distributed as dist

    rank = dist.get_rank()
    return {arch: compare(arch, prompts(rank), None, comm) for arch in ARCHS}


@pytest.mark.parametrize("comm", ["allgather", "alltoall"])
def test_two_ranks_data_parallel(comm, record_property):
    """2 gloo ranks, each with its own prompts (batch 2 x 9 and 1 x 7): every rank's logits
    against the unmodified model on its own prompts."""
    from moewire.testing import spawn as dist_helper

    results = dist_helper.run_distributed(_dp_worker, 2, comm, timeout=240)
    for rank, res in enumerate(results):
        for arch in ARCHS:
            check(res[arch], arch, record_property, f"/{comm}/rank{rank}")
