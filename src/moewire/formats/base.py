"""The interface every wire format implements, and the format registry.

A format turns one token's activations ``x [H]`` into a payload and block scales and back.
It knows nothing about rows, extras or devices: :class:`moewire.WireSpec` lays the two
sections into a row of bytes (see ``spec.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


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


_REGISTRY: dict[str, type[WireFormat]] = {}


def register(cls: type[WireFormat]) -> type[WireFormat]:
    _REGISTRY[cls.name] = cls
    return cls


def format_class(name: str) -> type[WireFormat]:
    if not isinstance(name, str):
        raise TypeError(f"format must be a str, got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; known formats: {sorted(_REGISTRY)}") from None
