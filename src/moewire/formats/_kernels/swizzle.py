"""nvfp4 block scales of gathered rows -> the 128x4 swizzled layout of the NVFP4 GEMMs.

Reads the scale section of rows ``[N, R]`` in place (no intermediate ``[N, B]`` copy) and
writes ``[Mp, Kp]`` (``Mp = ceil(N/128)*128``, ``Kp = ceil(B/4)*4``) with zero padding, where
``(m, b)`` lands at ``(m//128)*(Kp/4)*512 + (b//4)*512 + (m%32)*16 + ((m//32)%4)*4 + b%4``
(WIRE_FORMATS.md, "Scale layout").

Grid ``(Mp/128, cdiv(Kp/4, KGB))``: one program writes ``KGB`` consecutive 512-byte tiles of
one 128-row band, contiguously.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def swizzle_kernel(rows_ptr, srt, scale_off, out_ptr, N, B, KG, KGB: tl.constexpr):
    """``KG = Kp/4`` tiles per 128-row band."""
    mt = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, KGB * 512)
    kg = tl.program_id(1) * KGB + i // 512
    w = i % 512
    m = mt * 128 + ((w // 4) % 4) * 32 + w // 16
    b = kg * 4 + w % 4
    v = tl.load(rows_ptr + m * srt + scale_off + b, mask=(m < N) & (b < B), other=0)
    tl.store(out_ptr + (mt * KG + kg) * 512 + w, v, mask=kg < KG)
