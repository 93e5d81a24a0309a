"""Tier a: the combine codec (``moewire.formats.combine``), torch reference.

Byte layout per combine wire, the round trip against the wire formats it reuses, the
dynamic nvfp4 codec against an independent computation (numpy ``g_t`` per row and the
static nvfp4 format run with that ``g_t``), special rows, and the fixed summation order.

Shape legend: ``T`` rows, ``H`` hidden, ``W`` sources.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moewire as mw
from moewire.formats.combine import (
    COMBINE_WIRES,
    CombineCodec,
    check_combine_wire,
    combine_codec,
)
from moewire.moe import EPMoE, MoEConfig
from moewire.testing.data import heavy_tailed, sqnr_db

QUANTIZED = tuple(w for w in COMBINE_WIRES if w != "bf16")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bits of a float tensor with every NaN made the same (NaN payloads are not part of
    the contract; NaN positions are)."""
    t = torch.where(t.isnan(), torch.nan, t)
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def test_names_and_errors():
    assert COMBINE_WIRES == ("bf16", "fp8", "mxfp8", "nvfp4", "mxfp4")
    assert mw.FORMATS == ("bf16", "fp8", "fp8_block128", "mxfp8", "nvfp4", "mxfp4")
    for bad in ("fp4", "nvfp4_dyn", None, 3):
        with pytest.raises(ValueError, match=r"combine_wire must be one of \('bf16', 'fp8'"):
            check_combine_wire(bad)
    with pytest.raises(ValueError, match="has no codec"):
        CombineCodec("bf16", 64)
    with pytest.raises(ValueError, match="multiple of its block 16"):
        CombineCodec("nvfp4", 40)
    cfg = MoEConfig(64, 32, 4, 2)
    with pytest.raises(ValueError, match="combine_wire must be one of"):
        EPMoE(cfg, comm="local", combine_wire="int4")
    with pytest.raises(ValueError, match="supports only combine_wire='bf16'"):
        EPMoE(cfg, comm="grouped", combine_wire="fp8")


def test_layout_at_deepseek_hidden():
    """Row bytes and section offsets at H=7168 (the module docstring's table)."""
    want = {"fp8": 7184, "mxfp8": 7392, "nvfp4": 4048, "mxfp4": 3808}
    for wire, r in want.items():
        assert combine_codec(wire, 7168).row_bytes == r, wire
    sec = combine_codec("nvfp4", 7168).spec.sections
    assert (sec["payload"].offset, sec["scales"].offset, sec["g"].offset) == (0, 3584, 4032)
    assert sec["g"].dtype == torch.float32 and sec["g"].numel == 1


@pytest.mark.parametrize("wire", ["fp8", "mxfp8", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_existing_formats_round_trip(wire, dtype):
    """fp8/mxfp8/mxfp4 combine rows are the wire format's rows, bit for bit."""
    x = heavy_tailed(9, 96, generator=torch.Generator().manual_seed(1)).to(dtype)
    codec = combine_codec(wire, 96)
    spec = mw.WireSpec(wire, 96)
    rows = codec.encode(x)
    assert torch.equal(rows, spec.pack(x))
    assert torch.equal(_bits(codec.decode(rows)), _bits(spec.dequantize(rows, torch.float32)))


def test_nvfp4_dynamic_scale_vs_independent():
    """g_t = fp32(2688) / fp32(max(amax_t, 1e-4)) per row (numpy), and each row's bytes and
    values are the static nvfp4 format's with global_scale=g_t."""
    gen = torch.Generator().manual_seed(2)
    x = heavy_tailed(12, 64, generator=gen) * torch.logspace(-6, 4, 12)[:, None]
    x[3] = 0.0
    x[4] = 3e-5  # below the amax floor
    codec = combine_codec("nvfp4", 64)
    rows = codec.encode(x)
    view = codec.spec.unpack(rows)
    got_g = view.extras["g"][:, 0]
    for t in range(x.shape[0]):
        amax = np.float32(np.abs(x[t].numpy()).max())
        g = np.float32(2688.0) / np.maximum(amax, np.float32(1e-4))
        assert got_g[t].item() == float(g), (t, got_g[t].item(), g)
        static = mw.WireSpec("nvfp4", 64, global_scale=float(g))
        payload, scales = static.quantize(x[t : t + 1])
        assert torch.equal(view.payload[t : t + 1], payload)
        assert torch.equal(view.scales[t : t + 1].view(torch.uint8), scales.view(torch.uint8))
        want = static.dequantize(static.pack(x[t : t + 1]), torch.float32)
        assert torch.equal(codec.decode(rows[t : t + 1]), want)
    # the zero row: zero codes, zero scales, exact zeros back
    assert not rows[3, : codec.spec.sections["g"].offset].any()
    assert torch.equal(codec.decode(rows[3:4]), torch.zeros(1, 64))
    # padding bytes after g are zero
    assert not rows[:, codec.spec.sections["g"].offset + 4 :].any()


@pytest.mark.parametrize("wire", QUANTIZED)
def test_special_rows(wire):
    """Zero rows stay exact zeros; a NaN or Inf anywhere makes the whole row (nvfp4, fp8)
    or its block (MX) non-finite: never a finite output."""
    x = torch.randn(4, 64)
    x[0] = 0.0
    x[1, 7] = float("nan")
    x[2, 40] = float("inf")
    codec = combine_codec(wire, 64)
    out = codec.decode(codec.encode(x))
    assert torch.equal(out[0], torch.zeros(64))
    assert out[1, 7].isnan() and out[2, 40].isnan()
    assert out[3].isfinite().all()
    if wire in ("nvfp4", "fp8"):
        assert out[1].isnan().all() and out[2].isnan().all()
    if wire == "nvfp4":
        g = codec.spec.unpack(codec.encode(x)).extras["g"]
        assert g[1:3].view(torch.int32).eq(0x7FC00000).all()


@pytest.mark.parametrize("wire", QUANTIZED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_sum_order(wire, dtype):
    """decode_sum = ((0 + d_0) + d_1) + ... in fp32 over present sources, rounded once."""
    gen = torch.Generator().manual_seed(3)
    codec = combine_codec(wire, 64)
    rows = codec.encode(heavy_tailed(10, 64, generator=gen))
    index = torch.tensor([[0, 4, 8], [1, -1, 9], [-1, -1, -1], [2, 3, 5]])
    vals = codec.decode(rows)
    want = torch.zeros(4, 64)
    for src in range(3):
        for t in range(4):
            if index[t, src] >= 0:
                want[t] = want[t] + vals[index[t, src]]
    got = codec.decode_sum(rows, index, dtype)
    assert got.dtype == dtype
    assert torch.equal(_bits(got), _bits(want.to(dtype)))
    empty = codec.decode_sum(rows[:0], torch.full((3, 2), -1), dtype)
    assert torch.equal(empty, torch.zeros(3, 64, dtype=dtype))


def test_sqnr_of_one_round_trip():
    """Order of the codecs' accuracy on heavy-tailed rows (a sanity bound, not a figure)."""
    x = heavy_tailed(64, 512, generator=torch.Generator().manual_seed(4))
    sq = {
        w: sqnr_db(x, combine_codec(w, 512).decode(combine_codec(w, 512).encode(x)))
        for w in QUANTIZED
    }
    assert sq["fp8"] > 25 and sq["mxfp8"] > 25
    assert sq["nvfp4"] > 12 and sq["mxfp4"] > 8
    assert sq["fp8"] > sq["nvfp4"] and sq["nvfp4"] > sq["mxfp4"]


def test_local_layer_round_trip():
    """comm='local' with a quantized combine: the full sum's one-rank round trip."""
    torch.manual_seed(0)
    cfg = MoEConfig(64, 32, 4, 2)
    w13, w2 = torch.randn(4, 64, 64) * 0.1, torch.randn(4, 64, 32) * 0.1
    x, logits = torch.randn(5, 64), torch.randn(5, 4)
    f32 = torch.float32  # fp32 partials: the round trip of the exact fp32 sum
    ref = EPMoE(cfg, comm="local", combine_dtype=f32)
    ref.load_experts(w13, w2)
    for wire in QUANTIZED:
        m = EPMoE(cfg, comm="local", combine_wire=wire, combine_dtype=f32)
        m.load_experts(w13, w2)
        codec = combine_codec(wire, 64)
        y_ref = ref(x, logits)
        want = codec.decode(codec.encode(y_ref.float()))
        assert torch.equal(m(x, logits), want), wire
