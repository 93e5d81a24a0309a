"""How the Triton kernels tile each wire format: the tuned tiles and the launch layout of a
:class:`~moewire.WireSpec`, derived once per spec and kept on it (``spec._launch``), so a
launch re-derives nothing. Pure Python (no ``triton`` import); ``_triton.py`` launches.

Shape legend: ``H`` hidden, ``B`` scale blocks per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from moewire.constants import ceil_div
from moewire.formats.base import WireFormat


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


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


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


def _derive_layout(spec) -> _Layout:
    fmt, h = spec.wire_format, spec.hidden
    chunk, per_thread, chunk_fast, group, depth, p_major = _TUNED[fmt.name]
    if p_major and fmt.payload_dtype != torch.float8_e4m3fn:
        raise ValueError(f"p_major is for the e4m3 formats, not {fmt.name}")
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
        kind=int(fmt.kind),
        nb=nb,
        nblk=nblk,
        blkp=blkp,
        full=full,
        n_chunks=n_chunks,
        group=min(group, n_chunks),
        n_groups=ceil_div(n_chunks, min(group, n_chunks)),
        depth=depth,
        p_major=p_major,
        scale_off=s.offset,
        pad0=(p.end, s.offset),
        pad1=(s.end, s.offset + span["scales"]),
        extras=extras,
        eblock=eblock,
        eiter=ceil_div(max_span, eblock),
        num_warps=warps,
        chunk_fast=chunk_fast,
        dq=_chunking(fmt, h, *_DEQ_TUNED[fmt.name]),
    )


def _chunking(fmt: WireFormat, h: int, chunk: int, per_thread: int) -> _Cut:
    """One format's row of ``h`` values cut into chunks of ``chunk`` values, with
    ``per_thread`` values per thread: whole scale blocks (values padded to a power of two;
    fp8's one block is the whole token), or for a format without scales plain chunks."""
    nb = fmt.scale_numel(h)
    if nb == 0:
        blkp = min(chunk, _next_pow2(h))
        nb = n_chunks = ceil_div(h, blkp)
        nblk, full, values = 1, True, blkp
    else:
        blkp = _next_pow2(h // nb)
        nblk = min(_next_pow2(nb), max(1, chunk // blkp))
        n_chunks = ceil_div(nb, nblk)
        full, values = blkp == h // nb, nblk * blkp
    return _Cut(nb, nblk, blkp, full, n_chunks, _warps(values, per_thread))


#: nvfp4's pair encoder works in units of ``2**-6`` (``_kernels/fp4_pairs.py``,
#: ``nvfp4_bytes_hw``), exact when its per-block factor ``out * 2**-6`` stays a normal
#: fp32 and finite: true for every global scale in ``[2**-100, 2**100]`` (``out`` is about
#: ``g / S`` with ``S`` in ``[2**-9, 448]``). Others use the integer encoder.
_NVFP4_PAIRS_G = (2.0**-100, 2.0**100)


def _pair_encoders(fmt: WireFormat) -> bool:
    """Whether the fp4 word path can use the GPU's pair encoders (two values per
    instruction, see ``_kernels/fp4_pairs.py``): for the packed e2m1 formats, with a
    global scale (nvfp4) within :data:`_NVFP4_PAIRS_G`. Both give the integer encoder's
    bytes; this only picks speed."""
    lo, hi = _NVFP4_PAIRS_G
    return fmt.packed and (not fmt.needs_global_scale or lo <= fmt.global_scale <= hi)


class _SpecCache:
    """``spec -> _Layout``, kept on the spec itself (``spec._launch``) so that a launch finds
    it with one attribute read, next to the launchers' own cached arguments (:meth:`plans`).
    ``cache_clear()`` (as ``functools.lru_cache``'s; the tile sweeps and tests use it after
    changing :data:`_TUNED`) makes every spec derive its layout again."""

    def __init__(self) -> None:
        self._generation = 0

    def _entry(self, spec) -> tuple[int, _Layout, dict]:
        entry = spec._launch
        if entry is None or entry[0] != self._generation:
            entry = spec._launch = (self._generation, _derive_layout(spec), {})
        return entry

    def __call__(self, spec) -> _Layout:
        return self._entry(spec)[1]

    def plans(self, spec) -> tuple[_Layout, dict]:
        """The spec's layout and its dict of launch plans (the launchers fill it)."""
        _, lay, plans = self._entry(spec)
        return lay, plans

    def cache_clear(self) -> None:
        self._generation += 1


_layout = _SpecCache()
