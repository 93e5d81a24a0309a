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

__all__ = [
    "FORMATS",
    "RowView",
    "WireSpec",
    "__version__",
    "nvfp4_global_scale",
    "swizzle_128x4",
    "unswizzle_128x4",
]
