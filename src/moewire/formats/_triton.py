"""Triton launchers of the wire formats: validate, allocate, pick the grid.

``WireSpec.pack`` / ``WireSpec.dequantize`` call :func:`pack` / :func:`dequantize` for CUDA
tensors when Triton is importable (or when ``backend="triton"``); this module imports
``triton`` at the top, and ``moewire.formats.spec`` imports it only on that path, so a
CPU-only install never touches Triton. The ``@triton.jit`` code is in ``_kernels/``.

The kernels are bit-exact to the torch reference (``moewire.formats.*``): same fp32
operations in the same order, correctly rounded division (``tl.math.div_rn``), element
codes by integer bit manipulation (exact on the GPU and under ``TRITON_INTERPRET=1``),
explicit clamps before every fp8 encode, NaN written as the canonical quiet NaN. On a
CUDA device the e4m3 encode/decode use the hardware ``cvt`` (round to nearest even, after
the same explicit clamp), and bf16 input to the fp4 formats goes through pair encoders
(two values per instruction, exact by construction: ``_kernels/pack.py``); the tests check
every path on the GPU.

Shape legend: ``T`` tokens, ``N`` rows (e.g. gathered from every rank), ``H`` hidden,
``R`` row bytes, ``B`` nvfp4 scale blocks per token (``H/16``), ``Mp``/``Kp`` the swizzled
scale layout's padded sizes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from moewire.constants import (
    E2M1_MAX,
    E4M3_MAX,
    FP8_BLOCK128,
    MX_BLOCK,
    NVFP4_BLOCK,
    ROW_ALIGN,
    SWIZZLE_COLS,
    SWIZZLE_ROWS,
)
from moewire.formats._kernels.dequant import dequant_kernel
from moewire.formats._kernels.pack import MAX_EXTRAS, extras_kernel, pack_kernel
from moewire.formats._kernels.swizzle import swizzle_kernel

__all__ = ["Decoder", "decoder", "dequantize", "gather_swizzled_scales", "pack"]

_KIND = {"bf16": 0, "fp8": 1, "fp8_block128": 1, "mxfp8": 2, "nvfp4": 3, "mxfp4": 4}
_BLOCK = {"fp8_block128": FP8_BLOCK128, "mxfp8": MX_BLOCK, "nvfp4": NVFP4_BLOCK, "mxfp4": MX_BLOCK}
_OUT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class _Tile(NamedTuple):
    """How the pack kernel tiles one format (see ``_kernels/pack.py``)."""

    chunk: int  # activation values per chunk (fp8: 0, the chunk is the whole token)
    per_thread: int  # values per thread: num_warps = chunk / (32 * per_thread), 1..16
    chunk_fast: bool = True  # grid (n_groups, T), consecutive programs along a row
    group: int = 1  # chunks per program
    depth: int = 1  # chunks a program loads ahead of the one it quantizes (1 or 2)
    p_major: bool = False  # e4m3 word tiles with the block axis second (coalesced lanes)


#: The tiles, swept with ``tools/pack_sweep.py`` on an H200 at T=8192, H=7168, bf16 ``x``
#: read as words (BENCHMARKS.md has the figures). fp8's chunk is one whole token (its
#: scale block), so only the values per thread and the grid order apply to it.
_TUNED = {
    "bf16": _Tile(1024, 32),
    "fp8": _Tile(0, 32),
    "fp8_block128": _Tile(1024, 32, p_major=True),
    "mxfp8": _Tile(1024, 16, p_major=True),
    "nvfp4": _Tile(2048, 16, group=4, depth=2),
    "mxfp4": _Tile(1024, 16, group=2),
}
#: The dequantize kernel's tiles: (values per program, values per thread), as the pack
#: kernel's were at commit 091212b (BENCHMARKS.md's table of 2026-11-28 measured them).
_DEQ_TUNED = {
    "bf16": (4096, 16),
    "fp8": (0, 32),
    "fp8_block128": (1024, 32),
    "mxfp8": (1024, 16),
    "nvfp4": (1024, 16),
    "mxfp4": (1024, 32),
}
#: Use the GPU's fp8 ``cvt`` instructions on CUDA (False: the integer path everywhere).
_HW_E4M3 = True
#: CUDA's limit on a grid's second dimension (the token axis of a chunk-fastest pack grid).
_MAX_GRID_Y = 65535
#: 512-byte swizzled tiles written by one program of the swizzle kernel.
_SWIZZLE_TILES = 8

# The MX scale rule needs frexp of the element's largest value: 448 = 0.875 * 2**9 and
# 6 = 0.75 * 2**3. The kernels hard-code (9, 0x600000) and (3, 0x400000); check them here.
assert math.frexp(E4M3_MAX) == (0.875, 9) and math.frexp(E2M1_MAX) == (0.75, 3)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _interpreting() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1``
    when this module was first imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(pack_kernel, InterpretedFunction)


def _check_device(t: torch.Tensor, name: str) -> None:
    if t.device.type == "cuda" or (_interpreting() and t.device.type == "cpu"):
        return
    raise ValueError(
        f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
        f"{name} is on {t.device}"
    )


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % ROW_ALIGN == 0 and (t.shape[0] <= 1 or t.stride(0) % ROW_ALIGN == 0)


def _warps(values: int, per_thread: int) -> int:
    return max(1, min(16, values // (32 * per_thread)))


class _Cut(NamedTuple):
    """One format's row cut into chunks of values (see :func:`_chunking`)."""

    nb: int  # scale blocks per token (bf16: chunks)
    nblk: int  # blocks per chunk
    blkp: int  # values per block, padded to a power of two
    full: bool  # no column mask (only fp8 with H not a power of two has one)
    n_chunks: int  # chunks per token
    num_warps: int


@dataclass(frozen=True)
class _Layout:
    """How the kernels tile one format's row (derived from a WireSpec once, cached)."""

    kind: int
    nb: int  # scale blocks per token (bf16: chunks)
    nblk: int  # blocks per program
    blkp: int  # values per block, padded to a power of two
    full: bool  # no column mask (only fp8 with H not a power of two has one)
    n_chunks: int  # chunks per token (dequantize: programs per token)
    group: int  # chunks per pack program
    n_groups: int  # pack programs per token
    depth: int  # chunks a pack program loads ahead
    p_major: bool  # e4m3 word tiles with the block axis second
    scale_off: int
    pad0: tuple[int, int]  # zero bytes between payload and scales
    pad1: tuple[int, int]  # zero bytes after the scales (up to the first extra or R)
    extras: tuple[tuple[str, int, int, int], ...]  # (name, offset, nbytes, span incl. padding)
    eblock: int  # bytes per extra-copy step
    eiter: int  # steps per extra (compile-time)
    num_warps: int
    chunk_fast: bool  # pack grid order (see _TUNED)
    dq: _Cut  # the dequantize kernel's own cut of the row (_DEQ_TUNED)


@functools.lru_cache(maxsize=256)
def _layout(spec) -> _Layout:
    fmt, h = spec.format, spec.hidden
    chunk, per_thread, chunk_fast, group, depth, p_major = _TUNED[fmt]
    if p_major and fmt not in ("fp8", "fp8_block128", "mxfp8"):
        raise ValueError(f"p_major is for the e4m3 formats, not {fmt}")
    if depth not in (1, 2):
        raise ValueError(f"depth (chunks loaded ahead) must be 1 or 2, got {depth}")
    nb, nblk, blkp, full, n_chunks, warps = _chunking(fmt, h, chunk, per_thread)
    sec = spec.sections
    order = list(sec.values())
    nxt = [s.offset for s in order[1:]] + [spec.row_bytes]
    span = {s.name: n - s.offset for s, n in zip(order, nxt, strict=True)}
    p, s = sec["payload"], sec["scales"]
    extras = tuple((n, sec[n].offset, sec[n].nbytes, span[n]) for n in spec.extras)
    max_span = max((e[3] for e in extras), default=16)
    eblock = min(1024, max(16, _next_pow2(max_span)))
    return _Layout(
        kind=_KIND[fmt],
        nb=nb,
        nblk=nblk,
        blkp=blkp,
        full=full,
        n_chunks=n_chunks,
        group=min(group, n_chunks),
        n_groups=-(-n_chunks // min(group, n_chunks)),
        depth=depth,
        p_major=p_major,
        scale_off=s.offset,
        pad0=(p.end, s.offset),
        pad1=(s.end, s.offset + span["scales"]),
        extras=extras,
        eblock=eblock,
        eiter=-(-max_span // eblock),
        num_warps=warps,
        chunk_fast=chunk_fast,
        dq=_chunking(fmt, h, *_DEQ_TUNED[fmt]),
    )


def _chunking(fmt: str, h: int, chunk: int, per_thread: int) -> _Cut:
    """One format's row of ``h`` values cut into chunks of ``chunk`` values, with
    ``per_thread`` values per thread."""
    if fmt == "bf16":
        blkp = min(chunk, _next_pow2(h))
        nb = n_chunks = -(-h // blkp)
        nblk, full, values = 1, True, blkp
    elif fmt == "fp8":  # one block: the whole token
        blkp, nb, nblk, n_chunks = _next_pow2(h), 1, 1, 1
        full, values = blkp == h, blkp
    else:
        blkp = _BLOCK[fmt]
        nb = h // blkp
        nblk = min(_next_pow2(nb), max(1, chunk // blkp))
        n_chunks = -(-nb // nblk)
        full, values = True, nblk * blkp
    return _Cut(nb, nblk, blkp, full, n_chunks, _warps(values, per_thread))


def _extra_args(group, tensors, rows: torch.Tensor) -> list:
    args: list = []
    for i in range(MAX_EXTRAS):
        if i < len(group):
            name, off, nbytes, span = group[i]
            e = tensors[name]
            if e.shape[1] and e.stride(1) != 1:
                e = e.contiguous()
            eb = e if e.dtype == torch.uint8 else e.view(torch.uint8)
            args += [eb, eb.stride(0), off, nbytes, span]
        else:
            args += [rows, 0, 0, 0, 0]
    return args


#: nvfp4's pair encoder works in units of ``2**-6`` (``_kernels/pack.py``,
#: ``_nvfp4_bytes_hw``), exact when its per-block factor ``out * 2**-6`` stays a normal
#: fp32 and finite: true for every global scale in ``[2**-100, 2**100]`` (``out`` is about
#: ``g / S`` with ``S`` in ``[2**-9, 448]``). Others use the integer encoder.
_NVFP4_PAIRS_G = (2.0**-100, 2.0**100)


def _pair_encoders(fmt: str, g: float) -> bool:
    """Whether the fp4 word path can use the GPU's pair encoders (two values per
    instruction, see ``_kernels/pack.py``): always for mxfp4, for nvfp4 within
    :data:`_NVFP4_PAIRS_G`. Both give the integer encoder's bytes; this only picks speed."""
    lo, hi = _NVFP4_PAIRS_G
    return fmt == "mxfp4" or (fmt == "nvfp4" and lo <= g <= hi)


def _words(lay: _Layout, x: torch.Tensor) -> bool:
    """Whether the block formats can read bf16 ``x`` as int32 words of two values (see
    ``_kernels/pack.py``): unit column stride, 4-byte aligned rows, whole words per block."""
    return (
        lay.kind != _KIND["bf16"]
        and x.dtype == torch.bfloat16
        and lay.blkp >= 8
        and x.shape[1] % 2 == 0
        and x.stride(1) == 1
        and x.data_ptr() % 4 == 0
        and (x.stride(0) % 2 == 0 or x.shape[0] == 1)
    )


def pack(
    spec,
    x: torch.Tensor,
    rows: torch.Tensor,
    extras: dict,
    *,
    hw: bool | None = None,
    words: bool = True,
) -> torch.Tensor:
    """Quantize ``x`` and write complete rows into ``rows``; returns ``rows``.

    Called by :meth:`moewire.WireSpec.pack` after validation.

    Args:
        spec: the :class:`moewire.WireSpec`.
        x: ``[T, H]`` bfloat16, float16 or float32, any strides, on CUDA (or CPU under
            ``TRITON_INTERPRET=1``).
        rows: uint8 ``[T, R]`` with ``stride(1) == 1``, possibly a slice of a larger buffer;
            every byte is written. Rows that are not 16-byte aligned (data pointer or row
            stride) are packed into a temporary and copied.
        extras: name -> ``[T, width]`` tensor of the declared dtype (bytes copied verbatim).
        hw: private, for tests: force (True) or avoid (False) the hardware fp8 ``cvt``.
        words: private, for tests: False reads bf16 ``x`` one value at a time even where
            it could be read as int32 words.
    """
    _check_device(x, "x")
    t = x.shape[0]
    if t == 0:
        return rows
    lay = _layout(spec)
    if lay.chunk_fast and t > _MAX_GRID_Y:
        # the grid (n_groups, T) holds at most 65535 tokens: pack in slices of that many
        for i in range(0, t, _MAX_GRID_Y):
            sl = slice(i, i + _MAX_GRID_Y)
            part = {name: e[sl] for name, e in extras.items()}
            pack(spec, x[sl], rows[sl], part, hw=hw, words=words)
        return rows
    target = (
        rows if _aligned(rows) else torch.empty_like(rows, memory_format=torch.contiguous_format)
    )
    hw = (x.device.type == "cuda" and _HW_E4M3) if hw is None else hw
    fmt = spec.wire_format
    g = float(getattr(fmt, "global_scale", 1.0))
    inv_g = float(fmt.inv_global_scale) if spec.format == "nvfp4" else 1.0
    from moewire.formats.nvfp4 import RCP6

    groups = [lay.extras[i : i + MAX_EXTRAS] for i in range(0, len(lay.extras), MAX_EXTRAS)]
    first = groups[0] if groups else ()
    has_tail = bool(lay.extras) or lay.pad0[1] > lay.pad0[0] or lay.pad1[1] > lay.pad1[0]
    grid = (lay.n_groups, t) if lay.chunk_fast else (t, lay.n_groups)
    pack_kernel[grid](
        x,
        x.stride(0),
        x.stride(1),
        target,
        target.stride(0),
        spec.hidden,
        lay.nb,
        lay.scale_off,
        lay.n_groups,
        g,
        inv_g,
        RCP6,
        *lay.pad0,
        *lay.pad1,
        *_extra_args(first, extras, target),
        KIND=lay.kind,
        NBLK=lay.nblk,
        BLKP=lay.blkp,
        FULL=lay.full,
        HAS_TAIL=has_tail,
        NUM_EXTRAS=len(first),
        EBLOCK=lay.eblock,
        EITER=lay.eiter,
        HW=hw,
        WORDS=words and _words(lay, x),
        CHUNK_FAST=lay.chunk_fast,
        GROUP=lay.group,
        DEPTH=lay.depth,
        PMAJ=lay.p_major,
        PAIRS=hw and _pair_encoders(spec.format, g),
        num_warps=lay.num_warps,
        enable_fp_fusion=False,
    )
    # More than MAX_EXTRAS extras (unusual): one more small launch per group.
    for group in groups[1:]:
        extras_kernel[(t,)](
            target,
            target.stride(0),
            *_extra_args(group, extras, target),
            NUM_EXTRAS=len(group),
            EBLOCK=lay.eblock,
            EITER=lay.eiter,
            num_warps=4,
        )
    if target is not rows:
        rows.copy_(target)
    return rows


def dequantize(
    spec, rows: torch.Tensor, dtype: torch.dtype, *, hw: bool | None = None
) -> torch.Tensor:
    """Rows ``[N, R]`` (uint8, validated by the caller) -> ``[N, H]`` of ``dtype``
    (float32, bfloat16 or float16), a new contiguous tensor on ``rows``' device (for the
    ``bf16`` format dequantized to bfloat16: a view of the payload, like the reference).

    Called by :meth:`moewire.WireSpec.dequantize`. ``hw``: private, as in :func:`pack`.
    """
    _check_device(rows, "rows")
    if dtype not in _OUT:
        raise TypeError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    if spec.format == "bf16" and dtype == torch.bfloat16:
        # nothing to compute: a view of the payload, exactly as the torch reference returns
        return spec.unpack(rows).payload
    n, h = rows.shape[0], spec.hidden
    out = torch.empty((n, h), dtype=dtype, device=rows.device)
    if n == 0:
        return out
    if not (_aligned(rows) and rows.stride(1) == 1):
        rows = rows.clone(memory_format=torch.contiguous_format)
    lay = _layout(spec)
    hw = (rows.device.type == "cuda" and _HW_E4M3) if hw is None else hw
    inv_g = float(spec.wire_format.inv_global_scale) if spec.format == "nvfp4" else 1.0
    dequant_kernel[(n, lay.dq.n_chunks)](
        rows,
        rows.stride(0),
        out,
        out.stride(0),
        h,
        lay.dq.nb,
        lay.scale_off,
        inv_g,
        KIND=lay.kind,
        NBLK=lay.dq.nblk,
        BLKP=lay.dq.blkp,
        FULL=lay.dq.full,
        OUT=_OUT[dtype],
        HW=hw,
        num_warps=lay.dq.num_warps,
    )
    return out


class Decoder(NamedTuple):
    """What a kernel needs to decode rows of one spec with ``decode_chunk``
    (``_kernels/dequant.py``): the dequantize kernel's cut of the row."""

    kind: int
    nb: int
    nblk: int
    blkp: int
    full: bool
    n_chunks: int
    num_warps: int
    scale_off: int
    inv_g: float
    hw: bool


@functools.lru_cache(maxsize=256)
def decoder(spec, device_type: str) -> Decoder:
    """The decode parameters of ``spec``'s rows on a device type (cached per spec)."""
    lay = _layout(spec)
    inv_g = float(spec.wire_format.inv_global_scale) if spec.format == "nvfp4" else 1.0
    hw = device_type == "cuda" and _HW_E4M3
    dq = lay.dq
    return Decoder(
        lay.kind, dq.nb, dq.nblk, dq.blkp, dq.full, dq.n_chunks, dq.num_warps, lay.scale_off,
        inv_g, hw,
    )  # fmt: skip


def gather_swizzled_scales(spec, rows: torch.Tensor) -> torch.Tensor:
    """nvfp4 block scales of rows ``[N, R]`` -> the 128x4 swizzled layout, in one kernel.

    Equals ``moewire.swizzle_128x4(spec.unpack(rows).scales)`` bit for bit, without the
    intermediate ``[N, B]`` copy: use it on the rows a dispatch gathered, to feed an NVFP4
    GEMM that wants swizzled scales.

    Args:
        spec: an nvfp4 :class:`moewire.WireSpec`.
        rows: uint8 ``[N, R]`` rows of ``spec`` with ``stride(1) == 1`` (any row stride), on
            CUDA (or CPU under ``TRITON_INTERPRET=1``).

    Returns:
        float8_e4m3fn ``[Mp, Kp]``, contiguous, ``Mp = ceil(N/128)*128``,
        ``Kp = ceil(B/4)*4`` (``B = H/16``), zero-padded.
    """
    if spec.format != "nvfp4":
        raise ValueError(f"gather_swizzled_scales needs an nvfp4 spec, got format {spec.format!r}")
    spec.check_rows(rows)
    _check_device(rows, "rows")
    if rows.shape[1] and rows.stride(1) != 1:
        rows = rows.contiguous()
    n = rows.shape[0]
    b = spec.sections["scales"].numel
    mp = -(-n // SWIZZLE_ROWS) * SWIZZLE_ROWS
    kp = -(-b // SWIZZLE_COLS) * SWIZZLE_COLS
    out = torch.empty((mp, kp), dtype=torch.uint8, device=rows.device)
    if mp:
        kg = kp // SWIZZLE_COLS
        tiles = min(_SWIZZLE_TILES, _next_pow2(kg))
        swizzle_kernel[(mp // SWIZZLE_ROWS, -(-kg // tiles))](
            rows,
            rows.stride(0),
            spec.sections["scales"].offset,
            out,
            n,
            b,
            kg,
            KGB=tiles,
            num_warps=4,
        )
    return out.view(torch.float8_e4m3fn)
