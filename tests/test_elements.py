"""Tier a: exhaustive tables of the element codes (WIRE_FORMATS.md, "Element codes")."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

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


def _up(v):
    return float(np.nextafter(np.float32(v), np.float32(np.inf)))


def _down(v):
    return float(np.nextafter(np.float32(v), np.float32(0)))


# value -> expected e2m1 code. Ties go to the even code: .25 -> 0 (0.0), .75 -> 2 (1.0),
# 1.25 -> 2 (1.0), 1.75 -> 4 (2.0), 2.5 -> 4 (2.0), 3.5 -> 6 (4.0), 5 -> 6 (4.0).
E2M1_TABLE = [
    (0.0, 0x0),
    (-0.0, 0x8),  # signbit: negative zero keeps its sign
    (0.1, 0x0),
    (0.25, 0x0),  # tie 0 / 0.5 -> code 0 (even)
    (_up(0.25), 0x1),
    (0.5, 0x1),
    (_down(0.75), 0x1),
    (0.75, 0x2),  # tie 0.5 / 1 -> code 2
    (1.0, 0x2),
    (1.25, 0x2),  # tie 1 / 1.5 -> code 2
    (_up(1.25), 0x3),
    (1.5, 0x3),
    (_down(1.75), 0x3),
    (1.75, 0x4),  # tie 1.5 / 2 -> code 4
    (2.0, 0x4),
    (2.5, 0x4),  # tie 2 / 3 -> code 4
    (_up(2.5), 0x5),
    (3.0, 0x5),
    (_down(3.5), 0x5),
    (3.5, 0x6),  # tie 3 / 4 -> code 6
    (4.0, 0x6),
    (5.0, 0x6),  # tie 4 / 6 -> code 6
    (_up(5.0), 0x7),
    (6.0, 0x7),
    (7.0, 0x7),  # saturates
    (1e30, 0x7),
    (math.inf, 0x7),
    (-0.25, 0x8),  # negative value rounding to zero: 0x8
    (-0.75, 0xA),
    (-5.0, 0xE),
    (-100.0, 0xF),
    (1e-45, 0x0),  # smallest subnormal
]


@pytest.mark.parametrize(("value", "code"), E2M1_TABLE)
def test_e2m1_encode_table(value, code):
    v = torch.tensor([value], dtype=torch.float32)
    assert encode_e2m1(v).item() == code, f"{value} should encode as {code:#x}"


def test_e2m1_decode_matches_ml_dtypes():
    codes = torch.arange(16, dtype=torch.uint8)
    ours = decode_e2m1(codes).numpy()
    ref = codes.numpy().view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(ours, ref)
    assert np.signbit(ours[8])  # code 8 is -0.0


def test_e2m1_encode_matches_ml_dtypes_rne():
    # ml_dtypes rounds to nearest even as well; compare on every representable tie and random
    # values in range (saturation is ours, so stay within +-6).
    rng = np.random.default_rng()
    v = np.concatenate(
        [rng.uniform(-6, 6, 20000), np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])]
    ).astype(np.float32)
    v = np.concatenate([v, -v])
    ours = encode_e2m1(torch.from_numpy(v)).numpy()
    ref = v.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    np.testing.assert_array_equal(ours, ref)


def test_nibble_order():
    codes = torch.tensor([[0x1, 0xF, 0x3, 0x8]], dtype=torch.uint8)
    packed = pack_e2m1(codes)
    assert packed.tolist() == [[0xF1, 0x83]]  # element 2j low nibble, 2j+1 high nibble
    assert torch.equal(unpack_e2m1(packed), codes)


E4M3_TABLE = [
    (0.0, 0x00),
    (-0.0, 0x80),
    (448.0, 0x7E),
    (449.0, 0x7E),  # clamped before the cast
    (464.0, 0x7E),  # would round to 480 (does not exist) without the clamp
    (1e20, 0x7E),
    (math.inf, 0x7E),
    (-math.inf, 0xFE),
    (-1000.0, 0xFE),
    (math.nan, 0x7F),
    (-math.nan, 0x7F),  # NaN is always written as 0x7F
    (2.0**-9, 0x01),  # smallest subnormal
    (2.0**-10, 0x00),  # tie between 0 and 2**-9 -> even (0)
    (3 * 2.0**-10, 0x02),  # tie between 1 and 2 subnormal units -> even (2)
    (1.0, 0x38),
    (1.0625, 0x38),  # tie 1 / 1.125 -> even mantissa (1.0)
    (1.1875, 0x3A),  # tie 1.125 / 1.25 -> even mantissa (1.25)
    (126.08, 0x70),  # 128: the interpreter's truncation bug would give 120 (0x6F)
]


@pytest.mark.parametrize(("value", "byte"), E4M3_TABLE)
def test_e4m3_encode_table(value, byte):
    v = torch.tensor([value], dtype=torch.float32)
    assert encode_e4m3(v).item() == byte, f"{value} should encode as {byte:#x}"


def test_e4m3_encode_matches_ml_dtypes_on_random_bits():
    rng = np.random.default_rng()
    bits = rng.integers(0, 2**32, 200000, dtype=np.uint64).astype(np.uint32)
    v = bits.view(np.float32)
    v = v[np.isfinite(v)]
    ours = encode_e4m3(torch.from_numpy(v.copy())).numpy()
    clamped = np.clip(v, -448, 448)
    ref = clamped.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    np.testing.assert_array_equal(ours, ref)


def test_e4m3_decode_all_bytes():
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ours = decode_e4m3(b).numpy()
    ref = b.numpy().view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(ours, ref)  # NaN == NaN in assert_array_equal


def test_e8m0_extremes():
    b = torch.tensor([0, 1, 126, 127, 128, 254, 255], dtype=torch.uint8)
    v = decode_e8m0(b)
    assert v[0].item() == 2.0**-127  # fp32 subnormal, exact
    assert v[1].item() == 2.0**-126
    assert v[2].item() == 0.5
    assert v[3].item() == 1.0
    assert v[4].item() == 2.0
    assert v[5].item() == 2.0**127
    assert math.isnan(v[6].item())


def test_exp2i_exact():
    k = torch.arange(-127, 128)
    np.testing.assert_array_equal(exp2i(k).numpy(), np.ldexp(1.0, k.numpy()).astype(np.float32))


@pytest.mark.parametrize("elem_max", [6.0, 448.0])
def test_mx_scale_byte_exact(elem_max):
    # amax exactly at M * 2**E must give E; one ulp above must give E + 1.
    vals, expect = [], []
    for e in range(-120, 120):
        at = np.float32(elem_max * 2.0**e)
        above = np.nextafter(at, np.float32(np.inf))
        below = np.nextafter(at, np.float32(0))
        vals += [at, above, below]
        expect += [e, e + 1, e]
    amax = torch.tensor(np.array(vals, np.float32))
    want = np.clip(np.array(expect) + 127, 0, 254)
    np.testing.assert_array_equal(mx_scale_byte(amax, elem_max).numpy(), want)


def test_mx_scale_byte_zero_subnormal_and_huge():
    amax = torch.tensor([0.0, 1e-45, 1e-40, 3.4e38], dtype=torch.float32)
    # 3.4e38 ~ 1.998 * 2**127: 6 * 2**126 >= it > 6 * 2**125 -> E = 126 -> byte 253;
    # 448 * 2**120 >= it > 448 * 2**119 -> E = 120 -> byte 247.
    assert mx_scale_byte(amax, 6.0).tolist() == [0, 0, 0, 253]
    assert mx_scale_byte(amax, 448.0).tolist() == [0, 0, 0, 247]
