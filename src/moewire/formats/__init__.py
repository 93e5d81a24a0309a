"""Wire formats: how a token becomes a row of bytes and back (WIRE_FORMATS.md).

One module per format family (``bf16``, ``fp8``, ``mx``, ``nvfp4``), each with a pure-torch
reference that runs on any device; ``spec.py`` lays payload, scales and extras into rows;
``combine.py`` is the combine codec (the partial rows of the return trip).
"""

from moewire.formats import bf16, fp8, mx, nvfp4  # noqa: F401  (registers the formats)
from moewire.formats.base import WireFormat, format_class
from moewire.formats.nvfp4 import nvfp4_global_scale, swizzle_128x4, unswizzle_128x4
from moewire.formats.spec import RowView, Section, WireSpec

#: Names of every wire format, in order of bytes per token (largest first).
FORMATS: tuple[str, ...] = ("bf16", "fp8", "fp8_block128", "mxfp8", "nvfp4", "mxfp4")

__all__ = [
    "FORMATS",
    "RowView",
    "Section",
    "WireFormat",
    "WireSpec",
    "format_class",
    "nvfp4_global_scale",
    "swizzle_128x4",
    "unswizzle_128x4",
]
