"""The Triton kernels against the torch reference, byte for byte (``rtol=0, atol=0``).

Two tiers:

- A small-shape set that runs everywhere: on the GPU where there is one, otherwise on the
  CPU under Triton's interpreter (``TRITON_INTERPRET=1`` is set below, before Triton is
  imported). The kernels encode elements with integer bit manipulation, so the interpreter
  gives the GPU's bytes; its own float->fp8/bf16 casts truncate and are never used there.
- The full matrix of the issue, marked ``gpu``: every format, T in {0, 1, 3, 127, 128, 129,
  4097}, H in {128, 2048, 4096, 7168}, bf16 and fp32 input, heavy-tailed and adversarial
  data, both e4m3 paths of the kernels (hardware ``cvt`` and integer).

Every pack writes into a poisoned buffer, twice with complementary poison bytes, so a byte
the kernel forgot cannot pass by matching the poison. Fresh random data on every run.

Shape legend: ``T`` tokens, ``H`` hidden, ``R`` row bytes, ``N`` rows.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

_CUDA = torch.cuda.is_available()
# Triton decides interpreter or compiler when a kernel is decorated, i.e. when the kernel
# modules are imported: set the variable for those imports only, so that it does not leak
# into other tests or the subprocesses they start.
_saved = os.environ.get("TRITON_INTERPRET")
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton", reason="triton is not importable (pip install triton)")
    import triton.language as tl

    from moewire.formats import _triton
    from moewire.formats._kernels.elements import encode_e2m1, encode_e4m3

    # Triton imports this lazily at the first launch and checks the interpreter setting then
    with contextlib.suppress(ImportError):
        import triton.experimental.gluon

    @triton.jit
    def _encode_kernel(v_ptr, e2m1_ptr, e4m3_ptr, n, HW: tl.constexpr):
        i = tl.program_id(0) * 4096 + tl.arange(0, 4096)
        v = tl.load(v_ptr + i, mask=i < n)
        tl.store(e2m1_ptr + i, encode_e2m1(v).to(tl.uint8), mask=i < n)
        tl.store(e4m3_ptr + i, encode_e4m3(v, HW), mask=i < n)

finally:
    if _saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved

import moewire as mw  # noqa: E402
from adversarial_data import adversarial  # noqa: E402
from moewire.formats.elements import encode_e2m1 as ref_encode_e2m1  # noqa: E402
from moewire.formats.elements import encode_e4m3 as ref_encode_e4m3  # noqa: E402
from moewire.testing.data import heavy_tailed  # noqa: E402

DEVICE = "cuda" if _CUDA and not _triton._interpreting() else "cpu"
G = 2688.0 / 5.0  # an nvfp4 global scale calibrated for amax ~ 5
G_POW2 = 2.0**9  # a power of two: nvfp4's scale arithmetic stays exact, so ties stay ties
BLOCK = {"bf16": 16, "fp8": 16, "fp8_block128": 128, "mxfp8": 32, "nvfp4": 16, "mxfp4": 32}
EXTRAS = {
    "router_logits": (torch.float32, 8),
    "topk_ids": (torch.int32, 2),
    "odd": (torch.bfloat16, 3),  # 6 bytes: forces zero padding after it
}
POISONS = (0xA5, 0x5A)
# the interpreter runs the kernels in numpy, which warns on the Inf/NaN lanes they handle
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def make_spec(fmt: str, hidden: int, extras=None, g: float = G) -> mw.WireSpec:
    return mw.WireSpec(fmt, hidden, global_scale=g if fmt == "nvfp4" else None, extras=extras)


def make_extras(t: int, decl=EXTRAS, device=DEVICE) -> dict[str, torch.Tensor]:
    out = {}
    for name, (dtype, width) in decl.items():
        if dtype.is_floating_point:
            out[name] = torch.randn(t, width, device=device).to(dtype)
        else:
            out[name] = torch.randint(-(2**31), 2**31 - 1, (t, width), device=device).to(dtype)
    return out


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical where not NaN (so +0 != -0), and NaN exactly where the other is NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    an, bn = torch.isnan(a), torch.isnan(b)
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    ai, bi = a.view(ints[a.dtype]), b.view(ints[b.dtype])
    return bool(torch.equal(an, bn) and torch.equal(ai[~an], bi[~bn]))


def check_pack(
    spec: mw.WireSpec, x: torch.Tensor, extras: dict, *, hw=None, words=True, pad_rows: int = 2
):
    """Pack with both backends; the triton rows are a slice of a poisoned larger buffer whose
    other bytes must stay untouched. Returns the reference rows. ``words=False``: bf16 ``x``
    read one value at a time (the kernels' general path) instead of as int32 words."""
    ref = spec.pack(x, backend="torch", **extras)
    t, r = ref.shape
    for poison in POISONS:
        buf = torch.full((t + 2 * pad_rows, r + 32), poison, dtype=torch.uint8, device=x.device)
        out = buf[pad_rows : pad_rows + t, 16 : 16 + r]  # row stride R + 32, 16-byte aligned
        if hw is None and words:
            got = spec.pack(x, out=out, backend="triton", **extras)
        else:
            got = _triton.pack(spec, x, out, extras, hw=hw, words=words)
        assert got.data_ptr() == out.data_ptr()
        assert torch.equal(got, ref), f"{spec}: rows differ from the torch reference"
        rest = buf.clone()
        rest[pad_rows : pad_rows + t, 16 : 16 + r] = poison
        assert bool((rest == poison).all()), "bytes outside out= were written"
    return ref


def check_dequantize(spec: mw.WireSpec, rows: torch.Tensor, *, hw=None):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ref = spec.dequantize(rows, dtype, backend="torch")
        if hw is None:
            got = spec.dequantize(rows, dtype, backend="triton")
        else:
            got = _triton.dequantize(spec, rows, dtype, hw=hw)
        assert same_values(got, ref), f"{spec}: dequantize to {dtype} differs"


# ---------------------------------------------------------------- small shapes (CPU or GPU)
@pytest.mark.parametrize("hw", [False, True] if DEVICE == "cuda" else [False])
def test_element_encoders_on_random_and_dense_fp32(hw):
    # Random fp32 bit patterns (all exponents, subnormals, NaN payloads of both signs) and a
    # dense sweep of [0, 7]: the kernels' e2m1 and e4m3 encoders against the reference's.
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 16,), dtype=torch.int32)
    dense = torch.arange(0, 0x40E00000, 4099, dtype=torch.int32)
    v = torch.cat([bits, dense, dense | -(2**31)]).view(torch.float32)
    v = torch.cat([v, torch.tensor([0.0, -0.0, math.inf, -math.inf, 448.0, 464.0, -1e-45])])
    n = v.numel()
    e2m1, e4m3 = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    v, e2m1, e4m3 = v.to(DEVICE), e2m1.to(DEVICE), e4m3.to(DEVICE)
    _encode_kernel[(-(-n // 4096),)](v, e2m1, e4m3, n, HW=hw)
    finite = ~torch.isnan(v)  # e2m1 of NaN is unspecified: formats replace NaN blocks
    assert torch.equal(e2m1[finite], ref_encode_e2m1(v[finite]))
    assert torch.equal(e4m3, ref_encode_e4m3(v))


@pytest.mark.parametrize("fmt", mw.FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_and_dequantize_adversarial(fmt, dtype):
    # ties of e2m1 and e4m3 at exact block scales, +-0 blocks, fp32 subnormals, 1e37, NaN,
    # +-Inf, single non-zero values: every block kind of tests/adversarial_data.py
    t, h = 6, 256
    x = adversarial(t, h, block=BLOCK[fmt]).to(dtype).to(DEVICE)
    spec = make_spec(fmt, h, EXTRAS, g=G_POW2)
    extras = make_extras(t)
    rows = check_pack(spec, x, extras)
    check_dequantize(spec, rows)
    if dtype == torch.bfloat16:
        assert _triton._words(_triton._layout(spec), x) == (fmt != "bf16")
        check_pack(spec, x, extras, words=False)


@pytest.mark.parametrize("fmt", mw.FORMATS)
def test_bf16_bit_patterns(fmt):
    # Random bf16 bit patterns: every exponent, subnormals, +-Inf and NaNs of both signs and
    # any payload (torch's float -> bf16 cast only ever makes 0x7FC0), read as int32 words
    # and one value at a time. A block holds a non-finite value with probability ~6-22%.
    t, h = 4, 512
    bits = torch.randint(-(2**15), 2**15, (t, h), dtype=torch.int16)
    bits[0, :32] = torch.tensor([0x7F81, -127, 0x7FFF, -1, 0x7F80, -128] + [0] * 26)  # 0xFF80
    x = bits.view(torch.bfloat16).to(DEVICE)
    spec = make_spec(fmt, h, EXTRAS)
    extras = make_extras(t)
    for words in (True, False):
        rows = check_pack(spec, x, extras, words=words)
    check_dequantize(spec, rows)


@pytest.mark.parametrize(
    ("chunk_fast", "depth"), [(True, 1), (False, 1), (True, 2)], ids=["chunk1", "token1", "chunk2"]
)
@pytest.mark.parametrize("group", [2, 3, 7])
@pytest.mark.parametrize("fmt", ["bf16", "fp8_block128", "mxfp8", "nvfp4", "mxfp4"])
def test_chunk_groups_and_grid_orders(fmt, group, chunk_fast, depth, monkeypatch):
    # Seven chunks per token (256 values each at H = 1792) in programs of `group` chunks:
    # 3 leaves a last program with one real chunk and two past the last block (they must
    # write nothing); 7 is one program per token. Both grid orders, one or two chunks loaded
    # ahead; words and values paths.
    h = 1792
    p_major = fmt in ("fp8_block128", "mxfp8") and chunk_fast
    tile = _triton._Tile(256, 8, chunk_fast, group, depth, p_major)
    monkeypatch.setitem(_triton._TUNED, fmt, tile)
    _triton._layout.cache_clear()
    try:
        spec = make_spec(fmt, h, EXTRAS)
        lay = _triton._layout(spec)
        assert (lay.n_chunks, lay.group) == (7, group)
        for t in (1, 5):
            x = (heavy_tailed(t, h) * 3).to(torch.bfloat16).to(DEVICE)
            extras = make_extras(t)
            for words in (True, False):
                check_pack(spec, x, extras, words=words)
    finally:
        _triton._layout.cache_clear()


@pytest.mark.parametrize("fmt", ["bf16", "mxfp8", "nvfp4"])
def test_token_slices_of_a_chunk_fastest_grid(fmt, monkeypatch):
    # The grid (n_groups, T) holds at most 65535 tokens; more are packed in slices of that
    # many (here 4, so 13 tokens take four launches, the last of one token), extras sliced
    # alongside.
    monkeypatch.setattr(_triton, "_MAX_GRID_Y", 4)
    spec = make_spec(fmt, 256, EXTRAS)
    assert _triton._layout(spec).chunk_fast
    x = (heavy_tailed(13, 256) * 3).to(torch.bfloat16).to(DEVICE)
    check_pack(spec, x, make_extras(13))


@pytest.mark.parametrize("fmt", ["fp8", "mxfp8", "nvfp4", "bf16"])
def test_several_chunks_per_token(fmt):
    # More than one program per token: the tail bytes (padding, extras) come from the program
    # of the last chunk. fp8 at H = 72: one padded block (a masked word tail).
    h = {"fp8": 72, "bf16": 8192, "nvfp4": 16384}.get(fmt, 2048)
    spec = make_spec(fmt, h, EXTRAS)
    assert fmt == "fp8" or _triton._layout(spec).n_groups > 1
    for t in (1, 13):
        x = (heavy_tailed(t, h) * 3).to(torch.bfloat16).to(DEVICE)
        extras = make_extras(t)
        check_pack(spec, x, extras)
        check_pack(spec, x.float(), extras)


@pytest.mark.parametrize("fmt", mw.FORMATS)
def test_pack_heavy_tailed_fp16_and_no_extras(fmt):
    t, h = 3, 512
    x = (heavy_tailed(t, h) * 3).to(torch.float16).to(DEVICE)
    spec = make_spec(fmt, h)
    rows = check_pack(spec, x, {})
    check_dequantize(spec, rows)


@pytest.mark.parametrize("fmt", mw.FORMATS)
def test_non_contiguous_input(fmt):
    t, h = 3, 128
    base = (heavy_tailed(2 * h, 2 * t) * 3).to(DEVICE)
    x = base.t()[::2, ::2]  # [t, h] with strides (2, 4t)
    assert x.shape == (t, h) and not x.is_contiguous()
    spec = make_spec(fmt, h, EXTRAS)
    extras = make_extras(t)
    extras["router_logits"] = make_extras(t, {"e": (torch.float32, 16)})["e"][:, ::2]
    check_pack(spec, x, extras)


def _bf16_neighbours(vals: torch.Tensor) -> torch.Tensor:
    """The bf16 values one ulp below and above each (non-zero, finite) bf16 value."""
    b = vals.to(torch.bfloat16).view(torch.int16)
    return torch.cat([(b - 1).view(torch.bfloat16), (b + 1).view(torch.bfloat16)]).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["fp8", "mxfp8", "nvfp4"])
def test_all_e4m3_ties(fmt, dtype):
    # Every midpoint between adjacent e4m3 magnitudes (exact ties: round to the even code),
    # and the fp32 neighbours on both sides, reach the encoder unchanged: a token / block of
    # amax 448 has fp8 scale k = 448/448 = 1 and MX scale byte 127 (2**0). Beyond 448 the
    # explicit clamp applies. For nvfp4 these values become block scales s = g*(vmax*RCP6),
    # within an ulp or two of the midpoints (RCP6 is inexact), with vmax = vals * 6 / g.
    mags = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mid = (mags[:-1] + mags[1:]) / 2  # exact in fp32
    if dtype == torch.bfloat16:  # the midpoints are exact in bf16; their bf16 neighbours
        vals = torch.cat([mid, _bf16_neighbours(mid[1:])])
    else:
        vals = torch.cat([mid, mid.nextafter(torch.tensor(0.0)), mid.nextafter(torch.tensor(1e9))])
    vals = torch.cat([vals, -vals, torch.tensor([448.0, 464.0, 1e30, -1e30])])  # >448 clamps
    if fmt == "nvfp4":
        # s = g * (vmax / 6) exactly when g = 6 * 2**k; each block is [vmax, 0, ...]
        x = torch.zeros(-(-len(vals) // 8) * 8, 16)
        x[: len(vals), 0] = vals.abs() * 6.0 / 512.0
        x = x.reshape(8, -1)  # the blocks in 8 tokens (fewer programs for the interpreter)
        spec = make_spec(fmt, x.shape[1], g=512.0)
    else:
        n = -(-len(vals) // 31) * 31
        body = torch.cat([vals, torch.zeros(n - len(vals))]).reshape(-1, 31)
        x = torch.cat([torch.full((body.shape[0], 1), 448.0), body], dim=1)  # amax 448
        spec = make_spec(fmt, x.shape[1])
    x = x.to(dtype).to(DEVICE)
    if dtype == torch.bfloat16:
        assert bool((x.float() == x.float().cpu().to(DEVICE)).all())
    check_dequantize(spec, check_pack(spec, x, {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_all_e2m1_ties(fmt, dtype):
    # Block amax 6 gives MX scale 2**0 and, with g = 256, nvfp4 s = 256 * fl(6 * RCP6) =
    # 256 * 1.0, S = 256 and out = 1/(256 * 2**-8) = 1: the values reach the e2m1 encoder
    # unchanged.
    # Ties: .25 -> 0, .75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4 (even codes).
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    if dtype == torch.bfloat16:
        near = _bf16_neighbours(ties)
        tiny = 2.0**-133  # a bf16 subnormal
    else:
        near = torch.cat([ties.nextafter(torch.tensor(0.0)), ties.nextafter(torch.tensor(9.0))])
        tiny = 1e-45
    vals = torch.cat([ties, near])
    vals = torch.cat([vals, -vals, torch.tensor([0.0, -0.0, 6.0, 7.0, -1e9, tiny])])
    blk = BLOCK[fmt]
    n = -(-len(vals) // (blk - 1)) * (blk - 1)
    body = torch.cat([vals, torch.zeros(n - len(vals))]).reshape(-1, blk - 1)
    x = torch.cat([torch.full((body.shape[0], 1), 6.0), body], dim=1).reshape(1, -1)
    spec = make_spec(fmt, x.shape[1], g=256.0)
    x = x.to(dtype).to(DEVICE)
    assert bool((x.float().cpu()[0, 1 : 1 + len(ties)] == ties).all())  # ties are exact
    check_dequantize(spec, check_pack(spec, x, {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_mx_extreme_scale_bytes(fmt, dtype):
    # Largest and smallest scale bytes a finite block can produce: b = 0 needs a tiny amax
    # (subnormals; v = x * 2**127), the top one the largest finite values
    # (mxfp4: b = 253, v = x * 2**-126). Plus blocks right at amax = M * 2**E and just above.
    # bf16 input takes the word path (on the GPU, mxfp4's bf16-pair encoder).
    m = 448.0 if fmt == "mxfp8" else 6.0
    fin = torch.finfo(dtype)
    at = torch.full((32,), m * 2.0**-130)
    big = torch.full((32,), m * 2.0**5)
    if dtype == torch.bfloat16:
        tiny, above = 2.0**-133, _bf16_neighbours(torch.stack([at, big]))[2:]
    else:
        tiny = 1e-45
        above = torch.stack([at.nextafter(torch.tensor(1.0)), big.nextafter(torch.tensor(1e9))])
    rows = [
        torch.full((32,), tiny),
        torch.linspace(-1e-39, 1e-39, 32),
        torch.linspace(-1.0, 1.0, 32) * fin.max,
        torch.full((32,), fin.max),
        at,
        above[0],
        big,
        above[1],
    ]
    x = torch.stack(rows).reshape(1, -1).to(dtype).to(DEVICE)
    xs = x.float().cpu().reshape(8, 32)
    assert bool((xs[5:8:2] > xs[4:7:2]).all())  # "above" is above
    spec = make_spec(fmt, x.shape[1])
    rows = check_pack(spec, x, {})
    scales = spec.unpack(rows).scales.view(torch.uint8).cpu()
    assert int(scales.min()) == 0 and int(scales.max()) >= 247
    check_dequantize(spec, rows)


@pytest.mark.parametrize("g", [2.0**-101, 2.0**-100, G, 2.0**100, 2.0**101])
def test_nvfp4_global_scale_range(g):
    # On the GPU, bf16 words within _NVFP4_PAIRS_G take the pair encoder (in units of 2**-6,
    # exact only while out * 2**-6 stays a normal fp32), the others the integer encoder:
    # both edges of the range and one step outside, on data calibrated for g (amax ~ 2688/g).
    spec = make_spec("nvfp4", 2048, g=g)
    assert _triton._pair_encoders(spec.wire_format) == (2.0**-100 <= g <= 2.0**100)
    assert _triton._pair_encoders(make_spec("mxfp4", 2048).wire_format)
    assert not _triton._pair_encoders(make_spec("mxfp8", 2048).wire_format)
    x = heavy_tailed(129, 2048)
    x = x * (2688.0 / g / float(x.abs().amax()))
    x[5, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2) * (6 * 448 / g)
    x = x.to(torch.bfloat16).to(DEVICE)
    assert bool(x.float().isfinite().all())
    check_dequantize(spec, check_pack(spec, x, {}))


@pytest.mark.parametrize("fmt", mw.FORMATS)
def test_dequantize_random_bytes(fmt):
    # Any bytes are a row: every e4m3 code (NaN 0x7F/0xFF included), every e8m0 byte (0 is
    # 2**-127, an fp32 subnormal; 255 is NaN), every nvfp4 scale, random fp32 scales.
    t, h = 4, 512
    spec = make_spec(fmt, h)
    rows = torch.randint(0, 256, (t, spec.row_bytes), dtype=torch.uint8)
    if fmt in ("fp8", "fp8_block128"):  # keep most fp32 scales finite and moderate
        s = torch.randn(t, spec.sections["scales"].numel).abs() * 1e-2
        rows[:, spec.sections["scales"].offset : spec.sections["scales"].end] = s.view(torch.uint8)
    rows[0, spec.sections["scales"].offset : spec.sections["scales"].end] = torch.arange(
        spec.sections["scales"].nbytes
    ).to(torch.uint8)
    check_dequantize(spec, rows.to(DEVICE))


def test_many_extras_and_misaligned_out():
    # 6 extras: the pack kernel writes 4, one more launch the rest. An out= whose data
    # pointer is not 16-byte aligned is packed through a temporary.
    decl = {f"e{i}": (torch.int16 if i % 2 else torch.float32, 1 + 5 * i) for i in range(6)}
    t, h = 5, 128
    spec = make_spec("nvfp4", h, decl)
    x = (heavy_tailed(t, h) * 3).to(DEVICE)
    extras = make_extras(t, decl)
    check_pack(spec, x, extras)
    ref = spec.pack(x, backend="torch", **extras)
    flat = torch.full((t * spec.row_bytes + 1,), 0xA5, dtype=torch.uint8, device=DEVICE)
    out = flat[1:].view(t, spec.row_bytes)
    assert torch.equal(spec.pack(x, out=out, backend="triton", **extras), ref)
    assert int(flat[0]) == 0xA5


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "nvfp4", "mxfp4"])
def test_one_spec_across_argument_specializations(fmt):
    """One spec packed and decoded with inputs whose pointers, strides and dtypes change
    from call to call (aligned, then not; one token, then many; extras misaligned): on the
    GPU the later calls reuse compiled kernels only where Triton's specialization is the
    same (``formats/_launch.py``), so every call must still match the reference."""
    decl = {"logits": (torch.float32, 5)}
    t, h = 6, 128
    spec = make_spec(fmt, h, decl)
    base = (heavy_tailed(t + 1, h + 9) * 3).to(DEVICE)
    ebase = torch.randn(t + 1, 6).to(DEVICE)
    inputs = [
        (base[:t, :h], ebase[:t, :5]),  # aligned rows (stride h + 9)
        (base[1 : t + 1, 1 : h + 1], ebase[1:, 1:]),  # misaligned pointers
        (base[:t, :h].contiguous(), ebase[:t, :5].contiguous()),  # contiguous
        (base[:1, 3 : h + 3], ebase[:1, :5]),  # one token, misaligned
        (base[:t, :h].bfloat16(), ebase[:t, :5]),  # another dtype
        (base[:t, :h].t().contiguous().t(), ebase[:t, :5]),  # column-major x
        (base[:t, :h], torch.randn(t, 10).to(DEVICE)[:, ::2]),  # strided extra columns
    ]
    for _ in range(2):  # the second round runs on kept kernels (GPU)
        for x, logits in inputs:
            rows = check_pack(spec, x, {"logits": logits})
            check_dequantize(spec, rows)
            check_dequantize(spec, rows[1:] if rows.shape[0] > 1 else rows)


def test_zero_tokens():
    for fmt in mw.FORMATS:
        spec = make_spec(fmt, 256, EXTRAS)
        x = torch.empty(0, 256, device=DEVICE)
        rows = spec.pack(x, backend="triton", **make_extras(0))
        assert rows.shape == (0, spec.row_bytes)
        assert spec.dequantize(rows, torch.float32, backend="triton").shape == (0, 256)
    spec = make_spec("nvfp4", 256)
    rows = torch.empty(0, spec.row_bytes, dtype=torch.uint8, device=DEVICE)
    assert _triton.gather_swizzled_scales(spec, rows).shape == (0, 16)


@pytest.mark.parametrize(("n", "h"), [(1, 256), (130, 256), (3, 16 * 5)])
def test_gather_swizzled_scales(n, h):
    # B = 16 and B = 5 (scale columns padded to Kp = 8); rows a strided slice of a buffer
    spec = make_spec("nvfp4", h)
    x = (heavy_tailed(n, h) * 3).to(DEVICE)
    buf = torch.zeros(n, spec.row_bytes + 48, dtype=torch.uint8, device=DEVICE)
    rows = spec.pack(x, out=buf[:, : spec.row_bytes], backend="torch")
    ref = mw.swizzle_128x4(spec.unpack(rows).scales)
    got = _triton.gather_swizzled_scales(spec, rows)
    assert got.dtype == torch.float8_e4m3fn and got.shape == ref.shape
    assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
    with pytest.raises(ValueError, match="nvfp4"):
        _triton.gather_swizzled_scales(make_spec("mxfp4", 256), rows)


_PTX_SCRIPT = textwrap.dedent(
    """
    import re, triton
    from triton.backends.compiler import GPUTarget
    from moewire.formats._kernels.pack import pack_kernel
    from moewire.formats._kernels.dequant import dequant_kernel

    def sig(fn, ptr, constexprs):
        out = {}
        for n in fn.arg_names:
            if n in constexprs: out[n] = "constexpr"
            elif n == "pads": out[n] = ("i32",) * 4
            elif n == "extras": out[n] = (("*u8", "i32", "i32", "i32", "i32"),) * 4
            elif n.endswith("_ptr"): out[n] = ptr(n)
            elif n in ("g", "inv_g", "rcp6"): out[n] = "fp32"
            else: out[n] = "i32"
        return out

    tiles = {0: (1, 2048), 1: (16, 128), 2: (64, 32), 3: (128, 16), 4: (64, 32)}
    for kind, (nblk, blkp) in tiles.items():
        for hw, words in ((True, True), (True, False), (False, True), (False, False)):
            common = dict(KIND=kind, NBLK=nblk, BLKP=blkp, FULL=True, HW=hw)
            ce = dict(common, HAS_TAIL=True, NUM_EXTRAS=1, EBLOCK=16, EITER=1, WORDS=words,
                      CHUNK_FAST=words, GROUP=3, DEPTH=2 if words else 1,
                      PMAJ=words and kind in (1, 2), PAIRS=hw and words and kind in (3, 4))
            ptr = lambda n: "*bf16" if n == "x_ptr" else "*u8"
            kernels = [(pack_kernel, sig(pack_kernel, ptr, ce), ce)]
            ce = dict(common, OUT=1)
            ptr = lambda n: "*bf16" if n == "out_ptr" else "*u8"
            kernels.append((dequant_kernel, sig(dequant_kernel, ptr, ce), ce))
            for fn, s, ce in kernels:
                src = triton.compiler.ASTSource(fn=fn, signature=s, constexprs=ce)
                ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
                # the compiler's code, without our inline asm, whose only fmas add an exact
                # product (e * 2**22, a power of two times a power of two: see pack.py)
                asm = re.findall(r"begin inline asm(.*?)end inline asm", ptx, flags=re.S)
                own = [ln for a in asm for ln in a.splitlines() if re.search(r"\\bfma\\.", ln)]
                exact = r"fma\\.rn\\.(f32 y[01], e[01], 0f[4C]A800000|bf16x2 s[0-3], e[0-3], c64)"
                if any(not re.search(exact, ln) for ln in own):
                    print("BAD asm fma", fn.__name__, kind, hw, own)
                ptx = re.sub(r"begin inline asm.*?end inline asm", "", ptx, flags=re.S)
                bad = re.findall(r"\\b\\w+(?:\\.\\w+)*\\.(?:ftz|approx|full)\\b[\\w.]*", ptx)
                fma = re.findall(r"\\bfma\\.\\w+\\.f32", ptx)
                if bad or fma:
                    print("BAD", fn.__name__, kind, hw, sorted(set(bad + fma)))
    print("done")
    """
)


def test_ptx_has_no_flush_to_zero_approximation_or_contraction():
    """Compile the kernels for sm_90 (no GPU needed) and read the PTX: no ``.ftz`` (a
    flushed subnormal would break MX scales of 2**-127 and subnormal inputs), no approximate
    division or reciprocal, and no ``fma`` contraction of the reference's separate roundings
    (the fp4 pair encoders' inline asm has fmas of its own, each adding an exact product:
    those, and only those, are allowed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _PTX_SCRIPT], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "BAD" not in proc.stdout, proc.stdout
    assert proc.stdout.strip().endswith("done")


# ---------------------------------------------------------------- full matrix (GPU)
@functools.cache
def _pool_f32(block: int) -> torch.Tensor:
    """fp32 [4097, 7168] on the GPU: even rows heavy-tailed, odd rows adversarial blocks."""
    t, h = 4097, 7168
    x = heavy_tailed(t, h) * 3
    x[1::2] = adversarial(t // 2, h, block=block)
    return x.cuda()


def _pool(block: int, dtype: torch.dtype) -> torch.Tensor:
    return _pool_f32(block).to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", mw.FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_full_matrix_gpu(fmt, dtype):
    pool = _pool(BLOCK[fmt], dtype)
    for h in (128, 2048, 4096, 7168):
        for t in (0, 1, 3, 127, 128, 129, 4097):
            spec = make_spec(fmt, h, EXTRAS, g=G_POW2 if t % 2 else G)
            x = pool[-t:, :h] if t else pool[:0, :h]  # starts on an odd or even row
            extras = make_extras(t, device="cuda")
            for hw in (True, False):
                for words in (True, False) if dtype == torch.bfloat16 else (True,):
                    rows = check_pack(spec, x, extras, hw=hw, words=words)
                check_dequantize(spec, rows, hw=hw)
            if fmt == "nvfp4":
                ref = mw.swizzle_128x4(spec.unpack(rows).scales).view(torch.uint8)
                got = _triton.gather_swizzled_scales(spec, rows).view(torch.uint8)
                assert torch.equal(got, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", mw.FORMATS)
def test_non_contiguous_large_gpu(fmt):
    t, h = 129, 7168
    x = _pool(BLOCK[fmt], torch.bfloat16)[: 2 * t : 2].t().contiguous().t()  # column-major
    assert x.stride(0) == 1
    spec = make_spec(fmt, h, EXTRAS)
    check_pack(spec, x, make_extras(t, device="cuda"))


@pytest.mark.gpu
def test_default_backend_is_triton_on_cuda():
    spec = make_spec("nvfp4", 256)
    x = torch.randn(4, 256, device="cuda")
    assert spec._pick_backend(None, x.device) == "triton"
    assert torch.equal(spec.pack(x), spec.pack(x, backend="torch"))
