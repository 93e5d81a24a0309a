"""``LayerOptions``: how an :class:`~moewire.EPMoE` moves and computes its tokens (frozen,
validated once).

:class:`~moewire.MoEConfig` says what the layer computes (shapes, router); ``LayerOptions``
says how: the wire format of the dispatched rows, the comm backend, what travels for the
routing, where the rows are quantized, the experts' compute path and the combine's wire.
Every option is checked here, at construction, by the check of the module that defines it
(formats, comm, routing, experts), so a bad choice fails before any process group, weight or
collective is touched. What needs the layer's shapes (``hidden`` a multiple of the format's
block, ``global_scale`` given for a format other than ``nvfp4``) is checked by
:class:`moewire.WireSpec` when the layer is built.

    opts = mw.LayerOptions(wire="nvfp4", comm="allgather", routing="topk", global_scale=g)
    layer = mw.EPMoE(cfg, group, opts)              # same as mw.EPMoE(cfg, group, wire=..., ...)
    fp8 = dataclasses.replace(opts, wire="fp8", global_scale=None)   # validated again
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from moewire.comm import COMMS
from moewire.comm.agreement import check_mode
from moewire.comm.grouped import check_grouped_combine_wire
from moewire.formats.base import format_class
from moewire.formats.combine import COMBINE_DTYPES, check_combine_wire
from moewire.formats.nvfp4 import check_global_scale
from moewire.moe.experts import EXPERT_IMPLS
from moewire.moe.routing import ROUTING_MODES

#: ``comm`` names: the backends of :func:`moewire.make_comm`, plus ``local`` (no process
#: group, one process holds every expert: the unsharded reference layer).
LAYER_COMMS = (*COMMS, "local")
#: Where the dispatched rows are quantized: by the sender, or by the receiver from bf16 rows.
QUANTIZE_MODES = ("before", "after")


def _choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class LayerOptions:
    """The choices of one :class:`~moewire.EPMoE` (all optional; defaults: the unquantized
    all-gather layer).

    Args:
        wire: wire format of the token rows (one of :data:`moewire.FORMATS`).
        comm: ``"allgather"``, ``"alltoall"``, ``"grouped"`` (:func:`moewire.make_comm`) or
            ``"local"`` (no communication; this process hosts all ``E`` experts).
        routing: ``"logits"`` (router logits travel, receivers route) or ``"topk"`` (senders
            route; ids and weights travel).
        global_scale: ``wire="nvfp4"`` only: the static fp32 global scale ``448*6/amax``
            from calibration (:func:`moewire.nvfp4_global_scale`; a float or a 1-element
            tensor, kept as the float value of its fp32). None: calibrated once, on the
            first forward, from the largest finite ``|x|`` over every rank (one extra
            all-reduce, that forward only), then fixed; pass a calibrated scale in
            production, where the first batch may not be representative.
        quantize: ``"before"`` (rows quantized before the dispatch) or ``"after"`` (bf16
            rows travel and the receiver quantizes them: vLLM's path before PR 30014, kept
            for measurement). Outputs are bitwise identical.
        experts: compute path of the local experts: ``"auto"``, ``"loop"``, ``"grouped"``,
            ``"fp8"`` or ``"fp8_loop"`` (see ``moe/experts.py``; the fp8 paths take every
            wire format: ``fp8`` rows as they are, the others decoded to e4m3 per row).
            ``"fp8"`` needs a CUDA GPU of compute capability 9.0+, checked by the layer.
        combine_dtype: dtype of the partial sums sent back: bf16 (default, as peers send;
            each rank's sum is accumulated in fp32 and rounded once) or fp32 (twice the
            combine bytes).
        combine_wire: how the partial sums travel back (:func:`moewire.make_comm`):
            ``"bf16"`` (default: unquantized, in ``combine_dtype``), ``"fp8"``, ``"mxfp8"``,
            ``"nvfp4"`` (dynamic per-row scale) or ``"mxfp4"``: each rank's partial rows
            (``combine_dtype``) are quantized, dequantized by the owner and added in fp32
            in rank order. ``comm="grouped"`` supports only ``"bf16"``. With
            ``comm="local"`` the full sum makes one round trip (a one-rank group's result).
        check: when the comm checks that every rank agrees on the wire (``make_comm``'s
            ``check``): ``"once"`` (default) or ``"every_call"`` (debugging). Unused with
            ``comm="local"``.

    Raises:
        ValueError: an unknown choice (names the option, the allowed values and the value
            given); ``combine_wire`` other than ``"bf16"`` with ``comm="grouped"``; a
            global scale that is not finite and > 0.
        TypeError: ``wire`` not a str; ``global_scale`` not a float or 1-element tensor.
    """

    wire: str = "bf16"
    comm: str = "allgather"
    routing: str = "logits"
    global_scale: float | torch.Tensor | None = None
    quantize: str = "before"
    experts: str = "auto"
    combine_dtype: torch.dtype = torch.bfloat16
    combine_wire: str = "bf16"
    check: str = "once"

    def __post_init__(self) -> None:
        format_class(self.wire)
        _choice("comm", self.comm, LAYER_COMMS)
        _choice("routing", self.routing, ROUTING_MODES)
        _choice("quantize", self.quantize, QUANTIZE_MODES)
        _choice("combine_dtype", self.combine_dtype, COMBINE_DTYPES)
        check_combine_wire(self.combine_wire)
        if self.comm == "grouped":
            check_grouped_combine_wire(self.combine_wire)
        _choice("experts", self.experts, EXPERT_IMPLS)
        check_mode(self.check)
        if self.global_scale is not None:
            object.__setattr__(self, "global_scale", check_global_scale(self.global_scale))


#: The keyword arguments of :class:`~moewire.EPMoE` that make its :class:`LayerOptions`.
OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(LayerOptions))


def layer_options(
    options: LayerOptions | None, kwargs: Mapping[str, Any], who: str = "EPMoE"
) -> LayerOptions:
    """The options of a layer given either as ``options`` or as keywords (``kwargs``, the
    fields of :class:`LayerOptions`), not both: ``TypeError`` naming what was given."""
    if options is None:
        unknown = sorted(set(kwargs) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(
                f"{who} got unexpected keyword arguments {unknown}; the layer options are "
                f"{list(OPTION_NAMES)}"
            )
        return LayerOptions(**kwargs)
    if not isinstance(options, LayerOptions):
        raise TypeError(
            f"options must be a moewire.LayerOptions or None, got {type(options).__name__}"
        )
    if kwargs:
        raise TypeError(
            f"{who}: pass the layer options either as a LayerOptions or as keywords, not both; "
            f"got options= and the keywords {sorted(kwargs)}"
        )
    return options
