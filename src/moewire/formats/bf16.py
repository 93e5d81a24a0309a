"""``bf16``: the unquantized baseline.

Bit layout: payload = ``H`` bf16 values (``2H`` bytes, little-endian), no scales.
fp32 input is rounded to bf16 to nearest even; bf16 input travels bit for bit, except that
every NaN is written as the canonical quiet NaN ``0x7FC0`` (rows stay byte-deterministic
across devices, whose conversions produce different NaN bit patterns).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moewire.constants import Kind
from moewire.formats.base import WireFormat, register
from moewire.formats.elements import canonical_nan


@register
@dataclass(frozen=True)
class BF16Format(WireFormat):
    name = "bf16"
    block = 1
    payload_dtype = torch.bfloat16
    scale_dtype = torch.uint8
    kind = Kind.BF16

    def scale_numel(self, hidden: int) -> int:
        return 0

    def quantize(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        payload = canonical_nan(x_TH.to(torch.bfloat16))
        return payload, payload.new_empty((x_TH.shape[0], 0), dtype=torch.uint8)

    def dequantize(
        self, payload: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        return payload.to(dtype)
