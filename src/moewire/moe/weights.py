"""Validation of expert weights handed to :meth:`moewire.EPMoE.load_experts`.

Shape legend: ``E`` experts, ``X`` experts given (``E``, or this rank's ``E/W``), ``I``
intermediate, ``H`` hidden, ``O``/``C`` a weight's output/input channels.
"""

from __future__ import annotations

import torch

from moewire.constants import E4M3_MAX, FP8_AMAX_FLOOR, ceil_div
from moewire.moe.config import MoEConfig

#: Side of the square weight blocks of DeepSeek-V3's fp8 checkpoints.
WEIGHT_BLOCK = 128


def quantize_block_weight(w_OC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float ``[..., O, C]`` -> e4m3 ``[..., O, C]`` and fp32 ``[..., ceil(O/128),
    ceil(C/128)]``: one scale per 128x128 block, ``max(amax, 1e-4) / 448`` (edge blocks
    partial), the layout of a DeepSeek-V3 fp8 checkpoint's weights and ``weight_scale_inv``
    (:func:`dequantize_block_weight` reads it back)."""
    *lead, o, c = w_OC.shape
    ob, cb = ceil_div(o, WEIGHT_BLOCK), ceil_div(c, WEIGHT_BLOCK)
    pad = torch.nn.functional.pad(
        w_OC.float(), (0, cb * WEIGHT_BLOCK - c, 0, ob * WEIGHT_BLOCK - o)
    )
    blocks = pad.reshape(*lead, ob, WEIGHT_BLOCK, cb, WEIGHT_BLOCK)
    s = blocks.abs().amax(dim=(-3, -1)).clamp(min=FP8_AMAX_FLOOR) / E4M3_MAX
    q = (blocks / s[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    q = q.reshape(*lead, ob * WEIGHT_BLOCK, cb * WEIGHT_BLOCK)[..., :o, :c]
    return q.contiguous(), s


def dequantize_block_weight(
    w_OC: torch.Tensor, s_BD: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """e4m3 ``[..., O, C]`` with one fp32 scale per 128x128 block ``[..., ceil(O/128),
    ceil(C/128)]`` (a DeepSeek-V3 checkpoint's ``weight_scale_inv``) -> ``dtype``: each
    value ``q * s`` in fp32, rounded once. One leading index at a time, so the transient is
    one ``[O, C]`` fp32 copy."""
    if w_OC.dim() > 2:
        out = torch.empty(w_OC.shape, dtype=dtype, device=w_OC.device)
        for i in range(w_OC.shape[0]):
            out[i] = dequantize_block_weight(w_OC[i], s_BD[i], dtype)
        return out
    o, c = w_OC.shape
    s = s_BD.float().repeat_interleave(WEIGHT_BLOCK, 0)[:o].repeat_interleave(WEIGHT_BLOCK, 1)
    return (w_OC.float() * s[:, :c]).to(dtype)


def check_finite(name: str, t: torch.Tensor | None) -> None:
    """``ValueError`` counting the NaN/Inf values of ``t`` (None passes)."""
    if t is not None and not bool(torch.isfinite(t).all()):
        n_bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} must be finite, got {n_bad} NaN/Inf values")


def _check_scale(name: str, w_XOC: torch.Tensor, scale: torch.Tensor | None) -> None:
    if w_XOC.dtype != torch.float8_e4m3fn:
        if scale is not None:
            raise ValueError(f"{name}_scale is for float8_e4m3fn weights; {name} is {w_XOC.dtype}")
        return
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{name} is float8_e4m3fn: {name}_scale (a torch.Tensor) is required")
    x, o, c = w_XOC.shape
    per_channel = (x, o)
    block = (x, ceil_div(o, WEIGHT_BLOCK), ceil_div(c, WEIGHT_BLOCK))
    if tuple(scale.shape) not in (per_channel, block):
        raise ValueError(
            f"{name}_scale must be [{x}, {o}] (per output channel) or {list(block)} (per "
            f"{WEIGHT_BLOCK}x{WEIGHT_BLOCK} block), got {list(scale.shape)}"
        )
    if not scale.is_floating_point() or scale.device != w_XOC.device:
        raise ValueError(
            f"{name}_scale must be a float tensor on {w_XOC.device}, got {scale.dtype} on "
            f"{scale.device}"
        )


def check_expert_weights(
    config: MoEConfig,
    num_local: int,
    w13: object,
    w2: object,
    w13_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
) -> int:
    """Raise ``TypeError``/``ValueError`` naming the argument unless ``w13 [X, 2I, H]`` and
    ``w2 [X, H, I]`` are float or e4m3 (with scales) weights of ``X = E`` or ``X =
    num_local`` experts on one device, finite; return ``X``."""
    c = config
    for name, w in (("w13", w13), ("w2", w2)):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
        if not w.is_floating_point():
            raise TypeError(f"{name} must be floating point, got dtype {w.dtype}")
    x = w13.shape[0] if w13.dim() == 3 else -1
    for name, w, tail in (
        ("w13", w13, (2 * c.intermediate, c.hidden)),
        ("w2", w2, (c.hidden, c.intermediate)),
    ):
        if tuple(w.shape) not in ((c.num_experts, *tail), (num_local, *tail)) or w.shape[0] != x:
            raise ValueError(
                f"{name} must have shape {[c.num_experts, *tail]} (every expert) or "
                f"{[num_local, *tail]} (this rank's shard), got {list(w.shape)}"
            )
    if w13.device != w2.device:
        raise ValueError(f"w13 is on {w13.device}, w2 on {w2.device}")
    for name, w, s in (("w13", w13, w13_scale), ("w2", w2, w2_scale)):
        _check_scale(name, w, s)
        if w.dtype != torch.float8_e4m3fn:
            check_finite(name, w)
    return x
