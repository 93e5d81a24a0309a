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
(two values per instruction, exact by construction: ``_kernels/fp4_pairs.py``); the tests check
every path on the GPU.

Shape legend: ``T`` tokens, ``N`` rows (e.g. gathered from every rank), ``H`` hidden,
``R`` row bytes, ``B`` nvfp4 scale blocks per token (``H/16``), ``Mp``/``Kp`` the swizzled
scale layout's padded sizes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from moewire.constants import ROW_ALIGN, SWIZZLE_COLS, SWIZZLE_ROWS, Kind, ceil_div
from moewire.formats._kernels.dequant import dequant_kernel
from moewire.formats._kernels.pack import MAX_EXTRAS, extras_kernel, pack_kernel
from moewire.formats._kernels.swizzle import swizzle_kernel
from moewire.formats._launch import Launch, int_key
from moewire.formats._tiles import (  # noqa: F401  (_TUNED, _Tile: the tile sweeps' knobs)
    _TUNED,
    _Layout,
    _layout,
    _next_pow2,
    _pair_encoders,
    _Tile,
)

__all__ = ["Decoder", "decoder", "dequantize", "gather_swizzled_scales", "pack"]

_OUT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

#: Use the GPU's fp8 ``cvt`` instructions on CUDA (False: the integer path everywhere).
_HW_E4M3 = True
#: CUDA's limit on a grid's second dimension (the token axis of a chunk-fastest pack grid).
_MAX_GRID_Y = 65535
#: 512-byte swizzled tiles written by one program of the swizzle kernel.
_SWIZZLE_TILES = 8


@functools.cache
def _interpreting() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1``
    when this module was first imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(pack_kernel, InterpretedFunction)


def _check_device(t: torch.Tensor, name: str) -> None:
    if t.is_cuda or (t.device.type == "cpu" and _interpreting()):
        return
    raise ValueError(
        f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
        f"{name} is on {t.device}"
    )


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % ROW_ALIGN == 0 and (t.shape[0] <= 1 or t.stride(0) % ROW_ALIGN == 0)


class _PackPlan(NamedTuple):
    """Everything a pack launch needs that depends only on the spec and ``hw`` (cached)."""

    lay: _Layout
    scalars: tuple  # hidden, nb, scale_off, n_groups, g, 1/g, (pad0, pad1)
    first: tuple  # the extras the pack kernel copies: (name, offset, nbytes, span)
    unused: int  # empty extra slots of the pack kernel
    rest: tuple  # further groups of MAX_EXTRAS extras (one extras_kernel launch each)
    words: bool  # bf16 x may be read as int32 words (the per-call half: _words_ok)
    consts: dict  # the pack kernel's constexprs (all but WORDS) and launch options
    launch: tuple  # (WORDS=False, WORDS=True): the pack kernel's Launch


def _pack_plan(spec, hw: bool) -> _PackPlan:
    lay, plans = _layout.plans(spec)
    plan = plans.get(("pack", hw))
    if plan is not None:
        return plan
    fmt = spec.wire_format
    g = float(fmt.global_scale) if fmt.needs_global_scale else 1.0
    inv_g = float(fmt.inv_global_scale)

    groups = [lay.extras[i : i + MAX_EXTRAS] for i in range(0, len(lay.extras), MAX_EXTRAS)]
    first = groups[0] if groups else ()
    has_tail = bool(lay.extras) or lay.pad0[1] > lay.pad0[0] or lay.pad1[1] > lay.pad1[0]
    consts = dict(
        KIND=lay.kind,
        NBLK=lay.nblk,
        BLKP=lay.blkp,
        FULL=lay.full,
        HAS_TAIL=has_tail,
        NUM_EXTRAS=len(first),
        EBLOCK=lay.eblock,
        EITER=lay.eiter,
        HW=hw,
        CHUNK_FAST=lay.chunk_fast,
        GROUP=lay.group,
        DEPTH=lay.depth,
        PMAJ=lay.p_major,
        PAIRS=hw and _pair_encoders(fmt),
        num_warps=lay.num_warps,
        enable_fp_fusion=False,
    )
    plan = plans["pack", hw] = _PackPlan(
        lay=lay,
        scalars=(
            spec.hidden,
            lay.nb,
            lay.scale_off,
            lay.n_groups,
            g,
            inv_g,
            (*lay.pad0, *lay.pad1),
        ),
        first=tuple(first),
        unused=MAX_EXTRAS - len(first),
        rest=tuple(tuple(gr) for gr in groups[1:]),
        words=lay.kind != Kind.BF16 and lay.blkp >= 8 and spec.hidden % 2 == 0,
        consts=consts,
        launch=tuple(Launch(pack_kernel, {**consts, "WORDS": w}) for w in (False, True)),
    )
    return plan


def _extra_args(group: tuple, unused: int, tensors: dict, rows: torch.Tensor) -> tuple:
    """The kernels' ``extras`` argument: ``(ptr, stride, offset, nbytes, span)`` per extra
    (a uint8 view of it and its row stride in bytes), padded to :data:`MAX_EXTRAS` with
    unused slots (its launch key: :func:`_extra_ptrs`)."""
    args = []
    for name, off, nbytes, span in group:
        eb = _unit_row(tensors[name]).view(torch.uint8)
        args.append((eb, eb.stride(0), off, nbytes, span))
    return (*args, *[(rows, 0, 0, 0, 0)] * unused)


def _extra_ptrs(group: tuple, unused: int, tensors: dict, rows_ptr: int) -> tuple:
    """:func:`_extra_args` with data pointers as ints (for :meth:`Launch.run`), computed
    without a uint8 view of each extra; the launch key of its per-call part (each extra's
    alignment and row stride: the rest is fixed by the plan); and the extras as read, to be
    kept alive until the launch (a strided extra is read from a contiguous copy)."""
    args: list = []
    key: list = []
    held: list = []
    for name, off, nbytes, span in group:
        e = _unit_row(tensors[name])
        ptr, s0 = e.data_ptr(), e.stride(0) * e.element_size()
        args.append((ptr, s0, off, nbytes, span))
        key.append((ptr % 16 == 0, int_key(s0)))
        held.append(e)
    return (*args, *[(rows_ptr, 0, 0, 0, 0)] * unused), tuple(key), held


def _unit_row(e: torch.Tensor) -> torch.Tensor:
    """``e`` with unit stride along its row (a copy when it has not)."""
    return e.contiguous() if e.shape[1] and e.stride(1) != 1 else e


def _words_ok(x: torch.Tensor, strides: tuple | None = None) -> bool:
    """The per-call half of :func:`_words`: bf16 ``x`` with unit column stride, 4-byte
    aligned rows."""
    s0, s1 = x.stride() if strides is None else strides
    return (
        x.dtype == torch.bfloat16
        and s1 == 1
        and x.data_ptr() % 4 == 0
        and (s0 % 2 == 0 or x.shape[0] == 1)
    )


def _words(lay: _Layout, x: torch.Tensor) -> bool:
    """Whether the block formats can read bf16 ``x`` as int32 words of two values (see
    ``_kernels/pack.py``): unit column stride, 4-byte aligned rows, whole words per block."""
    return lay.kind != Kind.BF16 and lay.blkp >= 8 and x.shape[1] % 2 == 0 and _words_ok(x)


def _launch_pack(plan: _PackPlan, grid: tuple, x, target, extras: dict, words: bool) -> None:
    """One pack launch: the per-call arguments and their launch key (``_launch.py``). Once
    the kernel for the key is kept, pointers go to it as ints (:meth:`Launch.run`)."""
    xp, tp = x.data_ptr(), target.data_ptr()
    ex, ex_key, held = _extra_ptrs(plan.first, plan.unused, extras, tp)
    sx = x.stride()
    st0 = target.stride(0)
    key = (
        x.dtype,
        xp % 16 == 0,
        tp % 16 == 0,
        int_key(sx[0]),
        int_key(sx[1]),
        int_key(st0),
        ex_key,
    )
    launch = plan.launch[words and plan.words and _words_ok(x, sx)]
    kept = launch.kept(key)
    if kept is not None:
        launch.run(kept, grid, xp, *sx, tp, st0, *plan.scalars, ex)
        del held  # the launch is enqueued: the extras' copies may go
    else:
        ex = _extra_args(plan.first, plan.unused, extras, target)
        launch.first(grid, key, x, *sx, target, st0, *plan.scalars, ex)


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

    Called by :meth:`moewire.WireSpec.pack` after validation. Everything that depends only
    on the spec (tiles, constexprs, scalar arguments) is cached on the spec at its first
    launch; a launch then reads strides and pointers and calls the kernel.

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
    hw = (x.is_cuda and _HW_E4M3) if hw is None else hw
    plan = _pack_plan(spec, hw)
    lay = plan.lay
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
    grid = (lay.n_groups, t) if lay.chunk_fast else (t, lay.n_groups)
    _launch_pack(plan, grid, x, target, extras, words)
    # More than MAX_EXTRAS extras (unusual): one more small launch per group.
    for group in plan.rest:
        extras_kernel[(t,)](
            target,
            target.stride(0),
            _extra_args(group, MAX_EXTRAS - len(group), extras, target),
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
    if spec.wire_format.payload_dtype == dtype:
        # nothing to compute: a view of the payload, exactly as the torch reference returns
        return spec.unpack(rows).payload
    n, h = rows.shape[0], spec.hidden
    out = torch.empty((n, h), dtype=dtype, device=rows.device)
    if n == 0:
        return out
    if not (_aligned(rows) and rows.stride(1) == 1):
        rows = rows.clone(memory_format=torch.contiguous_format)
    hw = (rows.is_cuda and _HW_E4M3) if hw is None else hw
    grid_y, scalars, launch = _dequant_plan(spec, dtype, hw)
    rs0, os0 = rows.stride(0), out.stride(0)
    key = (rows.data_ptr() % 16 == 0, int_key(rs0), int_key(os0))
    launch((n, grid_y), key, rows, rs0, out, os0, *scalars)
    return out


def _dequant_plan(spec, dtype: torch.dtype, hw: bool) -> tuple[int, tuple, Launch]:
    """(programs per row, scalar arguments, the kernel's Launch) of a dequantize launch
    (cached)."""
    lay, plans = _layout.plans(spec)
    plan = plans.get(("dequant", dtype, hw))
    if plan is None:
        inv_g = float(spec.wire_format.inv_global_scale)
        consts = dict(
            KIND=lay.kind,
            NBLK=lay.dq.nblk,
            BLKP=lay.dq.blkp,
            FULL=lay.dq.full,
            OUT=_OUT[dtype],
            HW=hw,
            num_warps=lay.dq.num_warps,
        )
        scalars = (spec.hidden, lay.dq.nb, lay.scale_off, inv_g)
        plan = plans["dequant", dtype, hw] = (
            lay.dq.n_chunks,
            scalars,
            Launch(dequant_kernel, consts),
        )
    return plan


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


def decoder(spec, device_type: str) -> Decoder:
    """The decode parameters of ``spec``'s rows on a device type (cached on the spec)."""
    lay, plans = _layout.plans(spec)
    dec = plans.get(("decoder", device_type))
    if dec is None:
        inv_g = float(spec.wire_format.inv_global_scale)
        dq = lay.dq
        dec = plans["decoder", device_type] = Decoder(
            lay.kind, dq.nb, dq.nblk, dq.blkp, dq.full, dq.n_chunks, dq.num_warps,
            lay.scale_off, inv_g, device_type == "cuda" and _HW_E4M3,
        )  # fmt: skip
    return dec


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
    if not spec.wire_format.swizzles_scales:
        raise ValueError(f"gather_swizzled_scales needs an nvfp4 spec, got format {spec.format!r}")
    spec.check_rows(rows)
    _check_device(rows, "rows")
    if rows.shape[1] and rows.stride(1) != 1:
        rows = rows.contiguous()
    n = rows.shape[0]
    b = spec.sections["scales"].numel
    mp = ceil_div(n, SWIZZLE_ROWS) * SWIZZLE_ROWS
    kp = ceil_div(b, SWIZZLE_COLS) * SWIZZLE_COLS
    out = torch.empty((mp, kp), dtype=torch.uint8, device=rows.device)
    if mp:
        kg = kp // SWIZZLE_COLS
        tiles = min(_SWIZZLE_TILES, _next_pow2(kg))
        swizzle_kernel[(mp // SWIZZLE_ROWS, ceil_div(kg, tiles))](
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
