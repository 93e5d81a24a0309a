"""The fp4 formats' pair encoders (GPU only, ``PAIRS``): inline PTX that turns four bf16
words (eight values) into four packed e2m1 bytes, two values per instruction where it can.
:func:`mxfp4_bytes_hw` and :func:`nvfp4_bytes_hw` say why each step is exact; the integer
encoder of ``elements.py`` gives the same bytes, and the GPU tests compare both with the
torch reference. A different instruction sequence from ``e2m1.py``'s, kept apart from it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def max_u16x2(a, b):
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
    """PTX of :func:`mxfp4_bytes_hw` for word ``i`` (operands ``$1+i`` = ``a``,
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
    """PTX of :func:`nvfp4_bytes_hw` for word ``i`` (operands ``$1+i`` = ``a``,
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
def mxfp4_bytes_hw(a, w, k2, keep):
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
def nvfp4_bytes_hw(a, w, k, keep):
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
