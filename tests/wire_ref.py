"""An independent numpy implementation of WIRE_FORMATS.md, written from the page and not
from ``moewire.formats``: element codes by nearest-value search (ties to the even code),
e4m3 through ml_dtypes, MX exponents by an exact search instead of frexp, and every fp32
step in numpy float32 (IEEE, round to nearest even). Slow but obvious; tests compare the
library's bytes against it.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

F32 = np.float32
E2M1_MAG = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def e2m1_code(v: np.ndarray) -> np.ndarray:
    """float32 array -> codes 0..15 (nearest magnitude, ties to even code, saturate at 6)."""
    a = np.minimum(np.abs(v.astype(np.float64)), 6.0)
    d = np.abs(a[..., None] - E2M1_MAG)  # exact in float64
    best = d.min(axis=-1, keepdims=True)
    tie = d == best
    # among tied codes prefer the even one (there are at most two, adjacent)
    even = np.where(tie & (np.arange(8) % 2 == 0), 1, 0)
    code = np.where(even.any(axis=-1), even.argmax(axis=-1), tie.argmax(axis=-1))
    return (code | (np.signbit(v).astype(np.int64) << 3)).astype(np.uint8)


def e2m1_value(code: np.ndarray) -> np.ndarray:
    mag = E2M1_MAG[code & 7].astype(np.float32)
    return np.where(code & 8, -mag, mag).astype(np.float32)


def e4m3_byte(v: np.ndarray) -> np.ndarray:
    c = np.clip(v.astype(np.float32), F32(-448), F32(448))
    b = c.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    return np.where(np.isnan(v), np.uint8(0x7F), b).astype(np.uint8)


def e4m3_value(b: np.ndarray) -> np.ndarray:
    return b.astype(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(b: np.ndarray) -> np.ndarray:
    out = np.empty((*b.shape[:-1], b.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = b & 0xF
    out[..., 1::2] = b >> 4
    return out


def mx_exponent(amax: float, m: float) -> int:
    """Smallest integer E with amax <= m * 2**E (amax > 0, finite), by exact search."""
    e = int(np.floor(np.log2(amax / m)))
    while amax <= m * 2.0 ** (e - 1):  # float64: m * 2**e is exact here
        e -= 1
    while amax > m * 2.0**e:
        e += 1
    return e


def pow2_f32(k: int) -> np.float32:
    return np.float32(np.ldexp(1.0, k))  # exact for k in [-149, 127]


def quantize(fmt: str, x: np.ndarray, g: float | None = None):
    """x float32 [T, H] -> (payload bytes [T, P], scale bytes [T, Sb])."""
    x = x.astype(np.float32)
    t, h = x.shape
    if fmt == "bf16":
        # NaN bits are not fixed by the page; moewire writes the canonical quiet NaN 0x7FC0.
        b = x.astype(ml_dtypes.bfloat16).view(np.uint16)
        b = np.where(np.isnan(x), np.uint16(0x7FC0), b).astype(np.uint16)
        return b.view(np.uint8).reshape(t, 2 * h), np.zeros((t, 0), np.uint8)
    if fmt in ("fp8", "fp8_block128"):
        blk = h if fmt == "fp8" else 128
        xb = x.reshape(t, h // blk, blk)
        amax = np.abs(xb).max(axis=-1, keepdims=True)  # NaN propagates
        a = np.where(np.isnan(amax), np.float32(np.nan), np.maximum(amax, F32(1e-4)))
        a = a.astype(np.float32)
        with np.errstate(all="ignore"):
            k = (F32(448) / a).astype(np.float32)
            q = e4m3_byte((xb * k).astype(np.float32))
            s = (a / F32(448)).astype(np.float32)
            # a NaN scale is written as the canonical quiet NaN 0x7FC00000 (moewire's choice)
            s = np.where(np.isnan(s), np.uint32(0x7FC00000).view(np.float32), s)
        return q.reshape(t, h), s.reshape(t, h // blk).view(np.uint8).reshape(t, -1)
    if fmt in ("mxfp8", "mxfp4"):
        m = 448.0 if fmt == "mxfp8" else 6.0
        xb = x.reshape(t, h // 32, 32)
        codes = np.zeros(xb.shape, np.uint8)
        sb = np.zeros((t, h // 32), np.uint8)
        for i in range(t):
            for j in range(h // 32):
                blk = xb[i, j]
                if not np.all(np.isfinite(blk)):
                    sb[i, j] = 0xFF
                    continue
                amax = float(np.abs(blk).max())
                b = 0 if amax == 0 else min(max(mx_exponent(amax, m) + 127, 0), 254)
                sb[i, j] = b
                with np.errstate(all="ignore"):
                    v = (blk * pow2_f32(127 - b)).astype(np.float32)
                codes[i, j] = e4m3_byte(v) if fmt == "mxfp8" else e2m1_code(v)
        codes = codes.reshape(t, h)
        return (codes if fmt == "mxfp8" else pack_nibbles(codes)), sb
    if fmt == "nvfp4":
        g32 = F32(g)
        inv_g = F32(1) / g32
        rcp6 = F32(1) / F32(6)
        xb = x.reshape(t, h // 16, 16)
        codes = np.zeros(xb.shape, np.uint8)
        sb = np.zeros((t, h // 16), np.uint8)
        for i in range(t):
            for j in range(h // 16):
                blk = xb[i, j]
                if not np.all(np.isfinite(blk)):
                    sb[i, j] = 0x7F
                    continue
                with np.errstate(all="ignore"):
                    vmax = F32(np.abs(blk).max())
                    s = g32 * (vmax * rcp6)
                    sbyte = e4m3_byte(np.array([min(s, F32(448))], np.float32))[0]
                    sv = e4m3_value(np.array([sbyte]))[0]
                    out = F32(0) if sv == 0 else F32(1) / (sv * inv_g)
                    codes[i, j] = e2m1_code((blk * out).astype(np.float32))
                sb[i, j] = sbyte
        return pack_nibbles(codes.reshape(t, h)), sb
    raise ValueError(fmt)


def dequantize(fmt: str, payload: np.ndarray, scales: np.ndarray, h: int, g=None):
    """-> float32 [T, H] (before the cast to the output dtype)."""
    t = payload.shape[0]
    with np.errstate(all="ignore"):
        if fmt == "bf16":
            return payload.view(ml_dtypes.bfloat16).astype(np.float32).reshape(t, h)
        if fmt in ("fp8", "fp8_block128"):
            s = scales.copy().view(np.float32).reshape(t, -1)
            nb = s.shape[1]
            v = e4m3_value(payload).reshape(t, nb, h // nb) * s[..., None]
            return v.astype(np.float32).reshape(t, h)
        if fmt in ("mxfp8", "mxfp4"):
            vals = e4m3_value(payload) if fmt == "mxfp8" else e2m1_value(unpack_nibbles(payload))
            p = np.array([pow2_f32(int(b) - 127) for b in scales.reshape(-1)], np.float32)
            p = np.where(scales.reshape(-1) == 0xFF, np.float32(np.nan), p).reshape(t, h // 32)
            return (vals.reshape(t, h // 32, 32) * p[..., None]).astype(np.float32).reshape(t, h)
        if fmt == "nvfp4":
            inv_g = F32(1) / F32(g)
            vals = e2m1_value(unpack_nibbles(payload)).reshape(t, h // 16, 16)
            s = e4m3_value(scales).reshape(t, h // 16, 1)
            return ((vals * s).astype(np.float32) * inv_g).astype(np.float32).reshape(t, h)
    raise ValueError(fmt)


def row(fmt: str, x: np.ndarray, g=None, extras: list[np.ndarray] = ()) -> np.ndarray:
    """Full rows per WIRE_FORMATS.md "The row": sections at 16-byte offsets, zero padding."""
    payload, scales = quantize(fmt, x, g)
    parts = [payload, scales, *[e.view(np.uint8).reshape(x.shape[0], -1) for e in extras]]
    t = x.shape[0]
    out_parts = []
    for p in parts:
        pad = (-p.shape[1]) % 16
        out_parts.append(np.concatenate([p, np.zeros((t, pad), np.uint8)], axis=1))
    r = np.concatenate(out_parts, axis=1)
    if r.shape[1] == 0:
        r = np.zeros((t, 16), np.uint8)
    return r
