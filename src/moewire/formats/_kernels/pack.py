"""Fused quantize + pack: activations ``x [T, H]`` -> complete wire rows ``[T, R]``, one pass.

A token's blocks are cut into chunks of ``NBLK`` blocks; one program quantizes ``GROUP``
consecutive chunks of one token (reading each value once, writing its payload and scale
bytes), and the program of the last chunk also writes the rest of row ``t``: the zero
padding after the payload and after the scales, and up to :data:`MAX_EXTRAS` extras (their
bytes verbatim, then zeros up to the next section). Every byte of the row is written
exactly once.

Rows are 16-byte aligned (the launcher guarantees it), so fp32 scales and bf16 payloads are
stored through typed pointers at their section offsets.

Two ways to read ``x``. The general one loads ``x[t, i]`` one value at a time (any dtype, any
strides). With ``WORDS`` (bfloat16 ``x`` with unit column stride and 4-byte aligned rows,
the common case, chosen by the launcher) the block formats read ``x`` as int32 words of two
bf16 values, shaped ``[NBLK, P, 4]`` (``P`` = words per block / 4), so that a thread holds
whole runs of a scale block (for the fp4 formats' small blocks, whole blocks: the absmax is a
reduction in registers), and the two values of a word give one packed byte (fp4) or one
e4m3 pair (fp8) without reshuffling values between threads. The e4m3 formats can use the
tile ``[P, NBLK, 4]`` instead (``PMAJ``): Triton then puts consecutive lanes along a block,
which coalesces their loads and stores (the block reductions cross lanes). Same fp32
operations, same bytes.

On the GPU (``PAIRS``) the fp4 formats' word path encodes two values per instruction where
it can, in inline PTX: the block amax is a lane-wise max of bf16 pairs; mxfp4 scales and
rounds in bf16 pairs (exact: ``x * 2**n`` of a bf16 ``x`` is a bf16); nvfp4 rounds in fp32
and turns the rounded values into codes with the e4m3x2 ``cvt``. :func:`_mxfp4_bytes_hw`
and :func:`_nvfp4_bytes_hw` say why each step is exact; the integer encoder of
``elements.py`` (interpreter, ``HW=False``) gives the same bytes, and the GPU tests compare
both with the torch reference.

Shape legend: ``T`` tokens, ``H`` hidden, ``R`` row bytes, ``NB`` scale blocks per token,
``NBLK`` blocks per chunk, ``GROUP`` chunks per program, ``BLKP`` values per block padded
to a power of two.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moewire.formats._kernels.elements import (
    canonical_nan_bits,
    decode_bf16,
    decode_e4m3,
    encode_bf16,
    encode_e2m1,
    encode_e2m1_mag,
    encode_e4m3,
    exp2i,
    mx_scale_byte,
)

KIND_BF16: tl.constexpr = tl.constexpr(0)
KIND_FP8: tl.constexpr = tl.constexpr(1)  # fp8 and fp8_block128: fp32 scale per block
KIND_MXFP8: tl.constexpr = tl.constexpr(2)
KIND_NVFP4: tl.constexpr = tl.constexpr(3)
KIND_MXFP4: tl.constexpr = tl.constexpr(4)
#: Extras written by the pack kernel itself; more go through :func:`extras_kernel`.
MAX_EXTRAS = 4


@triton.jit
def _load_x(x_ptr, t, sxt, sxh, idx, mask, HW: tl.constexpr):
    ptr = x_ptr + t * sxt + idx * sxh
    if x_ptr.dtype.element_ty == tl.bfloat16 and not HW:
        # bf16 -> fp32 from the bits (the interpreter's cast mishandles bf16 subnormals)
        b = tl.load(ptr.to(tl.pointer_type(tl.uint16)), mask=mask, other=0)
        x = decode_bf16(b.to(tl.int32))
    else:
        x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _absmax(a, b):
    # |.| max that propagates NaN (as torch's amax): a block with a NaN is non-finite
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _load_words(
    x_ptr,
    t,
    sxt,
    c,
    NB,
    NW,
    NBLK: tl.constexpr,
    P: tl.constexpr,
    FULL: tl.constexpr,
    PMAJ: tl.constexpr,
):
    """Chunk ``c`` of bf16 ``x[t]`` as int32 words ``[NBLK, P, 4]`` (block ``blk``: words
    ``4P*blk ..``), or ``[P, NBLK, 4]`` with ``PMAJ``: the same words, the block axis second,
    so that Triton spreads consecutive lanes along a block (coalesced loads and stores) rather
    than across blocks; the block reductions then cross lanes. Returns the tile
    ``(w, widx, m, blk, bm)``: the words, their index in the row, their mask, the chunk's
    block indices and the blocks' mask (a chunk past the last block loads nothing)."""
    blk = c * NBLK + tl.arange(0, NBLK)
    bm = blk < NB
    if PMAJ:
        widx = (
            tl.arange(0, P)[:, None, None] * 4
            + blk[None, :, None] * (4 * P)
            + tl.arange(0, 4)[None, None, :]
        )
    else:
        widx = (
            blk[:, None, None] * (4 * P)
            + tl.arange(0, P)[None, :, None] * 4
            + tl.arange(0, 4)[None, None, :]
        )
    m = _per_block(bm, PMAJ)
    if not FULL:  # fp8: one block of NW words, padded to 4P
        m = m & (widx < NW)
    w = tl.load((x_ptr + t * sxt).to(tl.pointer_type(tl.int32)) + widx, mask=m, other=0)
    return w, widx, m, blk, bm


@triton.jit
def _per_block(v, PMAJ: tl.constexpr):
    """``[NBLK]`` -> broadcastable against a word tile (see :func:`_load_words`)."""
    r = v[None, :, None] if PMAJ else v[:, None, None]
    return r


@triton.jit
def _split_words(w):
    """int32 words of two bf16 values -> the low and high values as fp32 (exact)."""
    lo = (w << 16).to(tl.float32, bitcast=True)
    hi = (w & -65536).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def _words_amax_bits(lo, hi, PMAJ: tl.constexpr):
    """Bits of each block's largest ``|x|`` (``[NBLK]``; a NaN if the block has one)."""
    a = _absmax(tl.abs(lo), tl.abs(hi))
    a = tl.reduce(a, 2, _absmax)
    a = tl.reduce(a, 0, _absmax) if PMAJ else tl.reduce(a, 1, _absmax)
    return a.to(tl.int32, bitcast=True)


@triton.jit
def _e4m3_pair(lo, hi, HW: tl.constexpr):
    """Two fp32 -> two e4m3 bytes in an int16 (``lo`` in the low byte). ``HW``: one
    ``cvt.rn.satfinite.e4m3x2.f32``; its saturation to +-448 is the clamp of the integer
    encoder, and a NaN product is the GPU's canonical NaN, encoded 0x7F (the tests check
    both paths byte for byte)."""
    if HW:
        q = tl.inline_asm_elementwise(
            "cvt.rn.satfinite.e4m3x2.f32 $0, $2, $1;",
            "=h,r,r",
            [lo, hi],
            dtype=tl.int16,
            is_pure=True,
            pack=1,
        )
    else:
        q = encode_e4m3(lo, False).to(tl.int16) | (encode_e4m3(hi, False).to(tl.int16) << 8)
    return q


@triton.jit
def _max_u16x2(a, b):
    """Lane-wise unsigned max of two pairs of 16-bit values (one ``vimnmx``, sm_90)."""
    return tl.inline_asm_elementwise(
        "max.u16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1
    )


def _signs_and_halves(shift: int, mask: str) -> str:
    """PTX shared by the fp4 pair encoders: with ``p``, ``q`` holding the code bytes of
    words 0-1 and 2-3 as ``[lo0, hi0, lo1, hi1]``, OR in each value's sign (bf16 bits 15 and
    31 of words ``$5..$8``, gathered in the same order, shifted right by ``shift`` within
    its byte and masked with ``mask``), then collect the four low values' bytes in ``l`` and
    the four high values' in ``h``."""
    return f"""
        prmt.b32 l, $5, $6, 0x7531;
        shr.u32 l, l, {shift};
        lop3.b32 p, l, {mask}, p, 0xEA;
        prmt.b32 h, $7, $8, 0x7531;
        shr.u32 h, h, {shift};
        lop3.b32 q, h, {mask}, q, 0xEA;
        prmt.b32 l, p, q, 0x6420;
        prmt.b32 h, p, q, 0x7531;"""


def _mxfp4_word(i: int) -> str:
    """PTX of :func:`_mxfp4_bytes_hw` for word ``i`` (operands ``$1+i`` = ``a``,
    ``$9+i`` = ``k2``): its two codes, each ``1024 + code`` in a 16-bit lane of ``s<i>``."""
    return f"""
        mul.rn.bf16x2 v, ${1 + i}, ${9 + i};
        max.bf16x2 e{i}, v, one;
        and.b32 e{i}, e{i}, 0x7F807F80;
        fma.rn.bf16x2 s{i}, e{i}, c64, v;
        sub.u32 s{i}, s{i}, e{i};
        add.u32 s{i}, s{i}, 0x00020002;
        shr.u32 t, e{i}, 6;
        add.u32 s{i}, s{i}, t;"""


#: Four words' codes, then the bytes: ``p``, ``q`` hold the codes of words 0-1 and 2-3 as
#: ``[lo0, hi0, lo1, hi1]`` (one byte each, from the lanes' low bytes), the signs (bits 15,
#: 31 of each word, gathered the same order) join them as bit 3, then ``l`` / ``h`` collect
#: the low and high codes of words 0-3 and ``h * 16 + l`` is the four bytes.
_MXFP4_ASM: tl.constexpr = tl.constexpr(
    """{
        .reg .b32 one, c64, v, e0, e1, e2, e3, s0, s1, s2, s3, t, p, q, l, h;
        mov.b32 one, 0x3F803F80;
        mov.b32 c64, 0x42804280;"""
    + "".join(_mxfp4_word(i) for i in range(4))
    + """
        prmt.b32 p, s0, s1, 0x6420;
        prmt.b32 q, s2, s3, 0x6420;"""
    + _signs_and_halves(4, "0x08080808")
    + """
        mad.lo.u32 t, h, 16, l;
        and.b32 $0, t, $13;
        }"""
)


def _nvfp4_word(i: int) -> str:
    """PTX of :func:`_nvfp4_bytes_hw` for word ``i`` (operands ``$1+i`` = ``a``,
    ``$9+i`` = ``k``): its two codes, shifted left by 2, as the two bytes of ``b<i>``."""
    return f"""
        shl.b32 x0, ${1 + i}, 16;
        and.b32 x1, ${1 + i}, 0xFFFF0000;
        mul.rn.f32 x0, x0, ${9 + i};
        mul.rn.f32 x1, x1, ${9 + i};
        min.f32 x0, x0, 0f3DC00000;
        min.f32 x1, x1, 0f3DC00000;
        max.f32 e0, x0, 0f3C800000;
        max.f32 e1, x1, 0f3C800000;
        and.b32 e0, e0, 0x7F800000;
        and.b32 e1, e1, 0x7F800000;
        fma.rn.f32 y0, e0, 0f4A800000, x0;
        fma.rn.f32 y1, e1, 0f4A800000, x1;
        fma.rn.f32 y0, e0, 0fCA800000, y0;
        fma.rn.f32 y1, e1, 0fCA800000, y1;
        cvt.rn.satfinite.e4m3x2.f32 b{i}, y1, y0;"""


#: Four words' codes (constants: 6 and 1 in units of 2**-6, +-2**22), then the bytes:
#: ``p``, ``q`` hold words 0-1 and 2-3 as ``[lo0, hi0, lo1, hi1]`` (codes in bits 2-4),
#: the signs join them as bit 5, ``l`` / ``h`` collect the low and high halves' bytes of
#: words 0-3, and ``l >> 2 | h << 2`` is the four bytes.
_NVFP4_ASM: tl.constexpr = tl.constexpr(
    """{
        .reg .b32 x0, x1, y0, y1, e0, e1, p, q, l, h;
        .reg .b16 b0, b1, b2, b3;"""
    + "".join(_nvfp4_word(i) for i in range(4))
    + """
        mov.b32 p, {b0, b1};
        mov.b32 q, {b2, b3};"""
    + _signs_and_halves(2, "0x20202020")
    + """
        shr.u32 l, l, 2;
        shl.b32 h, h, 2;
        or.b32 l, l, h;
        and.b32 $0, l, $13;
        }"""
)


@triton.jit
def _four_words_asm(asm: tl.constexpr, a, w, k, keep):
    """Run a pair encoder's PTX on ``[.., 4]`` int32 tiles: four consecutive words of each
    of ``a``, ``w``, ``k``, ``keep`` in, their four bytes out as one register."""
    return tl.inline_asm_elementwise(
        asm, "=r" + ",r" * 16, [a, w, k, keep], dtype=tl.uint8, is_pure=True, pack=4
    )


@triton.jit
def _mxfp4_bytes_hw(a, w, k2, keep):
    """mxfp4 bytes of four consecutive bf16 words at once, two values per instruction
    (GPU only; ``[.., 4]`` int32 in, ``[.., 4]`` uint8 out as one register).

    ``a`` is ``w`` with the sign bits cleared, ``k2`` the block's ``2**-(b-127)`` as a
    bf16 pair, ``keep`` 0 for a non-finite block (else -1). The element rule in bf16 pairs,
    exact because every step is:

    * ``v = |x| * 2**n`` (``mul.rn.bf16x2``): a power-of-two scaling of a bf16 value, exact
      unless ``|v| < 2**-126``, which encodes as 0 either way; ``|v| <= 6`` by the scale rule.
    * ``s = e * 64 + v`` (``fma.rn.bf16x2``, one rounding), ``e = 2**max(floor(log2 v), 0)``
      from the exponent bits of ``max(v, 1)``: the spacing of bf16 at ``64e`` is ``e / 2``,
      the e2m1 grid's spacing in ``v``'s binade, so ``s`` is ``64e + j * e / 2`` with ``v``
      rounded to nearest, ties to even ``j``, exactly as :func:`encode_e2m1_mag` does in fp32
      with ``2**22``.
    * ``code = j + 2 * log2(e)``: in each 16-bit lane ``bits(s) - bits(e) = 768 + j`` and
      ``bits(e) >> 6 = 254 + 2 * log2(e)``, so ``bits(s) - bits(e) + (bits(e) >> 6) + 2`` is
      ``1024 + code``; its low byte is the code. No lane borrows from or carries into the
      other (``s >= 64e``, all below ``2**16``).

    Byte ``j`` of the result is ``code_hi << 4 | code_lo`` with the signs of word ``j``
    (bits 15, 31) in bits 3 and 7, ANDed with ``keep``. The GPU tests check every byte
    against the torch reference."""
    return _four_words_asm(_MXFP4_ASM, a, w, k2, keep)


@triton.jit
def _nvfp4_bytes_hw(a, w, k, keep):
    """nvfp4 bytes of four consecutive bf16 words at once (GPU only; ``[.., 4]`` int32 in,
    ``[.., 4]`` uint8 out as one register).

    ``a`` is ``w`` with the sign bits cleared, ``k`` the block's ``out * 2**-6`` (fp32;
    the launcher only takes this path when that scaling is exact, see ``_triton.pack``),
    ``keep`` 0 for a non-finite block (else -1). Per value, in fp32, everything in units of
    ``2**-6`` (exact: scaling by a power of two commutes with every rounding here, except
    below ``2**-120``, where the code is 0 either way):

    * ``p = |x| * k``, the reference's ``x * out`` (one rounding), saturated at 6;
    * ``s = e * 2**22 + p`` (``fma.rn.f32``: ``e * 2**22`` is exact, so this is the
      reference encoder's single fp32 addition), ``e`` the exponent bits of
      ``max(p, 1)``: ``p`` rounded to the e2m1 grid, ties to even (:func:`encode_e2m1_mag`);
    * ``r = s - e * 2**22`` (exact) is a grid value ``{0, .5, 1, 1.5, 2, 3, 4, 6} * 2**-6``,
      whose e4m3 byte (``cvt.rn.satfinite.e4m3x2.f32``, exact on these values) is the e2m1
      code shifted left by 2: ``2**-6`` is e4m3's smallest normal, so 0.5 is its subnormal
      ``4 * 2**-9`` and the exponent and top mantissa bit line up with e2m1's.

    Byte ``j`` of the result is ``code_hi << 4 | code_lo`` with the signs of word ``j``
    (bits 15, 31) in bits 3 and 7, ANDed with ``keep``."""
    return _four_words_asm(_NVFP4_ASM, a, w, k, keep)


@triton.jit
def _quant_e4m3_words(
    tile,
    row_ptr,
    scale_off,
    KIND: tl.constexpr,
    NBLK: tl.constexpr,
    HW: tl.constexpr,
    PMAJ: tl.constexpr,
):
    w, widx, m, blk, bm = tile
    lo, hi = _split_words(w)
    amax_bits = _words_amax_bits(lo, hi, PMAJ)
    if KIND == KIND_FP8:
        amax = amax_bits.to(tl.float32, bitcast=True)
        a = tl.where(amax_bits > 0x7F800000, amax, tl.maximum(amax, 1e-4))
        k = _per_block(tl.math.div_rn(tl.full([NBLK], 448.0, tl.float32), a), PMAJ)
        q = _e4m3_pair(lo * k, hi * k, HW)
        s = tl.math.div_rn(a, tl.full([NBLK], 448.0, tl.float32))
        s_ptr = (row_ptr + scale_off).to(tl.pointer_type(tl.int32))
        tl.store(s_ptr + blk, canonical_nan_bits(s), mask=bm)
    else:
        bad = amax_bits >= 0x7F800000
        b = mx_scale_byte(tl.where(bad, 0, amax_bits), 9, 0x600000)  # 448 = 0.875 * 2**9
        k = _per_block(exp2i(127 - b), PMAJ)
        q = _e4m3_pair(lo * k, hi * k, HW) & _per_block(tl.where(bad, 0, -1).to(tl.int16), PMAJ)
        tl.store(row_ptr + scale_off + blk, tl.where(bad, 0xFF, b).to(tl.uint8), mask=bm)
    tl.store(row_ptr.to(tl.pointer_type(tl.int16)) + widx, q, mask=m)


@triton.jit
def _quant_e2m1_words(
    tile,
    row_ptr,
    scale_off,
    g,
    inv_g,
    rcp6,
    KIND: tl.constexpr,
    NBLK: tl.constexpr,
    HW: tl.constexpr,
    PAIRS: tl.constexpr,
):
    w, widx, m, blk, bm = tile
    if PAIRS:
        # |x| as bf16 bits, two per word; their lane-wise max is the block's amax (integer
        # order is magnitude order; a NaN is above Inf, so it propagates)
        a = w & 0x7FFF7FFF
        mm = tl.reduce(tl.reduce(a, 2, _max_u16x2), 1, _max_u16x2)
        amax_bits = tl.maximum(mm & 0xFFFF, (mm >> 16) & 0xFFFF) << 16
    else:
        lo, hi = _split_words(w)
        amax_bits = _words_amax_bits(lo, hi, False)
    bad = amax_bits >= 0x7F800000
    keep = tl.where(bad, 0, -1)[:, None, None]
    if KIND == KIND_NVFP4:
        vmax = amax_bits.to(tl.float32, bitcast=True)
        s = g * (vmax * rcp6)
        sb = encode_e4m3(tl.minimum(s, 448.0), HW)
        sv = decode_e4m3(sb, HW)
        one = tl.full([NBLK], 1.0, tl.float32)
        k = tl.where(sv == 0.0, 0.0, tl.math.div_rn(one, sv * inv_g))[:, None, None]
        sb = tl.where(bad, 0x7F, sb).to(tl.uint8)
        if PAIRS:
            k6 = tl.broadcast_to(k * 0.015625, w.shape)  # exact: the launcher checked g
            byte = _nvfp4_bytes_hw(a, w, k6, tl.broadcast_to(keep, w.shape))
        else:
            byte = _e2m1_bytes(w, lo * k, hi * k, keep, True)
    else:
        b = mx_scale_byte(tl.where(bad, 0, amax_bits), 3, 0x400000)  # 6 = 0.75 * 2**3
        sb = tl.where(bad, 0xFF, b).to(tl.uint8)
        if PAIRS:
            n = 127 - b  # 2**n as bf16 bits (b <= 253 for a finite amax: n >= -126)
            k2 = (tl.where(n >= -126, (n + 127) << 7, 0x40) * 0x10001)[:, None, None]
            byte = _mxfp4_bytes_hw(
                a, w, tl.broadcast_to(k2, w.shape), tl.broadcast_to(keep, w.shape)
            )
        else:
            k = exp2i(127 - b)[:, None, None]
            # |x| * 2**(127-b) <= 6 by the choice of b: no saturation needed
            byte = _e2m1_bytes(w, lo * k, hi * k, keep, False)
    tl.store(row_ptr + widx, byte, mask=m)
    tl.store(row_ptr + scale_off + blk, sb, mask=bm)


@triton.jit
def _e2m1_bytes(w, plo, phi, keep, SAT: tl.constexpr):
    """Packed e2m1 bytes of words ``w`` from the scaled values of their low and high halves
    (integer encoder, exact everywhere); the products' signs are the inputs' (the scale is
    >= 0): bf16 sign bits 15 and 31 -> 3 and 7. ``keep``: 0 for a non-finite block."""
    code_lo = encode_e2m1_mag(plo, SAT)
    code_hi = encode_e2m1_mag(phi, SAT)
    sign = w.to(tl.uint32, bitcast=True) & 0x80008000
    code = (code_lo + (code_hi << 4)).to(tl.uint32, bitcast=True)
    byte = code | (sign >> 12) | (sign >> 24)
    return byte.to(tl.uint8) & keep.to(tl.uint8)


@triton.jit
def _quant_bf16(x_ptr, t, sxt, sxh, row_ptr, c, H, BLKP: tl.constexpr, HW: tl.constexpr):
    i = c * BLKP + tl.arange(0, BLKP)
    m = i < H
    x = _load_x(x_ptr, t, sxt, sxh, i, m, HW)
    tl.store(row_ptr.to(tl.pointer_type(tl.int16)) + i, encode_bf16(x).to(tl.int16), mask=m)


@triton.jit
def _quant_e4m3_blocks(
    x_ptr,
    t,
    sxt,
    sxh,
    row_ptr,
    c,
    H,
    NB,
    scale_off,
    KIND: tl.constexpr,
    NBLK: tl.constexpr,
    BLKP: tl.constexpr,
    FULL: tl.constexpr,
    HW: tl.constexpr,
):
    blk = c * NBLK + tl.arange(0, NBLK)
    idx = blk[:, None] * BLKP + tl.arange(0, BLKP)[None, :]
    bm = blk < NB
    m = bm[:, None]
    if not FULL:  # fp8: one block of H values, padded to BLKP
        m = m & (idx < H)
    x = _load_x(x_ptr, t, sxt, sxh, idx, m, HW)
    # amax on the magnitudes' bits: integer order is float order, and NaN (> 0x7F800000)
    # propagates the way torch's amax does.
    amax_bits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
    if KIND == KIND_FP8:
        amax = amax_bits.to(tl.float32, bitcast=True)
        a = tl.where(amax_bits > 0x7F800000, amax, tl.maximum(amax, 1e-4))
        k = tl.math.div_rn(tl.full([NBLK], 448.0, tl.float32), a)
        q = encode_e4m3(x * k[:, None], HW)
        s = tl.math.div_rn(a, tl.full([NBLK], 448.0, tl.float32))
        s_ptr = (row_ptr + scale_off).to(tl.pointer_type(tl.int32))
        tl.store(s_ptr + blk, canonical_nan_bits(s), mask=bm)
    else:
        bad = amax_bits >= 0x7F800000
        b = mx_scale_byte(tl.where(bad, 0, amax_bits), 9, 0x600000)  # 448 = 0.875 * 2**9
        q = encode_e4m3(x * exp2i(127 - b)[:, None], HW)
        q = q & tl.where(bad, 0, 0xFF).to(tl.uint8)[:, None]  # non-finite block: zero codes
        tl.store(row_ptr + scale_off + blk, tl.where(bad, 0xFF, b).to(tl.uint8), mask=bm)
    tl.store(row_ptr + idx, q, mask=m)


@triton.jit
def _quant_e2m1_blocks(
    x_ptr,
    t,
    sxt,
    sxh,
    row_ptr,
    c,
    NB,
    scale_off,
    g,
    inv_g,
    rcp6,
    KIND: tl.constexpr,
    NBLK: tl.constexpr,
    BLKP: tl.constexpr,
    HW: tl.constexpr,
):
    HALF: tl.constexpr = BLKP // 2
    blk = c * NBLK + tl.arange(0, NBLK)
    bm = blk < NB
    x = _load_x(
        x_ptr, t, sxt, sxh, blk[:, None] * BLKP + tl.arange(0, BLKP)[None, :], bm[:, None], HW
    )
    amax_bits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
    bad = amax_bits >= 0x7F800000
    if KIND == KIND_NVFP4:
        vmax = amax_bits.to(tl.float32, bitcast=True)
        s = g * (vmax * rcp6)
        sb = encode_e4m3(tl.minimum(s, 448.0), HW)
        sv = decode_e4m3(sb, HW)
        one = tl.full([NBLK], 1.0, tl.float32)
        out = tl.where(sv == 0.0, 0.0, tl.math.div_rn(one, sv * inv_g))
        codes = encode_e2m1(x * out[:, None])
        sb = tl.where(bad, 0x7F, sb).to(tl.uint8)
    else:
        b = mx_scale_byte(tl.where(bad, 0, amax_bits), 3, 0x400000)  # 6 = 0.75 * 2**3
        codes = encode_e2m1(x * exp2i(127 - b)[:, None])
        sb = tl.where(bad, 0xFF, b).to(tl.uint8)
    lo, hi = tl.split(tl.reshape(codes, [NBLK, HALF, 2]))
    packed = (lo | (hi << 4)).to(tl.uint8) & tl.where(bad, 0, 0xFF).to(tl.uint8)[:, None]
    j = tl.arange(0, HALF)
    tl.store(row_ptr + blk[:, None] * HALF + j[None, :], packed, mask=bm[:, None])
    tl.store(row_ptr + scale_off + blk, sb, mask=bm)


@triton.jit
def _zero_fill(row_ptr, lo, hi):
    i = lo + tl.arange(0, 16)  # padding gaps are shorter than 16 bytes
    tl.store(row_ptr + i, tl.zeros([16], tl.uint8), mask=i < hi)


@triton.jit
def _copy_extra(
    row_ptr, t, e_ptr, e_st, off, nbytes, span, EBLOCK: tl.constexpr, EITER: tl.constexpr
):
    src = e_ptr + t * e_st
    # a compile-time trip count: the interpreter cannot iterate over a runtime range
    for it in tl.static_range(EITER):
        i = it * EBLOCK + tl.arange(0, EBLOCK)
        v = tl.load(src + i, mask=i < nbytes, other=0)
        tl.store(row_ptr + off + i, v, mask=i < span)


@triton.jit
def _copy_extras(
    row_ptr,
    t,
    e0_ptr,
    e0_st,
    e0_off,
    e0_nb,
    e0_span,
    e1_ptr,
    e1_st,
    e1_off,
    e1_nb,
    e1_span,
    e2_ptr,
    e2_st,
    e2_off,
    e2_nb,
    e2_span,
    e3_ptr,
    e3_st,
    e3_off,
    e3_nb,
    e3_span,
    NUM_EXTRAS: tl.constexpr,
    EBLOCK: tl.constexpr,
    EITER: tl.constexpr,
):
    if NUM_EXTRAS > 0:
        _copy_extra(row_ptr, t, e0_ptr, e0_st, e0_off, e0_nb, e0_span, EBLOCK, EITER)
    if NUM_EXTRAS > 1:
        _copy_extra(row_ptr, t, e1_ptr, e1_st, e1_off, e1_nb, e1_span, EBLOCK, EITER)
    if NUM_EXTRAS > 2:
        _copy_extra(row_ptr, t, e2_ptr, e2_st, e2_off, e2_nb, e2_span, EBLOCK, EITER)
    if NUM_EXTRAS > 3:
        _copy_extra(row_ptr, t, e3_ptr, e3_st, e3_off, e3_nb, e3_span, EBLOCK, EITER)


@triton.jit
def pack_kernel(
    x_ptr,
    sxt,
    sxh,
    rows_ptr,
    srt,
    H,
    NB,
    scale_off,
    n_groups,
    g,
    inv_g,
    rcp6,
    pad0_lo,
    pad0_hi,
    pad1_lo,
    pad1_hi,
    e0_ptr,
    e0_st,
    e0_off,
    e0_nb,
    e0_span,
    e1_ptr,
    e1_st,
    e1_off,
    e1_nb,
    e1_span,
    e2_ptr,
    e2_st,
    e2_off,
    e2_nb,
    e2_span,
    e3_ptr,
    e3_st,
    e3_off,
    e3_nb,
    e3_span,
    KIND: tl.constexpr,
    NBLK: tl.constexpr,
    BLKP: tl.constexpr,
    FULL: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    NUM_EXTRAS: tl.constexpr,
    EBLOCK: tl.constexpr,
    EITER: tl.constexpr,
    HW: tl.constexpr,
    WORDS: tl.constexpr,
    CHUNK_FAST: tl.constexpr,
    GROUP: tl.constexpr,
    DEPTH: tl.constexpr,
    PMAJ: tl.constexpr,
    PAIRS: tl.constexpr,
):
    """Program ``(t, p)``: chunks ``p * GROUP ..`` (``GROUP`` chunks of NBLK blocks each) of
    token ``t``; the program of the last chunk also writes the token's tail bytes (one
    thread block fewer per token). On the word path the program loads its next chunk (or
    next two: ``DEPTH``) before it quantizes the current one, so loads are in flight
    during the arithmetic. ``PMAJ``: the word tiles' block axis second (e4m3 formats only;
    see :func:`_load_words`). ``PAIRS``: the fp4 formats' pair encoders (GPU only; the
    launcher decides, see ``_triton._pair_encoders``).
    ``CHUNK_FAST``: the grid is ``(n_groups, T)`` (consecutive programs walk along one row;
    the launcher keeps ``T`` within the grid's second dimension); otherwise ``(T, n_groups)``."""
    if CHUNK_FAST:
        grp = tl.program_id(0)
        t = tl.program_id(1).to(tl.int64)
    else:
        t = tl.program_id(0).to(tl.int64)
        grp = tl.program_id(1)
    row_ptr = rows_ptr + t * srt
    c0 = grp * GROUP
    if WORDS:
        NW = H // 2
        P: tl.constexpr = BLKP // 8
        # tile: the chunk to quantize now; nxt, nxt2: the next ones, already loading
        tile = _load_words(x_ptr, t, sxt, c0, NB, NW, NBLK, P, FULL, PMAJ)
        if DEPTH > 1 and GROUP > 1:
            nxt = _load_words(x_ptr, t, sxt, c0 + 1, NB, NW, NBLK, P, FULL, PMAJ)
        for i in tl.static_range(GROUP):
            if DEPTH > 1 and i + 2 < GROUP:
                nxt2 = _load_words(x_ptr, t, sxt, c0 + i + 2, NB, NW, NBLK, P, FULL, PMAJ)
            elif DEPTH == 1 and i + 1 < GROUP:
                nxt = _load_words(x_ptr, t, sxt, c0 + i + 1, NB, NW, NBLK, P, FULL, PMAJ)
            if KIND == KIND_FP8 or KIND == KIND_MXFP8:  # noqa: SIM109 (constexpr test)
                _quant_e4m3_words(tile, row_ptr, scale_off, KIND, NBLK, HW, PMAJ)
            else:
                _quant_e2m1_words(tile, row_ptr, scale_off, g, inv_g, rcp6, KIND, NBLK, HW, PAIRS)
            if i + 1 < GROUP:
                tile = nxt
            if DEPTH > 1 and i + 2 < GROUP:
                nxt = nxt2
    else:
        for i in tl.static_range(GROUP):
            c = c0 + i
            if KIND == KIND_BF16:
                _quant_bf16(x_ptr, t, sxt, sxh, row_ptr, c, H, BLKP, HW)
            elif KIND == KIND_FP8 or KIND == KIND_MXFP8:  # noqa: SIM109 (constexpr test)
                _quant_e4m3_blocks(
                    x_ptr, t, sxt, sxh, row_ptr, c, H, NB, scale_off, KIND, NBLK, BLKP, FULL, HW
                )
            else:
                _quant_e2m1_blocks(
                    x_ptr,
                    t,
                    sxt,
                    sxh,
                    row_ptr,
                    c,
                    NB,
                    scale_off,
                    g,
                    inv_g,
                    rcp6,
                    KIND,
                    NBLK,
                    BLKP,
                    HW,
                )
    if HAS_TAIL:  # noqa: SIM102 (a constexpr test, then a runtime one)
        if grp == n_groups - 1:
            _zero_fill(row_ptr, pad0_lo, pad0_hi)
            _zero_fill(row_ptr, pad1_lo, pad1_hi)
            _copy_extras(
                row_ptr,
                t,
                e0_ptr,
                e0_st,
                e0_off,
                e0_nb,
                e0_span,
                e1_ptr,
                e1_st,
                e1_off,
                e1_nb,
                e1_span,
                e2_ptr,
                e2_st,
                e2_off,
                e2_nb,
                e2_span,
                e3_ptr,
                e3_st,
                e3_off,
                e3_nb,
                e3_span,
                NUM_EXTRAS,
                EBLOCK,
                EITER,
            )


@triton.jit
def extras_kernel(
    rows_ptr,
    srt,
    e0_ptr,
    e0_st,
    e0_off,
    e0_nb,
    e0_span,
    e1_ptr,
    e1_st,
    e1_off,
    e1_nb,
    e1_span,
    e2_ptr,
    e2_st,
    e2_off,
    e2_nb,
    e2_span,
    e3_ptr,
    e3_st,
    e3_off,
    e3_nb,
    e3_span,
    NUM_EXTRAS: tl.constexpr,
    EBLOCK: tl.constexpr,
    EITER: tl.constexpr,
):
    """Grid ``(T,)``: extras beyond the first :data:`MAX_EXTRAS`, in groups of that many."""
    t = tl.program_id(0).to(tl.int64)
    _copy_extras(
        rows_ptr + t * srt,
        t,
        e0_ptr,
        e0_st,
        e0_off,
        e0_nb,
        e0_span,
        e1_ptr,
        e1_st,
        e1_off,
        e1_nb,
        e1_span,
        e2_ptr,
        e2_st,
        e2_off,
        e2_nb,
        e2_span,
        e3_ptr,
        e3_st,
        e3_off,
        e3_nb,
        e3_span,
        NUM_EXTRAS,
        EBLOCK,
        EITER,
    )
