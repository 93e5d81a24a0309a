"""The interface every wire format implements, and the format registry.

A format turns one token's activations ``x [H]`` into a payload and block scales and back.
It knows nothing about rows, extras or devices: :class:`moewire.WireSpec` lays the two
sections into a row of bytes (see ``spec.py``). It carries its static parameters (nvfp4's
global scale) and the facts callers branch on (``needs_global_scale``, ``kind``, ...), so
no code outside a format's module tests its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from moewire.constants import Kind


@dataclass(frozen=True)
class WireFormat:
    """Base class of the formats. Subclasses are frozen dataclasses of their parameters."""

    name: ClassVar[str]
    #: ``hidden`` must be a multiple of this (the scale block, or 2 for packed nibbles).
    block: ClassVar[int]
    payload_dtype: ClassVar[torch.dtype]
    scale_dtype: ClassVar[torch.dtype]
    #: Whether the payload is two e2m1 codes per byte.
    packed: ClassVar[bool] = False
    #: The Triton kernels' recipe id (``tl.constexpr``).
    kind: ClassVar[Kind]
    #: Whether the format takes a static fp32 global scale ``g`` (``WireSpec(global_scale=)``).
    needs_global_scale: ClassVar[bool] = False
    #: The kernel id of the combine codec's variant that stores a dynamic global scale in
    #: each row (``formats/combine.py``); formats with a global scale only.
    row_scaled_kind: ClassVar[Kind | None] = None
    #: Whether the GEMMs that consume it want its block scales in the 128x4 swizzled layout
    #: (:meth:`moewire.WireSpec.swizzled_scales`).
    swizzles_scales: ClassVar[bool] = False
    #: Whether rows are the rowwise-scaled fp8 GEMM's A operand as they are (e4m3 values,
    #: one fp32 scale per token), so the fp8 expert path gathers them without decoding.
    rowwise_fp8: ClassVar[bool] = False
    #: Whether rows are the block-scaled fp8 GEMM's A operand as they are (e4m3 values, one
    #: fp32 scale per 128), so the block-scaled fp8 expert path gathers them without decoding.
    block128_fp8: ClassVar[bool] = False

    @classmethod
    def make(cls, global_scale: object = None) -> WireFormat:
        """The format with its static parameters checked (``global_scale``: only for formats
        with :attr:`needs_global_scale`, required there)."""
        if global_scale is not None:
            raise ValueError(
                f"global_scale is only used by format {quoted_names('needs_global_scale')}, "
                f"got it for {cls.name!r}"
            )
        return cls()

    @property
    def global_scale(self) -> float | None:
        """The static fp32 global scale ``g``; None for formats without one."""
        return None

    @property
    def inv_global_scale(self) -> float:
        """fp32 ``1/g``, correctly rounded, as the kernels multiply by it (1.0 without ``g``)."""
        return 1.0

    def payload_numel(self, hidden: int) -> int:
        """Elements of ``payload_dtype`` per token."""
        return hidden // 2 if self.packed else hidden

    def scale_numel(self, hidden: int) -> int:
        """Elements of ``scale_dtype`` per token."""
        raise NotImplementedError

    def payload_nbytes(self, hidden: int) -> int:
        return self.payload_numel(hidden) * self.payload_dtype.itemsize

    def scale_nbytes(self, hidden: int) -> int:
        return self.scale_numel(hidden) * self.scale_dtype.itemsize

    def check_hidden(self, hidden: int) -> None:
        if not isinstance(hidden, int) or isinstance(hidden, bool):
            raise TypeError(f"hidden must be an int, got {type(hidden).__name__}")
        if hidden <= 0 or hidden % self.block:
            raise ValueError(
                f"format {self.name!r} needs hidden to be a positive multiple of its block "
                f"{self.block}, got hidden={hidden}"
            )

    def quantize(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``x [T, H]`` -> (payload ``[T, payload_numel]``, scales ``[T, scale_numel]``),
        in ``payload_dtype`` / ``scale_dtype``."""
        raise NotImplementedError

    def dequantize(
        self, payload: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """(payload, scales) as returned by :meth:`quantize` -> ``[T, H]`` of ``dtype``."""
        raise NotImplementedError

    def quantize_row_scaled(
        self, x_TH: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Formats with a global scale, for the combine codec: quantize with a dynamic
        global scale ``g_t`` per row -> ``(payload, scales, g [T, 1] fp32)``."""
        raise NotImplementedError(f"format {self.name!r} has no global scale")

    def dequantize_row_scaled(
        self, payload: torch.Tensor, scales: torch.Tensor, g_T1: torch.Tensor
    ) -> torch.Tensor:
        """Inverse of :meth:`quantize_row_scaled`: fp32 ``[T, H]``."""
        raise NotImplementedError(f"format {self.name!r} has no global scale")


_REGISTRY: dict[str, type[WireFormat]] = {}


def register(cls: type[WireFormat]) -> type[WireFormat]:
    _REGISTRY[cls.name] = cls
    return cls


def quoted_names(flag: str) -> str:
    """The registered formats with class attribute ``flag`` set, quoted (``'nvfp4'``)."""
    return " or ".join(repr(n) for n, c in _REGISTRY.items() if getattr(c, flag))


def format_class(name: str) -> type[WireFormat]:
    if not isinstance(name, str):
        raise TypeError(f"format must be a str, got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; known formats: {sorted(_REGISTRY)}") from None
