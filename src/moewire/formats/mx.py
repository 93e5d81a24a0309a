"""``mxfp8`` and ``mxfp4``: OCP MX blocks of 32 values with a shared e8m0 scale.

Bit layout: payload = ``H`` e4m3 bytes (``mxfp8``) or ``H/2`` bytes of packed e2m1 codes,
element ``2j`` in the low nibble (``mxfp4``); scales = ``H/32`` e8m0 bytes.

Per block: ``E`` is the smallest integer with ``amax <= M * 2**E`` (``M`` = 448 for e4m3,
6 for e2m1), computed exactly; scale byte ``b = clamp(E + 127, 0, 254)``;
``v_i = x_i * 2**-(b-127)`` (an exact power-of-two scaling), encoded as the element.
An all-zero block has ``b = 0``. A block holding a NaN or Inf has ``b = 0xFF`` and zero codes,
so it dequantizes to NaN. Dequantized value: ``elem(q_i) * 2**(b-127)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moewire.constants import E2M1_MAX, E4M3_MAX, E8M0_BIAS, E8M0_NAN_BYTE, MX_BLOCK, Kind
from moewire.formats.base import WireFormat, register
from moewire.formats.elements import (
    decode_e2m1,
    decode_e4m3,
    decode_e8m0,
    encode_e2m1,
    encode_e4m3,
    exp2i,
    mx_scale_byte,
    pack_e2m1,
    unpack_e2m1,
)


def _mx_quantize(x_TH: torch.Tensor, elem_max: float, fp4: bool):
    t, h = x_TH.shape
    x = x_TH.reshape(t, h // MX_BLOCK, MX_BLOCK)
    amax = x.abs().amax(dim=-1, keepdim=True)
    bad = ~torch.isfinite(amax)  # a NaN or an Inf anywhere in the block
    b = mx_scale_byte(torch.where(bad, 0.0, amax), elem_max)
    v = x * exp2i(E8M0_BIAS - b.to(torch.int32))
    codes = encode_e2m1(v) if fp4 else encode_e4m3(v)
    codes = torch.where(bad, 0, codes).reshape(t, h)
    b = torch.where(bad, E8M0_NAN_BYTE, b).reshape(t, h // MX_BLOCK)
    return (pack_e2m1(codes) if fp4 else codes.view(torch.float8_e4m3fn)), b


def _mx_dequantize(payload, scales, dtype, fp4: bool):
    t = payload.shape[0]
    vals = decode_e2m1(unpack_e2m1(payload)) if fp4 else decode_e4m3(payload)
    nb = scales.shape[1]
    v = vals.reshape(t, nb, MX_BLOCK) * decode_e8m0(scales).reshape(t, nb, 1)
    return v.reshape(t, nb * MX_BLOCK).to(dtype)


@register
@dataclass(frozen=True)
class MXFP8Format(WireFormat):
    name = "mxfp8"
    block = MX_BLOCK
    payload_dtype = torch.float8_e4m3fn
    scale_dtype = torch.uint8
    kind = Kind.MXFP8

    def scale_numel(self, hidden: int) -> int:
        return hidden // MX_BLOCK

    def quantize(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _mx_quantize(x_TH, E4M3_MAX, fp4=False)

    def dequantize(
        self, payload: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        return _mx_dequantize(payload, scales, dtype, fp4=False)


@register
@dataclass(frozen=True)
class MXFP4Format(WireFormat):
    name = "mxfp4"
    block = MX_BLOCK
    payload_dtype = torch.uint8
    scale_dtype = torch.uint8
    packed = True
    kind = Kind.MXFP4

    def scale_numel(self, hidden: int) -> int:
        return hidden // MX_BLOCK

    def quantize(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _mx_quantize(x_TH, E2M1_MAX, fp4=True)

    def dequantize(
        self, payload: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        return _mx_dequantize(payload, scales, dtype, fp4=True)
