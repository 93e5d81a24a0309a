"""``WireSpec``: a wire format plus declared extras -> the byte layout of one row.

A row is ``[payload | scales | extra_1 | extra_2 | ...]``; every section starts at a
multiple of 16 bytes, padding bytes are zero and the row length is a multiple of 16
(WIRE_FORMATS.md, "The row"). This module is the only place that knows those offsets.

Shape legend: ``T`` tokens, ``H`` hidden, ``R`` row bytes, ``P`` payload elements,
``S`` scale elements, ``W`` an extra's width.
"""

from __future__ import annotations

import functools
import keyword
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from moewire.constants import ROW_ALIGN, ceil_div
from moewire.formats.base import WireFormat, format_class, quoted_names
from moewire.formats.elements import as_fp32
from moewire.formats.nvfp4 import swizzle_128x4

#: Activation dtypes ``pack`` accepts (always upcast to fp32 first).
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: Output dtypes ``dequantize`` can produce.
OUTPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_RESERVED = frozenset({"x", "out", "backend", "dtype", "rows", "payload", "scales"})
#: Reference packing works on this many values at a time to bound temporary memory.
_CHUNK_VALUES = 1 << 24
BACKENDS = ("torch", "triton")


def _align(n: int) -> int:
    return ceil_div(n, ROW_ALIGN) * ROW_ALIGN


@dataclass(frozen=True)
class Section:
    """One section of a row: ``numel`` elements of ``dtype`` at byte ``offset``."""

    name: str
    offset: int
    dtype: torch.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class RowView:
    """Zero-copy views into rows ``[T, R]`` (see :meth:`WireSpec.unpack`)."""

    payload: torch.Tensor
    scales: torch.Tensor
    extras: Mapping[str, torch.Tensor]


def _check_extras_decl(extras: object) -> dict[str, tuple[torch.dtype, int]]:
    if extras is None:
        return {}
    if not isinstance(extras, Mapping):
        raise TypeError(
            f"extras must be a dict name -> (dtype, width), got {type(extras).__name__}"
        )
    out: dict[str, tuple[torch.dtype, int]] = {}
    for name, decl in extras.items():
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"extras: name {name!r} is not a valid identifier")
        if name in _RESERVED:
            raise ValueError(f"extras: name {name!r} is reserved ({sorted(_RESERVED)})")
        if not (isinstance(decl, tuple) and len(decl) == 2):
            raise TypeError(f"extras[{name!r}] must be a (dtype, width) tuple, got {decl!r}")
        dtype, width = decl
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"extras[{name!r}]: dtype must be a torch.dtype, got {dtype!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
            raise ValueError(f"extras[{name!r}]: width must be a positive int, got {width!r}")
        out[name] = (dtype, width)
    return out


class WireSpec:
    """A wire format and the extras that travel with each token: the layout of one row.

    Args:
        format: one of :data:`moewire.FORMATS`.
        hidden: ``H``, values per token; a positive multiple of the format's block.
        global_scale: nvfp4 only (required there): the static fp32 global scale
            ``g = 448*6/amax`` (see :func:`moewire.nvfp4_global_scale`), same on every rank.
        extras: ``{name: (dtype, width)}``; each travels as ``width`` values of ``dtype`` per
            token, bytes copied verbatim (e.g. ``{"router_logits": (torch.float32, 256)}``).
    """

    def __init__(
        self,
        format: str,
        hidden: int,
        global_scale: float | torch.Tensor | None = None,
        extras: Mapping[str, tuple[torch.dtype, int]] | None = None,
    ) -> None:
        fmt = format_class(format).make(global_scale)
        fmt.check_hidden(hidden)
        self._format = fmt
        self._hidden = hidden
        self._extras = _check_extras_decl(extras)

        sections = []
        offset = 0
        for name, dtype, numel in (
            ("payload", fmt.payload_dtype, fmt.payload_numel(hidden)),
            ("scales", fmt.scale_dtype, fmt.scale_numel(hidden)),
            *((n, d, w) for n, (d, w) in self._extras.items()),
        ):
            sec = Section(name, offset, dtype, numel)
            sections.append(sec)
            offset = _align(sec.end)
        self._sections = {s.name: s for s in sections}
        self._row_bytes = max(offset, ROW_ALIGN)
        #: The Triton launchers' cached layout and launch arguments (``formats/_tiles.py``).
        self._launch: tuple | None = None

    # ----------------------------------------------------------------- properties
    @property
    def format(self) -> str:
        return self._format.name

    @property
    def wire_format(self) -> WireFormat:
        return self._format

    @property
    def hidden(self) -> int:
        return self._hidden

    @property
    def global_scale(self) -> float | None:
        return self._format.global_scale

    @property
    def extras(self) -> Mapping[str, tuple[torch.dtype, int]]:
        return MappingProxyType(self._extras)

    @property
    def sections(self) -> Mapping[str, Section]:
        """Name -> :class:`Section` (``payload``, ``scales``, then each extra in order)."""
        return MappingProxyType(self._sections)

    @property
    def row_bytes(self) -> int:
        """``R``: bytes per row, a multiple of 16."""
        return self._row_bytes

    def with_extras(self, extras: Mapping[str, tuple[torch.dtype, int]] | None) -> WireSpec:
        """The same format and hidden size with other extras."""
        return WireSpec(self.format, self._hidden, self.global_scale, extras)

    def __repr__(self) -> str:
        g = f", global_scale={self.global_scale!r}" if self.global_scale is not None else ""
        ex = f", extras={dict(self._extras)!r}" if self._extras else ""
        return (
            f"WireSpec({self.format!r}, hidden={self._hidden}{g}{ex}, row_bytes={self._row_bytes})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WireSpec):
            return NotImplemented
        return (self._format, self._hidden, self._extras) == (
            other._format,
            other._hidden,
            other._extras,
        )

    def __hash__(self) -> int:
        return hash((self._format, self._hidden, tuple(self._extras.items())))

    # ----------------------------------------------------------------- validation
    def _check_x(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in INPUT_DTYPES:
            raise TypeError(
                f"x must be bfloat16, float16 or float32, got dtype {x.dtype} "
                f"(format {self.format!r})"
            )
        if x.dim() != 2 or x.shape[1] != self._hidden:
            raise ValueError(f"x must be [T, hidden={self._hidden}], got shape {tuple(x.shape)}")

    def _check_extras(self, num_tokens: int, device: torch.device, extras: dict) -> None:
        if extras.keys() != self._extras.keys():
            missing = [n for n in self._extras if n not in extras]
            unknown = [n for n in extras if n not in self._extras]
            raise ValueError(
                f"extras: declared {sorted(self._extras)}, missing {missing}, undeclared {unknown}"
            )
        for name, (dtype, width) in self._extras.items():
            t = extras[name]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"extra {name!r} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != dtype:
                raise TypeError(f"extra {name!r} must have dtype {dtype}, got {t.dtype}")
            if t.shape != (num_tokens, width):
                raise ValueError(
                    f"extra {name!r} must have shape [T={num_tokens}, {width}], "
                    f"got {tuple(t.shape)}"
                )
            if t.device != device:
                raise ValueError(f"extra {name!r} is on {t.device}, x is on {device}")

    def check_rows(self, rows: torch.Tensor, name: str = "rows") -> None:
        """Raise unless ``rows`` is a uint8 ``[N, row_bytes]`` tensor."""
        if not isinstance(rows, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(rows).__name__}")
        if rows.dtype != torch.uint8:
            raise TypeError(f"{name} must be uint8, got dtype {rows.dtype}")
        if rows.dim() != 2 or rows.shape[1] != self._row_bytes:
            raise ValueError(
                f"{name} must be [N, row_bytes={self._row_bytes}] for {self!r}, "
                f"got shape {tuple(rows.shape)}"
            )

    def out_rows(self, out: torch.Tensor | None, t: int, device: torch.device) -> torch.Tensor:
        """The destination of ``t`` rows on ``device``: ``out`` once checked (uint8
        ``[t, R]``, unit stride along the row), or a new tensor when it is None."""
        if out is None:
            return torch.empty((t, self._row_bytes), dtype=torch.uint8, device=device)
        self.check_rows(out, "out")
        if out.shape[0] != t:
            raise ValueError(f"out must have {t} rows (one per token), got {out.shape[0]}")
        if out.device != device:
            raise ValueError(f"out is on {out.device}, x is on {device}")
        if out.shape[1] and out.stride(1) != 1:
            raise ValueError("out must have unit stride along the row (stride(1) == 1)")
        return out

    def _pick_backend(self, backend: str | None, device: torch.device) -> str:
        return pick_backend(backend, device)

    # ----------------------------------------------------------------- the API
    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize ``x [T, H]`` (bf16/fp16/fp32) -> ``(payload [T, P], scales [T, S])``.

        Dtypes: the format's (``bf16`` payload bf16; ``fp8``/``mxfp8`` float8_e4m3fn;
        ``nvfp4``/``mxfp4`` uint8 of two codes; scales fp32, float8_e4m3fn or uint8 e8m0).
        The torch reference; :meth:`pack` writes the same bytes into rows.
        """
        self._check_x(x)
        return self._format.quantize(as_fp32(x))

    def pack(
        self,
        x: torch.Tensor,
        *,
        out: torch.Tensor | None = None,
        backend: str | None = None,
        **extras: torch.Tensor,
    ) -> torch.Tensor:
        """Quantize ``x`` and lay each token out as one row of bytes.

        Args:
            x: ``[T, H]`` bfloat16, float16 or float32 activations (any strides).
            out: optional uint8 ``[T, R]`` destination with unit stride along the row, e.g.
                this rank's slot of a collective's buffer; every byte of it is written.
            backend: ``"torch"`` (reference), ``"triton"`` (GPU kernels) or None
                (triton for CUDA tensors when available, torch otherwise).
            **extras: each declared extra, ``[T, width]`` of its declared dtype.

        Returns:
            uint8 ``[T, R]`` rows (``out`` when given).
        """
        self._check_x(x)
        device, t = x.device, x.shape[0]
        self._check_extras(t, device, extras)
        rows = self.out_rows(out, t, device)
        if self._pick_backend(backend, device) == "triton":
            return _triton_module().pack(self, x, rows, extras)
        step = max(1, _CHUNK_VALUES // self._hidden)
        for start in range(0, x.shape[0], step):
            stop = min(start + step, x.shape[0])
            payload, scales = self._format.quantize(as_fp32(x[start:stop]))
            chunk_extras = {k: v[start:stop] for k, v in extras.items()}
            self._write(rows[start:stop], payload, scales, chunk_extras)
        return rows

    def pack_quantized(
        self,
        payload: torch.Tensor,
        scales: torch.Tensor,
        *,
        out: torch.Tensor | None = None,
        **extras: torch.Tensor,
    ) -> torch.Tensor:
        """Lay already-quantized tokens out as rows (for callers that quantize elsewhere).

        Args:
            payload: ``[T, P]`` in the format's payload dtype (or uint8 of the same bytes).
            scales: ``[T, S]`` in the format's scale dtype (or uint8 of the same bytes).
            out, **extras: as in :meth:`pack`.
        """
        fmt = self._format
        p_sec, s_sec = self._sections["payload"], self._sections["scales"]
        for name, t, sec in (("payload", payload, p_sec), ("scales", scales, s_sec)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in (sec.dtype, torch.uint8):
                raise TypeError(f"{name} must be {sec.dtype} (or uint8 bytes), got {t.dtype}")
            numel = sec.numel if t.dtype == sec.dtype else sec.nbytes
            if t.dim() != 2 or t.shape[1] != numel:
                raise ValueError(
                    f"{name} must be [T, {numel}] for format {fmt.name!r} hidden={self._hidden}, "
                    f"got shape {tuple(t.shape)}"
                )
        if payload.shape[0] != scales.shape[0] or payload.device != scales.device:
            raise ValueError(
                f"payload and scales must have the same T and device, got "
                f"{payload.shape[0]} on {payload.device} and {scales.shape[0]} on {scales.device}"
            )
        self._check_extras(payload.shape[0], payload.device, extras)
        rows = self.out_rows(out, payload.shape[0], payload.device)
        self._write(rows, payload, scales, extras)
        return rows

    def _write(self, rows: torch.Tensor, payload, scales, extras) -> None:
        sec = self._sections
        cursor = 0
        for name, t in (("payload", payload), ("scales", scales), *extras.items()):
            s = sec[name]
            if s.offset > cursor:
                rows[:, cursor : s.offset] = 0
            if s.nbytes:
                rows[:, s.offset : s.end] = _bytes_of(t, s.nbytes)
            cursor = s.end
        if self._row_bytes > cursor:
            rows[:, cursor:] = 0

    def unpack(self, rows: torch.Tensor) -> RowView:
        """Split rows ``[N, R]`` into zero-copy typed views.

        Returns a :class:`RowView`: ``payload [N, P]`` and ``scales [N, S]`` in the format's
        dtypes (see :meth:`quantize`) and ``extras[name] [N, width]`` in each declared dtype.
        The views alias ``rows`` when its row stride is a multiple of 16 and it has unit
        stride along the row (any contiguous tensor); otherwise ``rows`` is copied first.
        """
        self.check_rows(rows)
        aligned = rows.stride(1) == 1 and rows.stride(0) % ROW_ALIGN == 0
        if not aligned or rows.storage_offset() % ROW_ALIGN:
            rows = rows.contiguous()
        views = {name: _typed(rows, s) for name, s in self._sections.items()}
        payload, scales = views.pop("payload"), views.pop("scales")
        return RowView(payload, scales, MappingProxyType(views))

    def dequantize(
        self,
        rows: torch.Tensor,
        dtype: torch.dtype = torch.bfloat16,
        *,
        backend: str | None = None,
    ) -> torch.Tensor:
        """Rows ``[N, R]`` -> dequantized activations ``[N, H]`` of ``dtype``
        (bfloat16, float16 or float32), computed in fp32 and rounded once to ``dtype``."""
        if dtype not in OUTPUT_DTYPES:
            raise TypeError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
        self.check_rows(rows)
        if self._pick_backend(backend, rows.device) == "triton":
            return _triton_module().dequantize(self, rows, dtype)
        view = self.unpack(rows)
        return self._format.dequantize(view.payload, view.scales, dtype)

    def swizzled_scales(self, rows: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
        """nvfp4 only: the block scales of rows ``[N, R]`` in the 128x4 swizzled layout the
        NVFP4 GEMMs want (see :func:`moewire.swizzle_128x4`), e.g. of the rows a dispatch
        gathered. On CUDA one Triton kernel reads them straight out of the rows.

        Returns:
            float8_e4m3fn ``[Mp, Kp]``, contiguous, ``Mp = ceil(N/128)*128``,
            ``Kp = ceil(H/16/4)*4``, zero-padded.
        """
        if not self._format.swizzles_scales:
            raise ValueError(
                f"swizzled_scales needs format {quoted_names('swizzles_scales')}, "
                f"got {self.format!r}"
            )
        self.check_rows(rows)
        if self._pick_backend(backend, rows.device) == "triton":
            return _triton_module().gather_swizzled_scales(self, rows)
        return swizzle_128x4(self.unpack(rows).scales)


def _bytes_of(t: torch.Tensor, nbytes: int) -> torch.Tensor:
    t = t.contiguous()
    return t.view(torch.uint8).reshape(t.shape[0], nbytes)


def _typed(rows: torch.Tensor, s: Section) -> torch.Tensor:
    raw = rows[:, s.offset : s.end]
    if s.dtype == torch.uint8:
        return raw
    if rows.shape[0] == 0:
        return torch.empty((0, s.numel), dtype=s.dtype, device=rows.device)
    return raw.view(s.dtype)


def pick_backend(backend: str | None, device: torch.device) -> str:
    """``"torch"`` or ``"triton"``: ``backend`` checked, or for None the Triton kernels on
    CUDA tensors when triton is importable and the torch reference otherwise."""
    if backend is None:
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton" and not _triton_available():
        raise RuntimeError("backend='triton' needs the triton package, which is not importable")
    return backend


@functools.cache
def _triton_module():
    """``moewire.formats._triton`` (imports triton: only on the Triton paths)."""
    from moewire.formats import _triton

    return _triton


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401

        from moewire.formats import _triton  # noqa: F401
    except ImportError:
        return False
    return True
