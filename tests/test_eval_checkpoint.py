"""Shard-only checkpoint loading (``moewire.integrations.checkpoint``) and ``moewire eval``'s
one-line errors, on the tiny transformers models of ``test_transformers``.

- One process (``comm="local"``): the model built from the checkpoint, reading the experts
  through ``expert_parallel(expert_weights=...)``, gives logits bitwise equal to
  ``AutoModelForCausalLM.from_pretrained`` + ``expert_parallel`` (same bf16 weights, same
  layer), for Qwen3-MoE, Mixtral and DeepSeek-V3, from the per-expert tensors that
  ``save_pretrained`` writes and from fused ``[E, 2I, H]`` tensors.
- Two gloo ranks: each rank holds exactly its 4 of the 8 experts, and its logits equal
  those of the full model made expert-parallel the same way (bitwise: same shards, same
  collectives).
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moewire.cli import main  # noqa: E402
from moewire.integrations.checkpoint import load_expert_parallel  # noqa: E402
from moewire.integrations.transformers import EPMoEBlock, expert_parallel  # noqa: E402
from moewire.moe.weights import quantize_block_weight  # noqa: E402
from test_transformers import ARCHS, VOCAB, prompts, tiny_model  # noqa: E402


def _save(arch: str, path, fused: bool = False) -> None:
    model = tiny_model(arch)
    model.save_pretrained(path)
    if fused:
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        (path / "model.safetensors").unlink()
        save_file(state, str(path / "model.safetensors"))


def _reference(path, group, comm: str) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
    expert_parallel(model, group, wire="bf16", comm=comm)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fused", [False, True])
def test_local_equals_from_pretrained(arch, fused, tmp_path):
    _save(arch, tmp_path, fused)
    ids = prompts(0)
    model, names = load_expert_parallel(tmp_path, None, device="cpu", comm="local")
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        y = model(ids).logits
        ref = _reference(tmp_path, None, "local")(ids).logits
    assert torch.equal(y, ref), arch


def _two_rank_worker(path: str) -> dict:
    import torch.distributed as dist

    rank = dist.get_rank()
    ids = prompts(rank)
    model, _ = load_expert_parallel(path, None, device="cpu", comm="allgather")
    block = model.model.layers[0].mlp
    assert isinstance(block, EPMoEBlock)
    with torch.no_grad():
        y = model(ids).logits
        ref = _reference(path, None, "allgather")(ids).logits
    full = tiny_model("qwen3_moe").model.layers[0].mlp.experts.gate_up_proj
    return {
        "equal": torch.equal(y, ref),
        "w13": block.moe.local_experts.w13_L2IH,
        "want": full[4 * rank : 4 * rank + 4].to(torch.bfloat16),
    }


def test_two_ranks_read_their_shard(tmp_path):
    from moewire.testing import spawn as dist_helper

    _save("qwen3_moe", tmp_path)
    results = dist_helper.run_distributed(_two_rank_worker, 2, str(tmp_path), timeout=240)
    for res in results:
        assert res["equal"]
        assert res["w13"].shape[0] == 4 and torch.equal(res["w13"], res["want"])


def _err(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # drop save_pretrained's progress bars
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_errors(tmp_path, capsys):
    assert "is not a transformers checkpoint directory" in _err(
        capsys, ["--model", str(tmp_path / "nothing")]
    )
    dense = tmp_path / "dense"
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(dense)
    assert "LlamaForCausalLM has no sparse MoE block" in _err(capsys, ["--model", str(dense)])
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(
        json.dumps({"model_type": "my_moe", "auto_map": {"AutoConfig": "x.MyConfig"}})
    )
    (remote / "model.safetensors").write_bytes(b"")
    assert "needs --trust-remote-code" in _err(capsys, ["--model", str(remote)])
    moe = tmp_path / "moe"
    _save("qwen3_moe", moe)
    (moe / "moewire_tokenizer.json").write_text("{}")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert "text too short" in _err(
        capsys, ["--model", str(moe), "--text", str(short), "--formats", "fp8", "--combine", "bf16"]
    )
    # hidden 64 is not a multiple of fp8_block128's block
    err = _err(capsys, ["--model", str(moe), "--formats", "fp8,fp8_block128", "--combine", "bf16"])
    assert "configuration fp8_block128/bf16/logits/before" in err and "128" in err
    assert "do not split over 3 ranks" in _err(
        capsys, ["--model", str(moe), "--world-size", "3", "--formats", "fp8"]
    )


class _NotATensor:
    """A pickled object that ``torch.load(weights_only=True)`` must refuse."""


def test_bin_checkpoints_load_tensors_only(tmp_path):
    """``*.bin`` weights: read with ``torch.load(weights_only=True)``, same logits as the
    safetensors checkpoint; a file with any other pickled object is refused in one line."""
    from moewire.integrations.checkpoint import Checkpoint

    st, pt = tmp_path / "st", tmp_path / "pt"
    _save("qwen3_moe", st)
    _save("qwen3_moe", pt)
    state = {k: v.contiguous() for k, v in tiny_model("qwen3_moe").state_dict().items()}
    (pt / "model.safetensors").unlink()
    torch.save(state, pt / "pytorch_model.bin")
    ids = prompts(0)
    with torch.no_grad():
        a = load_expert_parallel(st, None, device="cpu", comm="local")[0](ids).logits
        b = load_expert_parallel(pt, None, device="cpu", comm="local")[0](ids).logits
    assert torch.equal(a, b)
    torch.save({"x": _NotATensor()}, pt / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"weights_only=True.*never unpickles"):
        Checkpoint(pt)


def _values(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The values an fp8 weight stands for: ``q * s`` in fp32, as the loader computes them."""
    o, c = q.shape
    return q.float() * s.repeat_interleave(128, 0)[:o].repeat_interleave(128, 1)[:, :c]


def _save_fp8(model, path, fused: bool) -> dict:
    """``model`` saved as DeepSeek-V3 releases its fp8 checkpoints: the decoder layers'
    linear weights (attention, experts, shared experts) e4m3 with ``..._scale_inv``,
    per-expert tensors (or fused ``[E, 2I, H]`` ones with block scales ``[E, ...]``);
    embeddings, norms, router and head bf16. Returns the state of the values the fp8
    tensors stand for (fp32 where they are fp8)."""
    from safetensors.torch import save_file

    model.config.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(cfg))
    fp8, ref = {}, {}
    for key, w in model.state_dict().items():
        w = w.contiguous()
        per_expert = not fused and ".experts." in key
        linear = ".layers." in key and key.endswith("weight") and w.dim() == 2
        if ".experts." in key:
            names = (("gate_proj", "up_proj"), w.shape[1] // 2) if "gate_up" in key else None
            qs = [quantize_block_weight(w[e]) for e in range(w.shape[0])]
            if per_expert:
                for e, (q, s) in enumerate(qs):
                    stem = key.rsplit(".", 1)[0]
                    if names:  # gate rows, then up rows
                        i = names[1]
                        for n, sl in ((names[0][0], slice(0, i)), (names[0][1], slice(i, 2 * i))):
                            q2, s2 = quantize_block_weight(w[e, sl])
                            fp8[f"{stem}.{e}.{n}.weight"] = q2
                            fp8[f"{stem}.{e}.{n}.weight_scale_inv"] = s2
                            ref[f"{stem}.{e}.{n}.weight"] = _values(q2, s2)
                    else:
                        fp8[f"{stem}.{e}.down_proj.weight"] = q
                        fp8[f"{stem}.{e}.down_proj.weight_scale_inv"] = s
                        ref[f"{stem}.{e}.down_proj.weight"] = _values(q, s)
            else:
                fp8[key] = torch.stack([q for q, _ in qs])
                fp8[key + "_scale_inv"] = torch.stack([s for _, s in qs])
                ref[key] = torch.stack([_values(q, s) for q, s in qs])
        elif linear and not key.endswith("mlp.gate.weight"):
            q, s = quantize_block_weight(w)
            fp8[key], fp8[key + "_scale_inv"], ref[key] = q, s, _values(q, s)
        else:
            fp8[key] = ref[key] = w
    save_file(fp8, str(path / "model.safetensors"))
    return ref


@pytest.mark.parametrize(("inter", "fused"), [(32, False), (128, False), (128, True)])
def test_fp8_checkpoint_loads_as_its_values(inter, fused, tmp_path):
    """An fp8 checkpoint in DeepSeek-V3's layout loads to the model of the values its
    tensors stand for (``q * s``, fp32), bitwise: dense weights dequantized at load into the
    model's dtype, expert
    weights handed to the layer with their block scales (``inter`` 128: kept as e4m3 +
    scales until the bf16 experts dequantize them; 32: gate and up blocks do not stack, so
    the loader dequantizes them)."""
    from safetensors.torch import save_file

    model = tiny_model("deepseek_v3", moe_intermediate_size=inter)
    ref_state = _save_fp8(model, tmp_path / "fp8", fused)
    (tmp_path / "ref").mkdir()
    model.config.save_pretrained(tmp_path / "ref")
    save_file(ref_state, str(tmp_path / "ref" / "model.safetensors"))
    ids = prompts(0)
    with torch.no_grad():
        y = load_expert_parallel(tmp_path / "fp8", None, device="cpu", comm="local")[0](ids)
        ref = load_expert_parallel(tmp_path / "ref", None, device="cpu", comm="local")[0](ids)
    assert torch.equal(y.logits, ref.logits)


def test_fp8_checkpoint_without_scales_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _save_fp8(tiny_model("deepseek_v3"), tmp_path, fused=False)
    state = load_file(str(tmp_path / "model.safetensors"))
    key = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    del state[key]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"o_proj.weight' is float8_e4m3fn but the checkpoint "
                       r"has no 'model.layers.0.self_attn.o_proj.weight_scale_inv'"):  # fmt: skip
        load_expert_parallel(tmp_path, None, device="cpu", comm="local")
