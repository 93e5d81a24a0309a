"""The MoE layer: routing, the local experts' SwiGLU FFNs, and ``EPMoE`` (DESIGN.md)."""

from moewire.moe.config import ROUTERS, MoEConfig
from moewire.moe.experts import EXPERT_IMPLS, LocalExperts
from moewire.moe.layer import EPMoE
from moewire.moe.options import LAYER_COMMS, LayerOptions
from moewire.moe.routing import route

__all__ = [
    "EXPERT_IMPLS",
    "LAYER_COMMS",
    "ROUTERS",
    "EPMoE",
    "LayerOptions",
    "LocalExperts",
    "MoEConfig",
    "route",
]
