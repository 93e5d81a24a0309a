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
