"""Load a local transformers MoE checkpoint expert-parallel: each rank reads only its shard.

    from moewire.integrations.checkpoint import load_expert_parallel
    model, names = load_expert_parallel("/models/qwen3-moe", group, device="cuda:0",
                                        wire="nvfp4", comm="allgather")

The model is built on the ``meta`` device (no memory), the dense parts (embeddings,
attention, norms, routers, shared experts, the head) are read from the checkpoint onto
``device``, and each MoE block becomes an :class:`~moewire.integrations.transformers.EPMoEBlock`
whose experts are read from the checkpoint for this rank's ``E/W`` experts alone. So a model
larger than one GPU runs expert-parallel, as long as the dense part fits.

fp8 checkpoints in DeepSeek-V3's layout (float8_e4m3fn ``...weight`` tensors, each with an
fp32 ``...weight_scale_inv`` of one scale per 128x128 block beside it) load too: dense
weights are dequantized once into the model's dtype; expert weights keep their e4m3 values
and block scales, which fp8 experts use as they are (``experts="fp8"``) and bf16 experts
dequantize at load (``EPMoE.load_experts``). An e4m3 tensor without its scales is an error.

Checkpoints are read with ``safetensors`` (slices, so a rank touches only its experts'
bytes), or ``*.bin`` files with ``torch.load(weights_only=True, mmap=True)``: nothing is ever
unpickled beyond tensors. Expert tensors may be stored fused (``experts.gate_up_proj``
``[E, 2I, H]`` and ``experts.down_proj`` ``[E, H, I]``) or per expert, as transformers saves
them and as released checkpoints hold them (``experts.{e}.gate_proj/up_proj/down_proj``;
Mixtral's ``experts.{e}.w1/w3/w2`` under ``block_sparse_moe``). Remote code stays off unless
``trust_remote_code=True``. Nothing is downloaded (``local_files_only``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from moewire.integrations.transformers import expert_parallel, moe_block_names
from moewire.moe.weights import WEIGHT_BLOCK, dequantize_block_weight

#: Per-expert key names: (gate, up, down), in the order tried.
_PER_EXPERT = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def _alt_keys(key: str) -> tuple[str, ...]:
    """``key`` and its legacy spelling (Mixtral's ``block_sparse_moe``)."""
    return (key, key.replace(".mlp.", ".block_sparse_moe."))


class Checkpoint:
    """The tensors of a local checkpoint directory, read one at a time.

    Args:
        path: a directory holding ``config.json`` and ``*.safetensors`` (or ``*.bin``) files.

    Raises:
        ValueError: not a directory, no ``config.json``, or no weight files (one line).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir() or not (self.path / "config.json").is_file():
            raise ValueError(
                f"{path} is not a transformers checkpoint directory (no config.json there)"
            )
        self._files: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        files = sorted(self.path.glob("*.safetensors")) or sorted(self.path.glob("*.bin"))
        if not files:
            raise ValueError(f"{path}: no *.safetensors or *.bin weight files")
        for f in files:
            for key in self._handle(f).keys():  # noqa: SIM118 (safe_open has no __iter__)
                self._files[key] = f

    def _handle(self, f: Path):
        if f not in self._open:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                try:
                    self._open[f] = safe_open(str(f), framework="pt", device="cpu")
                except Exception as e:
                    raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
            else:
                try:
                    self._open[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:
                    raise ValueError(
                        f"{f}: not loadable with torch.load(weights_only=True) ({type(e).__name__})"
                        "; moewire never unpickles arbitrary objects: convert it to safetensors"
                    ) from None
        return self._open[f]

    def find(self, key: str) -> str | None:
        """The stored name of ``key`` (itself or its legacy spelling), or None."""
        return next((k for k in _alt_keys(key) if k in self._files), None)

    def rows(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Tensor ``key`` (rows ``[start, stop)`` of dim 0 if given), on CPU, as stored."""
        h = self._handle(self._files[key])
        if isinstance(h, dict):
            t = h[key]
            return t if start is None else t[start:stop].clone()
        if start is None:
            return h.get_tensor(key)
        return h.get_slice(key)[start:stop]

    def scale_inv(self, key: str, start: int | None = None, stop: int | None = None):
        """The block scales of e4m3 tensor ``key`` (``key + "_scale_inv"``), as stored;
        ``ValueError`` naming both when the checkpoint has none."""
        stored = self.find(f"{key}_scale_inv")
        if stored is None:
            raise ValueError(
                f"{self.path}: {key!r} is float8_e4m3fn but the checkpoint has no "
                f"{key + '_scale_inv'!r} (its fp32 scale per {WEIGHT_BLOCK}x{WEIGHT_BLOCK} block)"
            )
        return self.rows(stored, start, stop)

    def tensor(self, key: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Tensor ``key`` on ``device`` in ``dtype``; an e4m3 one dequantized with its block
        scales (each value ``q * s`` in fp32, rounded once)."""
        t = self.rows(key)
        if t.dtype != torch.float8_e4m3fn:
            return t.to(device=device, dtype=dtype)
        return dequantize_block_weight(t.to(device), self.scale_inv(key).to(device), dtype)

    def expert_shard(
        self, block: str, first: int, count: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, ...]:
        """Experts ``[first, first+count)`` of MoE block ``block``: ``(w13 [L, 2I, H],
        w2 [L, H, I])`` on ``device`` in ``dtype``; for e4m3 experts ``(w13, w2,
        w13_scale, w2_scale)``, the e4m3 values and their block scales as stored (or, where
        ``I`` is not a multiple of 128 so that gate and up blocks cannot be stacked, the
        dequantized weights in ``dtype``)."""
        fused = self.find(f"{block}.experts.gate_up_proj")
        if fused is not None:
            down = self.find(f"{block}.experts.down_proj")
            ws = [self.rows(k, first, first + count) for k in (fused, down)]
            if ws[0].dtype != torch.float8_e4m3fn:
                return tuple(w.to(device, dtype) for w in ws)
            scales = [self.scale_inv(k, first, first + count).to(device) for k in (fused, down)]
            return (*(w.to(device) for w in ws), *scales)
        for gate, up, down in _PER_EXPERT:
            names = [self.find(f"{block}.experts.{first}.{n}.weight") for n in (gate, up, down)]
            if all(names):
                break
        else:
            raise ValueError(f"{self.path}: no expert weights for MoE block {block!r}")
        experts = [self._expert(block, e, (gate, up, down), device, dtype)
                   for e in range(first, first + count)]  # fmt: skip
        return tuple(torch.stack(parts) for parts in zip(*experts, strict=True))

    def _expert(
        self, block: str, e: int, kinds: tuple[str, str, str], device, dtype
    ) -> tuple[torch.Tensor, ...]:
        """One expert's ``(w13, w2)``, or ``(w13, w2, s13, s2)`` (see :meth:`expert_shard`)."""
        keys = [self.find(f"{block}.experts.{e}.{n}.weight") for n in kinds]
        if not all(keys):
            raise ValueError(f"{self.path}: expert {e} of MoE block {block!r} is missing")
        g, u, d = (self.rows(k) for k in keys)
        if g.dtype != torch.float8_e4m3fn:
            return torch.cat([g, u]).to(device, dtype), d.to(device, dtype)
        sg, su, sd = (self.scale_inv(k) for k in keys)
        if g.shape[0] % WEIGHT_BLOCK:  # gate and up blocks do not stack: dequantize
            deq = [dequantize_block_weight(w, s, dtype) for w, s in ((g, sg), (u, su), (d, sd))]
            return torch.cat(deq[:2]).to(device), deq[2].to(device)
        return (torch.cat([g, u]).to(device), d.to(device), torch.cat([sg, su]).to(device),
                sd.to(device))  # fmt: skip


def load_config(path: str | Path, trust_remote_code: bool = False):
    """The checkpoint's transformers config, local files only.

    Raises:
        ValueError: not a checkpoint directory, or a model type this transformers does not
            know whose code lives in the checkpoint (needs ``trust_remote_code=True``).
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path} is not a transformers checkpoint directory (no config.json)")
    raw = json.loads(cfg_file.read_text())
    known = raw.get("model_type") in CONFIG_MAPPING
    if not known and not trust_remote_code:
        why = "its code is in the checkpoint (auto_map)" if "auto_map" in raw else "unknown"
        raise ValueError(
            f"{path}: model_type {raw.get('model_type')!r} is not built into transformers "
            f"({why}); running the checkpoint's own code needs --trust-remote-code"
        )
    return AutoConfig.from_pretrained(
        str(path), trust_remote_code=trust_remote_code and not known, local_files_only=True
    )


def meta_model(config, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of ``config`` on the ``meta`` device: shapes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _load_dense(model: nn.Module, ckpt: Checkpoint, skip: tuple[str, ...], device) -> None:
    """Every parameter and persistent buffer outside ``skip`` prefixes, from the checkpoint."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {}
    for key, meta in model.state_dict().items():
        if key.startswith(skip):
            continue
        stored = ckpt.find(key)
        if stored is None:
            if tied and key.endswith("lm_head.weight"):
                continue
            raise ValueError(f"{ckpt.path}: the checkpoint has no tensor {key!r}")
        t = ckpt.tensor(stored, device, meta.dtype)
        if tuple(t.shape) != tuple(meta.shape):
            raise ValueError(
                f"{ckpt.path}: {key!r} is {list(t.shape)}, the model wants {list(meta.shape)}"
            )
        state[key] = t
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()


def _rebuild_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary ``inv_freq``) are computed at init, so they are still
    on ``meta``: build those modules again on ``device`` from the model's config."""
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        try:
            with torch.device("cpu"):
                fresh = type(module)(getattr(module, "config", model.config)).to(device)
        except TypeError as e:
            raise ValueError(f"cannot rebuild {name} ({type(module).__name__}): {e}") from None
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)


def load_expert_parallel(
    path: str | Path,
    group: dist.ProcessGroup | None,
    *,
    device: torch.device | str,
    trust_remote_code: bool = False,
    **ep_kwargs,
) -> tuple[nn.Module, list[str]]:
    """Build a checkpoint's causal LM with its MoE blocks expert-parallel over ``group``,
    reading only this rank's experts.

    Args:
        path: local checkpoint directory (``config.json`` + safetensors / ``*.bin``).
        group: the expert-parallel group (None: the default group); every rank calls this.
        device: where this rank's weights go and the forward runs.
        trust_remote_code: allow a model type whose code lives in the checkpoint.
        **ep_kwargs: passed to :func:`~moewire.integrations.transformers.expert_parallel`
            (``options=LayerOptions(...)``, or ``wire``, ``comm``, ``routing``,
            ``combine_wire``, ...).

    Returns:
        ``(model in eval mode, qualified names of the replaced MoE blocks)``.

    Raises:
        ValueError: not a checkpoint, a model without a supported MoE block, a tensor
            missing or of the wrong shape, remote code needed; one line each.
    """
    device = torch.device(device)
    config = load_config(path, trust_remote_code)
    ckpt = Checkpoint(path)
    model = meta_model(config, trust_remote_code)
    blocks = moe_block_names(model)
    _load_dense(model, ckpt, tuple(f"{b}.experts." for b in blocks), device)
    _rebuild_buffers(model, device)
    dtype = next(p.dtype for p in model.parameters() if not p.is_meta)

    def shard(block: str, first: int, count: int):
        return ckpt.expert_shard(block, first, count, device, dtype)

    names = expert_parallel(model, group, expert_weights=shard, **ep_kwargs)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"{path}: parameters not loaded: {left[:4]}")
    return model.eval(), names
