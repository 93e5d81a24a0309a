"""The combine codec: quantized partial rows on the return trip (``combine_wire``).

``comm/`` moves the rows; this module and its Triton launcher (``_combine_triton.py``,
kernels in ``_kernels/combine.py``) write and read them, with the formats' own recipes.

``make_comm(..., combine_wire=...)`` / ``EPMoE(..., combine_wire=...)`` pick how each rank's
partial output rows ``[N, H]`` travel back to the tokens' owners:

- ``"bf16"`` (default): today's path, no codec: ``allgather`` reduce-scatters the partials,
  ``alltoall`` sends them back in the partial dtype (bf16 or fp32).
- ``"fp8"``, ``"mxfp8"``, ``"mxfp4"``: the rows of the wire format of the same name
  (WIRE_FORMATS.md), bit for bit, produced by ``WireSpec.pack`` (Triton on CUDA).
- ``"nvfp4"``: nvfp4 with a **dynamic per-row** fp32 global scale carried in the row
  (partial outputs have no calibration): ``g_t = 2688 / max(amax_t, 1e-4)`` (correctly
  rounded fp32 division, ``amax_t = max |x_t|``), then exactly the static nvfp4 recipe of
  WIRE_FORMATS.md with ``g = g_t``. So row ``t``'s payload and scales are the bytes that
  ``WireSpec("nvfp4", H, global_scale=g_t).pack(x_t)`` writes, and its dequantized values
  are ``(e2m1 * S) * (1/g_t)``. A row with a NaN or Inf stores ``g_t`` = NaN (``0x7FC00000``),
  ``S = 0x7F`` and zero codes in every block: the whole row dequantizes to NaN. It is a
  combine-only codec, not one of :data:`moewire.FORMATS` (the static nvfp4 bytes are
  unchanged); its math is ``NVFP4Format.quantize_row_scaled`` / ``dequantize_row_scaled``,
  used here for every format that takes a global scale (``needs_global_scale``).

Byte layout of one combine row (sections at 16-byte offsets, zero padding, ``R`` a multiple
of 16; sizes at ``H = 7168``):

=========  =====================================================================  ======
wire       row                                                                    R
=========  =====================================================================  ======
``fp8``    e4m3 ``[H]`` at 0 | fp32 scale ``a/448`` at ``align16(H)``             7184
``mxfp8``  e4m3 ``[H]`` at 0 | e8m0 ``[H/32]`` at ``align16(H)``                  7392
``nvfp4``  e2m1 ``[H/2]`` at 0 | e4m3 ``[H/16]`` at ``o1 = align16(H/2)`` |       4048
           fp32 ``g_t`` at ``align16(o1 + H/16)``
``mxfp4``  e2m1 ``[H/2]`` at 0 | e8m0 ``[H/32]`` at ``align16(H/2)``              3808
=========  =====================================================================  ======

(bf16 partials: ``2H`` = 14336 B per row; fp32: 28672.)

Receiving side: the owner dequantizes every source's row of a token and adds them in fp32
**in source-rank order** (``((0 + d_0) + d_1) + ...``, absent sources skipped), then rounds
once to the partial dtype: deterministic run to run and equal on CPU and GPU
(:meth:`CombineCodec.decode_sum`; on CUDA one fused Triton kernel, FMA contraction off).

Shape legend: ``N`` partial rows, ``H`` hidden, ``R`` combine row bytes, ``X`` rows of a
received buffer, ``T`` tokens of this rank, ``W`` sources (ranks), ``B`` nvfp4 blocks.
"""

from __future__ import annotations

import functools

import torch

from moewire.formats.base import format_class
from moewire.formats.elements import as_fp32
from moewire.formats.spec import WireSpec, pick_backend

#: ``combine_wire`` names, bf16 (no codec) first, then by bytes per row (largest first).
COMBINE_WIRES: tuple[str, ...] = ("bf16", "fp8", "mxfp8", "nvfp4", "mxfp4")
#: dtypes of the partial rows combine takes (and returns): sums are added in this dtype.
COMBINE_DTYPES = (torch.bfloat16, torch.float32)


def check_partial_dtype(partial: object) -> None:
    """Raise TypeError unless ``partial`` is a bfloat16 or float32 tensor."""
    if not isinstance(partial, torch.Tensor):
        raise TypeError(f"partial must be a torch.Tensor, got {type(partial).__name__}")
    if partial.dtype not in COMBINE_DTYPES:
        raise TypeError(f"partial must be bfloat16 or float32, got dtype {partial.dtype}")


def check_combine_wire(combine_wire: object) -> str:
    """Return ``combine_wire`` or raise ``ValueError`` naming the options."""
    if not isinstance(combine_wire, str) or combine_wire not in COMBINE_WIRES:
        raise ValueError(f"combine_wire must be one of {COMBINE_WIRES}, got {combine_wire!r}")
    return combine_wire


class CombineCodec:
    """Quantized partial rows of one ``combine_wire`` (not ``bf16``) and hidden size.

    Args:
        wire: ``"fp8"``, ``"mxfp8"``, ``"nvfp4"`` (dynamic per-row g) or ``"mxfp4"``.
        hidden: ``H``, a positive multiple of the format's block (16 or 32; fp8: any).

    Attributes:
        spec: the :class:`moewire.WireSpec` of the combine rows' layout.
        row_scaled: whether each row carries its own global scale (the extra ``"g"``): the
            wire format takes a static one, and partial rows have no calibration.

    Get one with :func:`combine_codec` (cached). Every method has a torch reference and a
    Triton path (CUDA tensors, or ``backend="triton"``) that writes the same bytes and
    returns the same values bit for bit.
    """

    def __init__(self, wire: str, hidden: int) -> None:
        check_combine_wire(wire)
        if wire == "bf16":
            raise ValueError("combine_wire='bf16' has no codec: partials travel unquantized")
        self.wire = wire
        self.row_scaled = format_class(wire).needs_global_scale
        if self.row_scaled:
            # the layout only; the static g of this spec is never used
            self.spec = WireSpec(wire, hidden, global_scale=1.0, extras={"g": (torch.float32, 1)})
        else:
            self.spec = WireSpec(wire, hidden)

    @property
    def hidden(self) -> int:
        return self.spec.hidden

    @property
    def row_bytes(self) -> int:
        """``R``, bytes per combine row (a multiple of 16)."""
        return self.spec.row_bytes

    def __repr__(self) -> str:
        return f"CombineCodec({self.wire!r}, hidden={self.hidden}, row_bytes={self.row_bytes})"

    def _check_partial(self, partial: object) -> torch.Tensor:
        check_partial_dtype(partial)
        if partial.dim() != 2 or partial.shape[1] != self.hidden:
            raise ValueError(
                f"partial must be [N, hidden={self.hidden}], got shape {tuple(partial.shape)}"
            )
        return partial

    def _use_triton(self, backend: str | None, device: torch.device) -> bool:
        return pick_backend(backend, device) == "triton"

    def encode(
        self,
        partial_NH: torch.Tensor,
        *,
        out: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        """Quantize partial rows into combine rows.

        Args:
            partial_NH: bfloat16 or float32 ``[N, H]`` (upcast to fp32 first).
            out: optional uint8 ``[N, R]`` destination with unit stride along the row (e.g. a
                collective's send buffer); every byte is written.
            backend: ``"torch"``, ``"triton"`` or None (triton for CUDA tensors).

        Returns:
            uint8 ``[N, R]`` (``out`` when given).
        """
        partial_NH = self._check_partial(partial_NH)
        if not self.row_scaled:
            return self.spec.pack(partial_NH, out=out, backend=backend)
        n = partial_NH.shape[0]
        rows = self.spec.out_rows(out, n, partial_NH.device)
        if n == 0:
            return rows
        if self._use_triton(backend, partial_NH.device):
            from moewire.formats import _combine_triton

            return _combine_triton.pack_row_scaled(self.spec, partial_NH, rows)
        fmt = self.spec.wire_format
        payload, scales, g_T1 = fmt.quantize_row_scaled(as_fp32(partial_NH))
        return self.spec.pack_quantized(payload, scales, out=rows, g=g_T1)

    def decode(self, rows_XR: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
        """Combine rows ``[X, R]`` -> fp32 ``[X, H]`` (the torch reference on CPU)."""
        self.spec.check_rows(rows_XR)
        if not self.row_scaled:
            return self.spec.dequantize(rows_XR, torch.float32, backend=backend)
        view = self.spec.unpack(rows_XR)
        return self.spec.wire_format.dequantize_row_scaled(
            view.payload, view.scales, view.extras["g"]
        )

    def decode_sum(
        self,
        rows_XR: torch.Tensor,
        index_TW: torch.Tensor,
        dtype: torch.dtype,
        *,
        backend: str | None = None,
    ) -> torch.Tensor:
        """Dequantize and add, per token, the rows of every source in source order.

        Args:
            rows_XR: uint8 ``[X, R]`` received combine rows.
            index_TW: int64 ``[T, W]``: row of ``rows_XR`` holding source ``w``'s partial for
                token ``t``, or -1 when source ``w`` sent none (it adds nothing).
            dtype: bfloat16 or float32, the dtype returned.

        Returns:
            ``[T, H]`` of ``dtype``: ``(((0 + d_0) + d_1) + ...)`` in fp32, rounded once.
        """
        self.spec.check_rows(rows_XR)
        if dtype not in COMBINE_DTYPES:
            raise TypeError(f"dtype must be bfloat16 or float32, got {dtype}")
        if index_TW.dtype != torch.int64 or index_TW.dim() != 2:
            raise TypeError(f"index_TW must be int64 [T, W], got {index_TW.dtype} {index_TW.shape}")
        if self._use_triton(backend, rows_XR.device):
            from moewire.formats import _combine_triton

            return _combine_triton.decode_sum(self, rows_XR, index_TW, dtype)
        t, w = index_TW.shape
        out_TH = torch.zeros((t, self.hidden), dtype=torch.float32, device=rows_XR.device)
        if rows_XR.shape[0] == 0 or t == 0:
            return out_TH.to(dtype)
        vals_XH = self.decode(rows_XR, backend="torch")
        for src in range(w):
            sel_T = index_TW[:, src]
            hit = (sel_T >= 0).nonzero().flatten()
            if hit.numel():
                out_TH.index_put_((hit,), out_TH[hit] + vals_XH[sel_T[hit]])
        return out_TH.to(dtype)


@functools.lru_cache(maxsize=64)
def combine_codec(wire: str, hidden: int) -> CombineCodec:
    """The (cached) :class:`CombineCodec` of ``wire`` and ``hidden``."""
    return CombineCodec(wire, hidden)
