"""moewire: quantize Mixture-of-Experts token activations before they cross ranks.

See DESIGN.md for the architecture: formats/ (token -> row of bytes), comm/ (rows between
ranks), moe/ (routing, experts, the EP layer), bench/ (measurement).
"""

from moewire.formats import (
    FORMATS,
    RowView,
    WireSpec,
    nvfp4_global_scale,
    swizzle_128x4,
    unswizzle_128x4,
)

__version__ = "0.1.0"

# Communication and the MoE layer import torch.distributed; load them on first use.
_LAZY = {
    "make_comm": "moewire.comm",
    "COMMS": "moewire.comm",
    "MoEConfig": "moewire.moe",
    "EPMoE": "moewire.moe",
    "LayerOptions": "moewire.moe",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moewire' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [  # noqa: RUF022
    "COMMS",
    "EPMoE",
    "FORMATS",
    "LayerOptions",
    "MoEConfig",
    "RowView",
    "WireSpec",
    "__version__",
    "make_comm",
    "nvfp4_global_scale",
    "swizzle_128x4",
    "unswizzle_128x4",
]
