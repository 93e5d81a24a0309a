"""Hugging Face transformers: swap a model's sparse MoE blocks for :class:`moewire.EPMoE`.

    from moewire.integrations.transformers import expert_parallel
    expert_parallel(model, group, wire="nvfp4", comm="allgather", global_scale=g)

Each rank keeps only its ``E/W`` experts (plus the full router, which every rank needs,
and DeepSeek-V3's shared experts, which run locally on the unquantized input). Attention,
norms, embeddings and dense MLPs are untouched, so attention stays data-parallel: each rank
runs its own requests and only the MoE layers communicate.

Supported blocks: ``Qwen3MoeSparseMoeBlock`` (softmax router, ``norm_topk_prob``),
``MixtralSparseMoeBlock`` (softmax, always renormalized) and ``DeepseekV3MoE`` (grouped
sigmoid router with the score correction bias, ``routed_scaling_factor``, shared experts).
They must have the fused expert weights of transformers 5.x (``experts.gate_up_proj``
``[E, 2I, H]``, gate rows first, and ``experts.down_proj`` ``[E, H, I]``) and a SiLU
activation; transformers 4.x kept one ``nn.Linear`` per expert and is rejected with a
``TypeError``.

Tested with transformers 5.24.0 (torch 2.13, CPU, gloo).

The router logits are computed as the original block computes them (Qwen3/Mixtral:
``F.linear`` in the model dtype; DeepSeek-V3: in fp32) and routed by moewire in fp32.
Differences from the original blocks, all within bf16 rounding: the experts see the input
rounded to bf16 and run in bf16 (fp32 SwiGLU), the top-k weights stay fp32 (Qwen3 rounds
them to the model dtype), and the weighted expert outputs are summed in fp32 (the original
blocks accumulate in the model dtype).

Shape legend: ``B`` batch, ``S`` sequence, ``T = B*S`` tokens, ``H`` hidden, ``E`` experts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moewire.moe import EPMoE, LayerOptions, MoEConfig
from moewire.moe.options import layer_options

#: ``(block name, first expert, count) -> (w13_L2IH, w2_LHI)``, or for e4m3 weights
#: ``(w13, w2, w13_scale, w2_scale)``: a rank's experts, read alone.
ExpertShardReader = Callable[[str, int, int], tuple[torch.Tensor, ...]]

#: transformers versions this module was tested with (inclusive).
TESTED_TRANSFORMERS = ("5.24.0", "5.24.0")


@dataclass(frozen=True)
class _Arch:
    block: str
    module: str
    fp32_logits: bool
    config: Callable[[nn.Module], MoEConfig]


def _experts_shape(block: nn.Module) -> tuple[int, int, int]:
    experts = getattr(block, "experts", None)
    w13 = getattr(experts, "gate_up_proj", None)
    w2 = getattr(experts, "down_proj", None)
    if not (isinstance(w13, torch.Tensor) and isinstance(w2, torch.Tensor)):
        raise TypeError(
            f"{type(block).__name__}: expected fused expert weights experts.gate_up_proj "
            "[E, 2I, H] and experts.down_proj [E, H, I] (transformers 5.x); this block has "
            f"{type(experts).__name__}. Tested with transformers {TESTED_TRANSFORMERS[0]}-"
            f"{TESTED_TRANSFORMERS[1]}."
        )
    e, two_i, h = w13.shape
    if two_i % 2 or tuple(w2.shape) != (e, h, two_i // 2):
        raise ValueError(
            f"{type(block).__name__}: expert weight shapes {tuple(w13.shape)} and "
            f"{tuple(w2.shape)} are not [E, 2I, H] and [E, H, I]"
        )
    probe = torch.linspace(-4, 4, 17)
    act = getattr(experts, "act_fn", None)
    if act is None or not torch.equal(act(probe), F.silu(probe)):
        raise ValueError(
            f"{type(block).__name__}: moewire experts are SwiGLU; this block's activation "
            f"{type(act).__name__} is not SiLU"
        )
    return e, two_i // 2, h


def _softmax_config(renormalize: Callable[[nn.Module], bool]) -> Callable[[nn.Module], MoEConfig]:
    def make(block: nn.Module) -> MoEConfig:
        e, i, h = _experts_shape(block)
        return MoEConfig(
            hidden=h,
            intermediate=i,
            num_experts=e,
            top_k=int(block.gate.top_k),
            router="softmax",
            renormalize=renormalize(block),
        )

    return make


def _deepseek_v3_config(block: nn.Module) -> MoEConfig:
    e, i, h = _experts_shape(block)
    gate = block.gate
    return MoEConfig(
        hidden=h,
        intermediate=i,
        num_experts=e,
        top_k=int(gate.top_k),
        router="deepseek_v3",
        renormalize=bool(gate.norm_topk_prob),
        n_group=int(gate.num_group),
        topk_group=int(gate.topk_group),
        routed_scaling_factor=float(gate.routed_scaling_factor),
    )


_ARCHS = (
    _Arch(
        "Qwen3MoeSparseMoeBlock",
        "transformers.models.qwen3_moe.modeling_qwen3_moe",
        fp32_logits=False,
        config=_softmax_config(lambda b: bool(b.gate.norm_topk_prob)),
    ),
    _Arch(
        "MixtralSparseMoeBlock",
        "transformers.models.mixtral.modeling_mixtral",
        fp32_logits=False,
        config=_softmax_config(lambda b: True),
    ),
    _Arch(
        "DeepseekV3MoE",
        "transformers.models.deepseek_v3.modeling_deepseek_v3",
        fp32_logits=True,
        config=_deepseek_v3_config,
    ),
)
SUPPORTED_BLOCKS = tuple(a.block for a in _ARCHS)


def _block_classes() -> list[tuple[type, _Arch]]:
    import importlib

    out = []
    for arch in _ARCHS:
        try:
            mod = importlib.import_module(arch.module)
        except ImportError:
            continue
        cls = getattr(mod, arch.block, None)
        if cls is not None:
            out.append((cls, arch))
    return out


def _find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, _Arch]]:
    classes = _block_classes()
    found = [
        (name, module, arch)
        for name, module in model.named_modules()
        for cls, arch in classes
        if type(module) is cls
    ]
    if not found:
        raise ValueError(
            f"expert_parallel: {type(model).__name__} has no sparse MoE block of a supported "
            f"architecture ({', '.join(SUPPORTED_BLOCKS)}; tested with transformers "
            f"{TESTED_TRANSFORMERS[0]}-{TESTED_TRANSFORMERS[1]})"
        )
    return found


def moe_block_names(model: nn.Module) -> list[str]:
    """Qualified names of the sparse MoE blocks :func:`expert_parallel` would replace.

    Raises:
        ValueError: ``model`` has none (names the model class and the supported blocks).
    """
    return [name for name, _, _ in _find_blocks(model)]


class EPMoEBlock(nn.Module):
    """Drop-in for a transformers sparse MoE block: ``[B, S, H] -> [B, S, H]``.

    Keeps the block's router (``gate``, full: every rank routes) and an :class:`EPMoE`
    holding this rank's experts (and the shared experts, if any).
    """

    def __init__(self, gate: nn.Module, moe: EPMoE, *, fp32_logits: bool) -> None:
        super().__init__()
        self.gate = gate
        self.moe = moe
        self.fp32_logits = fp32_logits

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x_TH = hidden_states.reshape(-1, shape[-1])
        w_EH = self.gate.weight
        if self.fp32_logits:
            logits_TE = F.linear(x_TH.float(), w_EH.float())
        else:
            logits_TE = F.linear(x_TH, w_EH)
        return self.moe(x_TH, logits_TE).reshape(shape)


def expert_parallel(
    model: nn.Module,
    group: dist.ProcessGroup | None = None,
    options: LayerOptions | None = None,
    *,
    global_scale: float | Mapping[str, float] | None = None,
    expert_weights: ExpertShardReader | None = None,
    **option_kwargs,
) -> list[str]:
    """Swap every supported sparse MoE block of ``model`` for an expert-parallel one, in place.

    Args:
        model: a loaded transformers model (e.g. ``Qwen3MoeForCausalLM``,
            ``MixtralForCausalLM``, ``DeepseekV3ForCausalLM``), the same weights on every rank.
        group: the expert-parallel process group (None: the default group); every rank of
            it must call this, and later run the model's forward together (each with its
            own tokens, possibly none).
        options: the :class:`~moewire.LayerOptions` of every new layer, or None: built from
            ``**option_kwargs`` (not both).
        global_scale: ``nvfp4`` only: one static global scale for every layer, or a mapping
            from the block's qualified name (as in ``model.named_modules()``) to its scale
            (or in ``options``, one for every layer; not both).
        expert_weights: the shard-only path: ``(block name, first expert, count) ->
            (w13 [L, 2I, H], w2 [L, H, I])`` (e4m3 weights: ``(w13, w2, w13_scale,
            w2_scale)``, as :meth:`~moewire.EPMoE.load_experts` takes them) returns this
            rank's experts, and the block's
            own expert tensors are never read (they may be on the ``meta`` device, for a
            model built without its experts: see
            :func:`moewire.integrations.checkpoint.load_expert_parallel`). None: each rank
            slices its experts out of the block's full weights.
        **option_kwargs: the fields of :class:`~moewire.LayerOptions` (``wire``, ``comm``:
            ``"allgather"``, ``"alltoall"``, ``"grouped"`` or ``"local"``, ``routing``,
            ``quantize``, ``experts``, ``combine_dtype``, ``combine_wire``, ...).

    Returns:
        The qualified names of the replaced blocks, in model order.

    Raises:
        ValueError: no block of a supported architecture is in ``model`` (names the model
            class and the supported blocks), or a block's activation is not SiLU.
        TypeError: a supported block without fused expert weights (transformers 4.x).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    options = layer_options(options, option_kwargs, who="expert_parallel")
    if options.global_scale is not None and global_scale is not None:
        raise TypeError("expert_parallel: global_scale given twice, as an argument and in options")
    found = _find_blocks(model)
    for name, block, arch in found:
        scale = _block_scale(global_scale, name)
        opts = options if scale is None else dataclasses.replace(options, global_scale=scale)
        shared = getattr(block, "shared_experts", None)
        moe = EPMoE(arch.config(block), group, opts, shared_expert=shared)
        _load_block_experts(moe, name, block, expert_weights)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, EPMoEBlock(block.gate, moe, fp32_logits=arch.fp32_logits))
    return [name for name, _, _ in found]


def _block_scale(global_scale: float | Mapping[str, float] | None, name: str) -> float | None:
    if not isinstance(global_scale, Mapping):
        return global_scale
    if name not in global_scale:
        raise ValueError(f"global_scale: no entry for MoE block {name!r}")
    return global_scale[name]


def _load_block_experts(
    moe: EPMoE, name: str, block: nn.Module, expert_weights: ExpertShardReader | None
) -> None:
    """This rank's experts of ``block``: sliced from its weights, or read alone."""
    bias = getattr(block.gate, "e_score_correction_bias", None)
    if expert_weights is None:
        moe.load_experts(block.experts.gate_up_proj, block.experts.down_proj, bias)
    else:
        w13, w2, *scales = expert_weights(name, moe.first_expert, moe.num_local)
        kw = dict(zip(("w13_scale", "w2_scale"), scales, strict=True)) if scales else {}
        moe.load_local_experts(w13, w2, bias, **kw)
