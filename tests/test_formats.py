"""Tier a: every wire format against an independent implementation of WIRE_FORMATS.md,
round trips, accuracy floors, row locality, non-finite inputs and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moewire as mw
import wire_ref
from adversarial_data import adversarial
from moewire.testing.data import gaussian, heavy_tailed, sqnr_db

G = 2688.0 / 5.0  # an nvfp4 global scale calibrated for amax ~ 5
BLOCK = {"bf16": 16, "fp8": 16, "fp8_block128": 128, "mxfp8": 32, "nvfp4": 16, "mxfp4": 32}
EXTRAS = {
    "router_logits": (torch.float32, 8),
    "topk_ids": (torch.int32, 2),
    "odd": (torch.bfloat16, 3),  # 6 bytes: forces padding after it
}


def make_spec(fmt: str, hidden: int, extras=None, g: float = G) -> mw.WireSpec:
    return mw.WireSpec(fmt, hidden, global_scale=g if fmt == "nvfp4" else None, extras=extras)


def make_extras(t: int) -> dict[str, torch.Tensor]:
    return {
        "router_logits": torch.randn(t, 8),
        "topk_ids": torch.randint(-(2**31), 2**31 - 1, (t, 2), dtype=torch.int32),
        "odd": torch.randn(t, 3).to(torch.bfloat16),
    }


def nan_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise-value equality where NaN == NaN (and +0 != -0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    an, bn = torch.isnan(a), torch.isnan(b)
    same = (a == b) & (torch.signbit(a) == torch.signbit(b))
    return bool(torch.equal(an, bn) and (same | an).all())


DATASETS = {"gaussian": gaussian, "heavy": heavy_tailed}


@pytest.mark.parametrize("fmt", mw.FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("data", ["gaussian", "heavy", "adversarial"])
def test_bytes_match_independent_reference(fmt, dtype, data):
    t, h = 23, 256
    adv = data == "adversarial"
    x = adversarial(t, h, block=BLOCK[fmt]) if adv else DATASETS[data](t, h) * 3
    x = x.to(dtype)
    g = 2.0**9 if adv else G  # power of two: nvfp4 ties stay exact
    spec = make_spec(fmt, h, EXTRAS, g=g)
    extras = make_extras(t)
    rows = spec.pack(x, **extras)
    ref = wire_ref.row(
        fmt, x.float().numpy(), g, [extras[k].view(torch.uint8).numpy() for k in EXTRAS]
    )
    assert rows.shape == (t, spec.row_bytes) == ref.shape
    np.testing.assert_array_equal(rows.numpy(), ref)

    for out_dtype in (torch.float32, torch.bfloat16):
        deq = spec.dequantize(rows, out_dtype)
        view = spec.unpack(rows)
        p = view.payload.contiguous().view(torch.uint8).numpy()
        s = view.scales.contiguous().view(torch.uint8).numpy()
        ref_f32 = torch.from_numpy(wire_ref.dequantize(fmt, p, s, h, g))
        assert nan_equal(deq, ref_f32.to(out_dtype))


@pytest.mark.parametrize("fmt", mw.FORMATS)
def test_bytes_match_reference_at_deepseek_hidden(fmt):
    x = heavy_tailed(3, 7168).to(torch.bfloat16)
    spec = make_spec(fmt, 7168)
    np.testing.assert_array_equal(spec.pack(x).numpy(), wire_ref.row(fmt, x.float().numpy(), G))


@pytest.mark.parametrize(
    ("fmt", "row_bytes"),
    [
        ("bf16", 14336),
        ("fp8", 7184),
        ("fp8_block128", 7392),
        ("mxfp8", 7392),
        ("nvfp4", 4032),
        ("mxfp4", 3808),
    ],
)
def test_row_bytes_per_wire_formats_table(fmt, row_bytes):
    assert make_spec(fmt, 7168).row_bytes == row_bytes


def test_deepseek_r1_row_examples():
    logits = {"router_logits": (torch.float32, 256)}
    topk = {"topk_ids": (torch.int32, 8), "topk_weights": (torch.float32, 8)}
    assert make_spec("bf16", 7168, logits).row_bytes == 15360
    assert make_spec("nvfp4", 7168, logits).row_bytes == 5056
    assert make_spec("nvfp4", 7168, topk).row_bytes == 4096
    assert make_spec("fp8", 7168, topk).row_bytes == 7248


@pytest.mark.parametrize("fmt", mw.FORMATS)
def test_layout_offsets_aligned_and_padding_zero(fmt):
    spec = make_spec(fmt, 384, EXTRAS)
    assert spec.row_bytes % 16 == 0
    covered = torch.zeros(spec.row_bytes, dtype=torch.bool)
    for sec in spec.sections.values():
        assert sec.offset % 16 == 0, sec
        covered[sec.offset : sec.end] = True
    # poison a destination buffer and check every padding byte is written as zero
    x = heavy_tailed(9, 384)
    out = torch.full((9, spec.row_bytes), 0xAB, dtype=torch.uint8)
    spec.pack(x, out=out, **make_extras(9))
    assert (out[:, ~covered] == 0).all()


@pytest.mark.parametrize("fmt", mw.FORMATS)
def test_round_trip_views_and_pack_quantized(fmt):
    t, h = 17, 512
    spec = make_spec(fmt, h, EXTRAS)
    x = gaussian(t, h)
    extras = make_extras(t)
    rows = spec.pack(x, **extras)
    view = spec.unpack(rows)
    base = rows.data_ptr()
    for name, v in [("payload", view.payload), ("scales", view.scales), *view.extras.items()]:
        sec = spec.sections[name]
        assert v.dtype == sec.dtype and v.shape == (t, sec.numel), name
        if v.numel():
            assert v.data_ptr() == base + sec.offset, f"{name} is not a view into rows"
    for name, value in extras.items():
        assert torch.equal(view.extras[name], value)
    payload, scales = spec.quantize(x)
    assert torch.equal(spec.pack_quantized(payload, scales, **extras), rows)
    assert torch.equal(
        spec.pack_quantized(payload.view(torch.uint8), scales.view(torch.uint8), **extras), rows
    )
    # out= into a slice of a bigger buffer (this rank's slot of a gather buffer)
    big = torch.full((3 * t, spec.row_bytes), 0x5A, dtype=torch.uint8)
    slot = big[t : 2 * t]
    assert spec.pack(x, out=slot, **extras).data_ptr() == slot.data_ptr()
    assert torch.equal(big[t : 2 * t], rows)
    assert (big[:t] == 0x5A).all() and (big[2 * t :] == 0x5A).all()


# Measured on Gaussian data, 64 x 7168, fp32 input (2026-11-28, this machine): bf16 ~52.9,
# fp8 ~31.5, fp8_block128 ~31.8, mxfp8 ~31.5, nvfp4 ~20.4, mxfp4 ~18.7 dB. Floors sit just under.
SQNR_FLOOR_DB = {
    "bf16": 50.0,
    "fp8": 30.5,
    "fp8_block128": 30.8,
    "mxfp8": 30.5,
    "nvfp4": 19.5,
    "mxfp4": 17.8,
}


@pytest.mark.parametrize("fmt", mw.FORMATS)
def test_sqnr_floor_gaussian(fmt):
    x = gaussian(64, 7168)
    spec = make_spec(fmt, 7168, g=mw.nvfp4_global_scale(x))
    got = sqnr_db(x, spec.dequantize(spec.pack(x), torch.float32))
    assert got >= SQNR_FLOOR_DB[fmt], f"{fmt}: {got:.2f} dB < floor {SQNR_FLOOR_DB[fmt]}"


def test_bf16_input_is_exact_in_bf16_format():
    x = heavy_tailed(8, 256).to(torch.bfloat16)
    spec = make_spec("bf16", 256)
    assert torch.equal(spec.dequantize(spec.pack(x), torch.bfloat16), x)


@pytest.mark.parametrize("fmt", mw.FORMATS)
@settings(max_examples=25, deadline=None)
@given(
    t1=st.integers(0, 9),
    t2=st.integers(0, 9),
    scale=st.floats(1e-6, 1e6),
    seed=st.integers(0, 2**31 - 1),
)
def test_row_locality(fmt, t1, t2, scale, seed):
    """pack(cat(a, b)) == cat(pack(a), pack(b)), bitwise: what makes quantize-before-
    communicate exactly equal to quantize-after."""
    gen = torch.Generator().manual_seed(seed)
    h = 256
    a = heavy_tailed(t1, h, generator=gen) * scale
    b = adversarial(t2, h, block=BLOCK[fmt], gen=gen)
    spec = make_spec(fmt, h, {"router_logits": (torch.float32, 5)})
    la, lb = torch.randn(t1, 5, generator=gen), torch.randn(t2, 5, generator=gen)
    whole = spec.pack(torch.cat([a, b]), router_logits=torch.cat([la, lb]))
    parts = torch.cat([spec.pack(a, router_logits=la), spec.pack(b, router_logits=lb)])
    assert torch.equal(whole, parts)


@pytest.mark.parametrize("fmt", mw.FORMATS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_never_becomes_finite(fmt, bad):
    h = 256
    x = gaussian(4, h)
    x[1, 37] = bad
    x[3, 0] = bad
    spec = make_spec(fmt, h)
    y = spec.dequantize(spec.pack(x), torch.float32)
    for r, c in [(1, 37), (3, 0)]:
        assert not math.isfinite(y[r, c].item()), f"{fmt}: {bad} came back as {y[r, c]}"
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()  # other rows untouched
    if fmt in ("mxfp8", "mxfp4", "nvfp4"):
        blk = BLOCK[fmt]
        start = 37 // blk * blk
        assert torch.isnan(y[1, start : start + blk]).all()  # the whole block is NaN
        assert torch.isfinite(y[1, :start]).all()


def test_zero_tokens():
    for fmt in mw.FORMATS:
        spec = make_spec(fmt, 128, EXTRAS)
        rows = spec.pack(torch.empty(0, 128), **make_extras(0))
        assert rows.shape == (0, spec.row_bytes)
        assert spec.dequantize(rows).shape == (0, 128)
        assert spec.unpack(rows).extras["topk_ids"].shape == (0, 2)


def test_non_contiguous_input():
    x = heavy_tailed(64, 512)
    for fmt in mw.FORMATS:
        spec = make_spec(fmt, 256)
        strided = x[::2, 1::2]
        assert not strided.is_contiguous()
        assert torch.equal(spec.pack(strided), spec.pack(strided.contiguous()))


def test_global_scale_helper():
    assert mw.nvfp4_global_scale(2.0) == np.float32(1344.0)
    x = torch.tensor([[1.0, -8.0], [3.0, 0.5]])
    assert mw.nvfp4_global_scale(x) == np.float32(2688.0 / 8.0)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="amax"):
            mw.nvfp4_global_scale(bad)
    with pytest.raises(ValueError, match="amax"):
        mw.nvfp4_global_scale(torch.empty(0))


def test_swizzle_128x4_formula_and_inverse():
    t, b = 200, 13  # pads to 256 rows and 16 scale columns
    s = torch.randint(0, 255, (t, b), dtype=torch.uint8)
    sw = mw.swizzle_128x4(s)
    mp, kp = 256, 16
    assert sw.shape == (mp, kp)
    flat = sw.reshape(-1)
    for m in range(mp):
        for c in range(kp):
            idx = (m // 128) * (kp // 4) * 512 + (c // 4) * 512 + (m % 32) * 16
            idx += ((m // 32) % 4) * 4 + (c % 4)
            want = int(s[m, c]) if (m < t and c < b) else 0
            assert int(flat[idx]) == want, (m, c)
    assert torch.equal(mw.unswizzle_128x4(sw, t, b), s)
    e4 = s.view(torch.float8_e4m3fn)
    assert mw.swizzle_128x4(e4).dtype == torch.float8_e4m3fn
    assert torch.equal(mw.swizzle_128x4(e4).view(torch.uint8), sw)


def test_swizzle_of_gathered_nvfp4_scales():
    spec = make_spec("nvfp4", 7168)
    rows = torch.cat([spec.pack(gaussian(t, 7168)) for t in (3, 0, 130)])
    scales = spec.unpack(rows).scales
    sw = mw.swizzle_128x4(scales)
    assert sw.shape == (256, 448)
    assert torch.equal(mw.unswizzle_128x4(sw, 133, 448).view(torch.uint8), scales.view(torch.uint8))


# ----------------------------------------------------------------------------- bad input
def test_bad_hidden():
    for fmt, h in [("nvfp4", 100), ("mxfp8", 48), ("mxfp4", 16), ("fp8_block128", 64)]:
        with pytest.raises(ValueError, match=rf"{fmt}.*block.*hidden={h}"):
            make_spec(fmt, h)
    with pytest.raises(ValueError, match="hidden=0"):
        make_spec("fp8", 0)
    with pytest.raises(TypeError, match="hidden"):
        make_spec("fp8", 256.0)


def test_bad_format_and_global_scale():
    with pytest.raises(ValueError, match="unknown format 'int4'"):
        mw.WireSpec("int4", 256)
    with pytest.raises(ValueError, match="global_scale"):
        mw.WireSpec("nvfp4", 256)
    for g in (0.0, -2.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="global_scale"):
            mw.WireSpec("nvfp4", 256, global_scale=g)
    with pytest.raises(ValueError, match="global_scale"):
        mw.WireSpec("nvfp4", 256, global_scale=torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="global_scale"):
        mw.WireSpec("nvfp4", 256, global_scale="1.0")
    with pytest.raises(ValueError, match="only used by format 'nvfp4'"):
        mw.WireSpec("fp8", 256, global_scale=1.0)
    assert mw.WireSpec("nvfp4", 256, global_scale=torch.tensor(3.0)).global_scale == 3.0


@pytest.mark.parametrize("fmt", mw.FORMATS)
def test_bad_x(fmt):
    spec = make_spec(fmt, 256)
    for dtype in (torch.int32, torch.bool, torch.uint8, torch.float64):
        with pytest.raises(TypeError, match="x must be"):
            spec.pack(torch.zeros(2, 256, dtype=dtype))
    with pytest.raises(ValueError, match=r"x must be \[T, hidden=256\], got shape \(256,\)"):
        spec.pack(torch.zeros(256))
    with pytest.raises(ValueError, match=r"got shape \(2, 128\)"):
        spec.pack(torch.zeros(2, 128))
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        spec.pack(np.zeros((2, 256), np.float32))


def test_bad_extras():
    spec = make_spec("nvfp4", 256, {"router_logits": (torch.float32, 8)})
    x = torch.randn(3, 256)
    with pytest.raises(ValueError, match=r"missing \['router_logits'\]"):
        spec.pack(x)
    with pytest.raises(ValueError, match=r"undeclared \['ids'\]"):
        spec.pack(x, router_logits=torch.randn(3, 8), ids=torch.zeros(3, 1))
    with pytest.raises(TypeError, match=r"router_logits.*dtype torch\.float32.*torch\.float64"):
        spec.pack(x, router_logits=torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"router_logits.*\[T=3, 8\].*\(3, 7\)"):
        spec.pack(x, router_logits=torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"router_logits.*\(2, 8\)"):
        spec.pack(x, router_logits=torch.randn(2, 8))
    for decl, exc in [
        ({"out": (torch.float32, 1)}, ValueError),
        ({"a b": (torch.float32, 1)}, ValueError),
        ({"w": (torch.float32, 0)}, ValueError),
        ({"w": ("float32", 2)}, TypeError),
        ({"w": torch.float32}, TypeError),
    ]:
        with pytest.raises(exc, match="extras"):
            mw.WireSpec("fp8", 256, extras=decl)


def test_bad_rows():
    spec = make_spec("mxfp4", 256)
    good = spec.pack(torch.randn(2, 256))
    with pytest.raises(ValueError, match=rf"rows must be \[N, row_bytes={spec.row_bytes}\]"):
        spec.unpack(good[:, :-16])
    with pytest.raises(ValueError, match="row_bytes"):
        spec.dequantize(torch.zeros(2, 4096, dtype=torch.uint8))
    with pytest.raises(TypeError, match="rows must be uint8"):
        spec.dequantize(good.to(torch.int16))
    with pytest.raises(ValueError, match="rows must be"):
        spec.unpack(good.reshape(-1))
    with pytest.raises(TypeError, match="dtype must be"):
        spec.dequantize(good, torch.int32)
    with pytest.raises(ValueError, match="out must have 2 rows"):
        spec.pack(torch.randn(2, 256), out=torch.empty(3, spec.row_bytes, dtype=torch.uint8))
    with pytest.raises(ValueError, match="backend"):
        spec.pack(torch.randn(2, 256), backend="cuda")


def test_bad_pack_quantized():
    spec = make_spec("nvfp4", 256)
    p, s = spec.quantize(torch.randn(4, 256))
    with pytest.raises(ValueError, match=r"payload must be \[T, 128\]"):
        spec.pack_quantized(p[:, :64], s)
    with pytest.raises(TypeError, match="scales must be"):
        spec.pack_quantized(p, s.float())
    with pytest.raises(ValueError, match="same T"):
        spec.pack_quantized(p, s[:3])


def test_unpack_of_strided_rows_copies_correctly():
    spec = make_spec("fp8", 256, {"router_logits": (torch.float32, 4)})
    x, lg = torch.randn(6, 256), torch.randn(6, 4)
    rows = spec.pack(x, router_logits=lg)
    padded = torch.zeros(6, spec.row_bytes + 8, dtype=torch.uint8)
    padded[:, 8:] = rows  # rows at a misaligned offset: views would be misaligned
    view = spec.unpack(padded[:, 8:])
    assert torch.equal(view.extras["router_logits"], lg)
    assert torch.equal(spec.dequantize(padded[:, 8:]), spec.dequantize(rows))


def test_spec_swizzled_scales():
    spec = make_spec("nvfp4", 512)
    rows = spec.pack(gaussian(130, 512))
    sw = spec.swizzled_scales(rows)
    assert sw.dtype == torch.float8_e4m3fn and sw.shape == (256, 32)
    assert torch.equal(
        sw.view(torch.uint8), mw.swizzle_128x4(spec.unpack(rows).scales).view(torch.uint8)
    )
    with pytest.raises(ValueError, match="needs format 'nvfp4'"):
        make_spec("mxfp4", 512).swizzled_scales(rows)
