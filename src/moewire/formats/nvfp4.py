"""``nvfp4``: e2m1 values in blocks of 16 with a linear e4m3 block scale and a static fp32
global scale ``g`` (the format of vLLM PR 30014, the input of the NVFP4 MoE kernels).

Bit layout: payload = ``H/2`` bytes of packed e2m1 codes, element ``2j`` in the low nibble;
scales = ``H/16`` e4m3 bytes, row-major ``[T, H/16]`` (linear, so rows of several ranks can
be concatenated; :func:`swizzle_128x4` makes the kernels' layout after the gather).

Per block of 16, all fp32 with round-to-nearest-even, in this order:
``vmax = amax(x)``; ``s = g * (vmax * fp32(1/6))``; ``S = e4m3(min(s, 448))``;
``out = 0 if S == 0 else 1 / (S * (1/g))``; ``q_i = e2m1(x_i * out)``.
Dequantized value: ``(e2m1(q_i) * S) * (1/g)``. A block holding a NaN or Inf stores
``S = 0x7F`` (NaN) and zero codes, so it dequantizes to NaN.

The combine codec (``combine.py``) uses the same recipe with a dynamic global scale per
row, ``g_t = 2688 / max(amax_t, 1e-4)``, stored in the row
(:meth:`NVFP4Format.quantize_row_scaled`).

Known differences from FlashInfer's / vLLM's CUDA quantizer: they use an approximate
reciprocal (``rcp.approx.ftz``) for ``1/6`` products and for ``out``, so a code can differ at
an exact rounding tie, and FlashInfer tests ``vmax == 0`` instead of ``S == 0`` for ``out``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from moewire.constants import (
    COMBINE_NVFP4_AMAX_FLOOR,
    E4M3_MAX,
    E4M3_NAN_BYTE,
    NVFP4_BLOCK,
    NVFP4_GLOBAL_NUMERATOR,
    RCP6_BITS,
    SWIZZLE_COLS,
    SWIZZLE_ROWS,
    Kind,
    ceil_div,
)
from moewire.formats.base import WireFormat, register
from moewire.formats.elements import (
    canonical_nan,
    decode_e2m1,
    decode_e4m3,
    div_rn,
    encode_e2m1,
    encode_e4m3,
    pack_e2m1,
    unpack_e2m1,
)

RCP6 = float(np.array([RCP6_BITS], dtype=np.uint32).view(np.float32)[0])


def check_global_scale(global_scale: object, name: str = "global_scale") -> float:
    """Validate an nvfp4 global scale and return it as the (exact) value of an fp32."""
    if isinstance(global_scale, torch.Tensor):
        if global_scale.numel() != 1:
            raise ValueError(
                f"{name} must be a scalar, got a tensor of shape {tuple(global_scale.shape)}"
            )
        global_scale = global_scale.detach().float().cpu().item()
    if isinstance(global_scale, bool) or not isinstance(global_scale, (int, float, np.floating)):
        raise TypeError(f"{name} must be a float or a 1-element tensor, got {global_scale!r}")
    g = _fp32(global_scale)
    if not math.isfinite(g) or g <= 0 or not math.isfinite(_fp32(1.0 / g)):
        raise ValueError(
            f"{name} must be finite and > 0, an fp32 whose reciprocal is finite too "
            f"(about 2.9e-39 to 3.4e38), got {global_scale!r}"
        )
    return g


def _fp32(value: float) -> float:
    """``value`` rounded to fp32 (inf or 0 where it does not fit), without numpy's warning."""
    with np.errstate(over="ignore", under="ignore"):
        return float(np.float32(value))


def nvfp4_global_scale(amax: float | torch.Tensor) -> float:
    """Calibrated nvfp4 global scale ``g = 448 * 6 / amax`` (fp32), from the largest
    activation magnitude seen in calibration.

    ``amax``: a positive finite float, or a tensor of calibration activations (its absolute
    maximum is used). Use the same ``g`` on every rank (it is never sent).
    """
    if isinstance(amax, torch.Tensor):
        if amax.numel() == 0:
            raise ValueError("amax: calibration tensor is empty")
        if not amax.is_floating_point():
            raise TypeError(f"amax must be a floating tensor, got dtype {amax.dtype}")
        amax = amax.detach().abs().amax().float().cpu().item()
    if isinstance(amax, bool) or not isinstance(amax, (int, float, np.floating)):
        raise TypeError(f"amax must be a float or a tensor, got {amax!r}")
    if not math.isfinite(amax) or amax <= 0:
        raise ValueError(f"amax must be finite and > 0, got {amax!r}")
    a = _fp32(amax)
    with np.errstate(over="ignore", divide="ignore"):
        g = float(np.float32(NVFP4_GLOBAL_NUMERATOR) / np.float32(a))
    if not (math.isfinite(g) and g > 0 and math.isfinite(a) and a > 0):
        raise ValueError(
            f"amax={amax!r} gives no usable fp32 global scale 448*6/amax (got {g!r}); "
            "amax must be within about 7.9e-36 to 3.4e38"
        )
    return check_global_scale(g, "the global scale 448*6/amax")


def _quantize_blocks(
    x_TH: torch.Tensor, g: torch.Tensor, inv_g: torch.Tensor, bad_T11: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-5 per block of 16 with fp32 ``g`` and ``inv_g = 1/g`` (0-dim, or ``[T, 1, 1]``
    per row): fp32 ``x [T, H]`` -> (packed codes uint8 ``[T, H/2]``, e4m3 scales
    ``[T, H/16]``). Non-finite blocks (and rows marked in ``bad_T11``): ``S = 0x7F``, zero codes."""
    t, h = x_TH.shape
    x = x_TH.reshape(t, h // NVFP4_BLOCK, NVFP4_BLOCK)
    vmax = x.abs().amax(dim=-1, keepdim=True)
    bad = ~torch.isfinite(vmax)
    if bad_T11 is not None:
        bad = bad | bad_T11
    rcp6 = torch.tensor(RCP6, dtype=torch.float32, device=x.device)
    s = g * (vmax * rcp6)
    s_byte = encode_e4m3(torch.clamp(s, max=E4M3_MAX))
    s_val = decode_e4m3(s_byte)
    out = torch.where(s_val == 0, 0.0, div_rn(1.0, s_val * inv_g, like=s_val))
    codes = encode_e2m1(x * out)
    codes = torch.where(bad, 0, codes).reshape(t, h)
    s_byte = torch.where(bad, E4M3_NAN_BYTE, s_byte).reshape(t, h // NVFP4_BLOCK)
    return pack_e2m1(codes), s_byte.view(torch.float8_e4m3fn)


def _dequantize_blocks(
    payload: torch.Tensor, scales: torch.Tensor, inv_g: torch.Tensor
) -> torch.Tensor:
    """``(e2m1 * S) * inv_g`` per block (``inv_g`` 0-dim, or ``[T, 1, 1]``): fp32 ``[T, H]``."""
    t = payload.shape[0]
    nb = scales.shape[1]
    vals = decode_e2m1(unpack_e2m1(payload)).reshape(t, nb, NVFP4_BLOCK)
    v = (vals * decode_e4m3(scales).reshape(t, nb, 1)) * inv_g
    return v.reshape(t, nb * NVFP4_BLOCK)


@register
@dataclass(frozen=True)
class NVFP4Format(WireFormat):
    name = "nvfp4"
    block = NVFP4_BLOCK
    payload_dtype = torch.uint8
    scale_dtype = torch.float8_e4m3fn
    packed = True
    kind = Kind.NVFP4
    needs_global_scale = True
    row_scaled_kind = Kind.NVFP4_DYN
    swizzles_scales = True
    #: Static global scale ``g`` (quantize direction), an fp32 value.
    global_scale: float = 1.0

    @classmethod
    def make(cls, global_scale: object = None) -> NVFP4Format:
        if global_scale is None:
            raise ValueError(
                "format 'nvfp4' needs a static global_scale g = 448*6/amax "
                "(moewire.nvfp4_global_scale(calibration_amax)); got None"
            )
        return cls(global_scale=check_global_scale(global_scale))

    def scale_numel(self, hidden: int) -> int:
        return hidden // NVFP4_BLOCK

    @property
    def inv_global_scale(self) -> float:
        """fp32 ``1/g``, correctly rounded."""
        return float(np.float32(1.0) / np.float32(self.global_scale))

    def quantize(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.tensor(self.global_scale, dtype=torch.float32, device=x_TH.device)
        inv_g = torch.tensor(self.inv_global_scale, dtype=torch.float32, device=x_TH.device)
        return _quantize_blocks(x_TH, g, inv_g)

    def dequantize(
        self, payload: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        inv_g = torch.tensor(self.inv_global_scale, dtype=torch.float32, device=payload.device)
        return _dequantize_blocks(payload, scales, inv_g).to(dtype)

    def quantize_row_scaled(
        self, x_TH: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The combine codec's nvfp4: per row ``g_t = 2688 / max(amax_t, 1e-4)`` (correctly
        rounded), then the recipe above with ``g = g_t`` (the static ``g`` is not used). A
        row with a NaN or Inf stores ``g_t`` = NaN (``0x7FC00000``), ``S = 0x7F`` and zero
        codes in every block.

        Args:
            x_TH: fp32 ``[T, H]``, ``H`` a multiple of 16.

        Returns:
            ``(payload uint8 [T, H/2], scales float8_e4m3fn [T, H/16], g fp32 [T, 1])``.
        """
        amax_T1 = x_TH.abs().amax(dim=1, keepdim=True)
        bad_T1 = ~torch.isfinite(amax_T1)
        floor = torch.tensor(COMBINE_NVFP4_AMAX_FLOOR, dtype=torch.float32, device=x_TH.device)
        a_T1 = torch.maximum(torch.where(bad_T1, 1.0, amax_T1), floor)
        g_T1 = div_rn(NVFP4_GLOBAL_NUMERATOR, a_T1, like=a_T1)
        inv_g_T1 = div_rn(1.0, g_T1, like=g_T1)
        payload, scales = _quantize_blocks(
            x_TH, g_T1[:, :, None], inv_g_T1[:, :, None], bad_T1[:, :, None]
        )
        return payload, scales, canonical_nan(torch.where(bad_T1, torch.nan, g_T1))

    def dequantize_row_scaled(
        self, payload: torch.Tensor, scales: torch.Tensor, g_T1: torch.Tensor
    ) -> torch.Tensor:
        """Inverse of :meth:`quantize_row_scaled`: fp32 ``[T, H]``, ``(e2m1*S) * (1/g_t)``."""
        g_T1 = g_T1.float()
        inv_g_T1 = div_rn(1.0, g_T1, like=g_T1)
        return _dequantize_blocks(payload, scales, inv_g_T1[:, :, None])


def _as_scale_bytes(scales: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(scales, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(scales).__name__}")
    if scales.dtype == torch.float8_e4m3fn:
        return scales.view(torch.uint8)
    if scales.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8 or float8_e4m3fn, got {scales.dtype}")
    return scales


def swizzle_128x4(scales_TB: torch.Tensor) -> torch.Tensor:
    """Linear nvfp4 block scales ``[T, B]`` -> the 128x4 swizzled layout of the NVFP4 GEMMs.

    ``scales_TB``: uint8 or float8_e4m3fn ``[T, B]`` (``B = H/16``), e.g.
    ``spec.unpack(rows).scales`` of gathered rows. Returns a contiguous ``[Mp, Kp]`` tensor
    of the same dtype with
    ``Mp = ceil(T/128)*128``, ``Kp = ceil(B/4)*4``, zero-padded, whose flat memory holds
    ``(m, b)`` at ``(m//128)*(Kp/4)*512 + (b//4)*512 + (m%32)*16 + ((m//32)%4)*4 + (b%4)``.
    """
    raw = _as_scale_bytes(scales_TB, "scales_TB")
    if raw.dim() != 2:
        raise ValueError(f"scales_TB must be 2-D [T, B], got shape {tuple(raw.shape)}")
    t, b = raw.shape
    mp = ceil_div(t, SWIZZLE_ROWS) * SWIZZLE_ROWS
    kp = ceil_div(b, SWIZZLE_COLS) * SWIZZLE_COLS
    padded = raw.new_zeros(mp, kp)
    padded[:t, :b] = raw
    # (m, b) = (i*128 + a*32 + r, j*4 + c) -> order (i, j, r, a, c)
    tiles = padded.view(mp // 128, 4, 32, kp // 4, 4).permute(0, 3, 2, 1, 4)
    out = tiles.contiguous().view(mp, kp)
    return out.view(scales_TB.dtype)


def unswizzle_128x4(swizzled: torch.Tensor, num_tokens: int, num_blocks: int) -> torch.Tensor:
    """Inverse of :func:`swizzle_128x4`: ``[Mp, Kp]`` (or flat) swizzled -> ``[T, B]`` linear."""
    raw = _as_scale_bytes(swizzled, "swizzled")
    mp = ceil_div(num_tokens, SWIZZLE_ROWS) * SWIZZLE_ROWS
    kp = ceil_div(num_blocks, SWIZZLE_COLS) * SWIZZLE_COLS
    if raw.numel() != mp * kp:
        raise ValueError(
            f"swizzled has {raw.numel()} elements, expected Mp*Kp = {mp}*{kp} for "
            f"num_tokens={num_tokens}, num_blocks={num_blocks}"
        )
    tiles = raw.reshape(mp // 128, kp // 4, 32, 4, 4).permute(0, 3, 2, 1, 4)
    out = tiles.contiguous().view(mp, kp)[:num_tokens, :num_blocks].contiguous()
    return out.view(swizzled.dtype)
