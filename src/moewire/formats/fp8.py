"""``fp8`` and ``fp8_block128``: e4m3 payload with DeepSeek-style dynamic fp32 scales.

Bit layout: payload = ``H`` e4m3 bytes; scales = one little-endian fp32 per token (``fp8``)
or per 128 consecutive values (``fp8_block128``, ``H/128`` of them).

Per token / block: ``a = max(amax(x), 1e-4)``, ``k = 448 / a`` (correctly rounded),
``q_i = e4m3(clamp(x_i * k, -448, 448))``, stored scale ``s = a / 448``.
Dequantized value: ``e4m3(q_i) * s``. A NaN makes ``a`` NaN, so the whole token/block
dequantizes to NaN (its scale is written as the canonical quiet NaN ``0x7FC00000``);
an Inf makes ``s`` Inf and every value NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moewire.constants import E4M3_MAX, FP8_AMAX_FLOOR, FP8_BLOCK128, Kind
from moewire.formats.base import WireFormat, register
from moewire.formats.elements import canonical_nan, decode_e4m3, div_rn, encode_e4m3


def _quantize_blocks(x_TH: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    t, h = x_TH.shape
    x = x_TH.reshape(t, h // block, block)
    amax = x.abs().amax(dim=-1, keepdim=True)
    a = torch.maximum(amax, torch.tensor(FP8_AMAX_FLOOR, dtype=torch.float32, device=x.device))
    k = div_rn(E4M3_MAX, a, like=a)
    q = encode_e4m3(x * k).reshape(t, h).view(torch.float8_e4m3fn)
    return q, canonical_nan(div_rn(a, E4M3_MAX, like=a)).reshape(t, h // block)


def _dequantize_blocks(
    payload: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    t, h = payload.shape
    nb = scales.shape[1]
    v = decode_e4m3(payload).reshape(t, nb, h // nb) * scales.reshape(t, nb, 1)
    return v.reshape(t, h).to(dtype)


@register
@dataclass(frozen=True)
class FP8Format(WireFormat):
    name = "fp8"
    block = 1
    payload_dtype = torch.float8_e4m3fn
    scale_dtype = torch.float32
    kind = Kind.FP8
    rowwise_fp8 = True

    def scale_numel(self, hidden: int) -> int:
        return 1

    def quantize(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _quantize_blocks(x_TH, x_TH.shape[1])

    def dequantize(
        self, payload: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        return _dequantize_blocks(payload, scales, dtype)


@register
@dataclass(frozen=True)
class FP8Block128Format(WireFormat):
    name = "fp8_block128"
    block = FP8_BLOCK128
    payload_dtype = torch.float8_e4m3fn
    scale_dtype = torch.float32
    kind = Kind.FP8
    block128_fp8 = True

    def scale_numel(self, hidden: int) -> int:
        return hidden // FP8_BLOCK128

    def quantize(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _quantize_blocks(x_TH, FP8_BLOCK128)

    def dequantize(
        self, payload: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        return _dequantize_blocks(payload, scales, dtype)
