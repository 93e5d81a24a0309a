"""``local``: the comm of a layer without a process group (one process holds every expert).

Dispatch is the identity; combine is too with ``combine_wire="bf16"``, else the one
source's quantize/dequantize round trip, exactly what a one-rank ``allgather`` comm
returns. Shape legend: ``T`` tokens, ``K`` top-k, ``R`` row bytes, ``N`` rows, ``H`` hidden.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from moewire.comm.counts import normalize_counts


class LocalComm:
    """World size 1 without a process group: dispatch is the identity; combine is too with
    ``combine_wire="bf16"``, else the one source's quantize/dequantize round trip (exactly
    what a one-rank ``allgather`` comm returns). Its class attributes are those of
    :class:`moewire.comm.Comm`."""

    name: ClassVar[str] = "local"
    needs_topk_ids: ClassVar[bool] = False
    rank_ordered: ClassVar[bool] = True

    def __init__(self, combine_wire: str = "bf16") -> None:
        self.combine_wire = combine_wire

    def dispatch(
        self,
        rows_TR: torch.Tensor,
        topk_ids_TK: torch.Tensor | None = None,
        *,
        counts: Sequence[int] | torch.Tensor | None = None,
    ):
        if counts is not None:
            normalize_counts(counts, 1, 0, rows_TR.shape[0])
        return rows_TR, None

    def combine(self, partial_NH: torch.Tensor, handle: Any) -> torch.Tensor:
        if self.combine_wire == "bf16":
            return partial_NH
        from moewire.formats.combine import combine_codec

        codec = combine_codec(self.combine_wire, partial_NH.shape[1])
        index_T1 = torch.arange(partial_NH.shape[0], device=partial_NH.device)[:, None]
        return codec.decode_sum(codec.encode(partial_NH), index_T1, partial_NH.dtype)
