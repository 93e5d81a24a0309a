"""``alltoall``: sparse dispatch: a token goes once to each rank hosting one of its experts.

Experts are sharded contiguously: rank ``r`` hosts experts ``[r*E/W, (r+1)*E/W)``. A token
is sent exactly once to every rank that hosts at least one of its top-k experts (never
twice to one rank, never to a rank without one of its experts), so a token crosses the
wire ``min(W, distinct ranks of its top-k)`` times instead of ``W`` times as in
``allgather``. This wins when ``W > top_k`` or routing is local (few distinct ranks per
token), and at large token counts where bytes, not latency, dominate. Cost: the routing
must be known before the dispatch (``topk_ids``), a gather into the send order, and a
second small exchange when ``src_index=True``.

Dispatch: counts are exchanged first (one all-gather of every rank's ``[W]`` send counts),
then one ``all_to_all_single`` of rows. Combine: one ``all_to_all_single`` returns every
partial row to its source rank, which adds them per token in fp32 in a fixed order (by
destination rank), then rounds once to ``partial``'s dtype: deterministic on every device.

Shape legend: ``T`` tokens on this rank, ``K`` top-k, ``E`` experts, ``W`` world size,
``S`` rows sent, ``N`` rows received, ``R`` row bytes, ``H`` hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed import ProcessGroup

from moewire.comm._collectives import all_to_all, all_to_all_encoded
from moewire.comm.base import Comm, CommHandle, Counts, SendBuffer
from moewire.comm.counts import normalize_counts, offsets
from moewire.comm.expert_ids import check_topk_ids
from moewire.formats.combine import combine_codec
from moewire.formats.spec import WireSpec


@dataclass(frozen=True, eq=False)
class AllToAllHandle(CommHandle):
    """Handle of :class:`AllToAllComm`.

    Attributes (besides :class:`CommHandle`'s):
        send_src_index: int64 ``[S]`` on the rows' device: the local token index of each
            sent row, in send order (grouped by destination rank, ascending; within one
            destination in token order). The dispatch permutation: combine adds the
            returned rows onto these tokens without sorting again.
        recv_src_index: int64 ``[N]``: for each received row, its token index on its source
            rank; None unless the comm was made with ``src_index=True`` (costs one more
            small ``all_to_all_single`` per dispatch).
    """

    send_src_index: torch.Tensor
    recv_src_index: torch.Tensor | None


class AllToAllComm(Comm):
    """Sparse all-to-all dispatch and combine (see the module docstring).

    ``dispatch`` returns the received rows grouped by source rank in rank order, within one
    source in that source's token order. ``topk_ids`` is required.
    """

    name = "alltoall"
    needs_topk_ids = True
    rank_ordered = False

    def __init__(
        self,
        group: ProcessGroup | None = None,
        *,
        num_experts: int,
        spec: WireSpec | None = None,
        src_index: bool = False,
        combine_wire: str = "bf16",
        check: str = "once",
    ):
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        super().__init__(
            group, spec=spec, num_experts=num_experts, combine_wire=combine_wire, check=check
        )
        if num_experts % self.world_size:
            raise ValueError(
                f"num_experts={num_experts} must be a multiple of the group size "
                f"{self.world_size} (experts are sharded contiguously)"
            )
        self._num_experts = num_experts
        self._src_index = bool(src_index)
        self._agreement["src_index"] = int(self._src_index)

    @property
    def num_experts(self) -> int:
        """``E``, experts over the whole group."""
        return self._num_experts

    @property
    def num_local_experts(self) -> int:
        """``E / W``, experts hosted per rank; rank ``r`` hosts ``[r*E/W, (r+1)*E/W)``."""
        return self._num_experts // self.world_size

    def __repr__(self) -> str:
        return (
            f"AllToAllComm(rank={self.rank}, world_size={self.world_size}, "
            f"num_experts={self._num_experts})"
        )

    def dispatch(
        self,
        rows: torch.Tensor | SendBuffer,
        topk_ids: torch.Tensor | None = None,
        *,
        counts: Counts | None = None,
    ) -> tuple[torch.Tensor, AllToAllHandle]:
        """See :meth:`Comm.dispatch`. ``topk_ids`` is required; the rows are gathered into
        send order (a copy, whichever way they were packed).

        ``counts`` is checked (``counts[rank] == T``) but does not save the exchange: the
        rows each rank sends to each other rank depend on the routing, so this backend
        always all-gathers every rank's ``[W]`` send counts and reads them on the host (a
        host sync, not capturable in a CUDA graph; use ``allgather`` there)."""
        rows_TR, _ = self._send_rows(rows)
        t, r = rows_TR.shape
        device = rows_TR.device
        if topk_ids is None:
            raise ValueError(
                "topk_ids is required by the 'alltoall' backend (int32/int64 [T, K]); got None"
            )
        if counts is not None:
            normalize_counts(counts, self.world_size, self.rank, t)
        ids_TK = check_topk_ids(topk_ids, self._num_experts, num_tokens=t).to(device)
        w = self.world_size
        dest_TK = torch.div(ids_TK, self.num_local_experts, rounding_mode="floor").long()
        mask_TW = torch.zeros((t, w), dtype=torch.bool, device=device)
        mask_TW.scatter_(1, dest_TK, True)
        send_src_index = mask_TW.t().nonzero()[:, 1].contiguous()
        send_counts = tuple(mask_TW.sum(0).tolist())

        matrix = self._exchange(r, send_counts, device)
        recv_counts = tuple(matrix[src][self.rank] for src in range(w))
        n = sum(recv_counts)
        recv_NR = torch.empty((n, r), dtype=torch.uint8, device=device)
        send_SR = rows_TR.index_select(0, send_src_index)
        self._step = "all_to_all_single of rows"
        all_to_all(recv_NR, send_SR, list(recv_counts), list(send_counts), self.group)
        recv_src_index = None
        if self._src_index:
            recv_src_index = torch.empty(n, dtype=torch.int64, device=device)
            self._step = "all_to_all_single of the source indices"
            all_to_all(
                recv_src_index, send_src_index, list(recv_counts), list(send_counts), self.group
            )
        handle = AllToAllHandle(
            num_tokens=t,
            send_counts=send_counts,
            recv_counts=recv_counts,
            device=device,
            send_src_index=send_src_index,
            recv_src_index=recv_src_index,
        )
        return recv_NR, handle

    def combine(self, partial: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:  # type: ignore[override]
        """See :meth:`Comm.combine`. Sums in fp32, by destination rank in rank order, then
        rounds once to ``partial``'s dtype. With a quantized ``combine_wire`` the rows go
        back as combine rows (:mod:`moewire.formats.combine`) and the owner dequantizes
        and adds them in the same order."""
        partial_NH = self._check_partial(partial, handle, AllToAllHandle)
        if self._combine_wire != "bf16":
            return self._combine_quantized(partial_NH, handle)
        h = partial_NH.shape[1]
        s = sum(handle.send_counts)
        back_SH = partial_NH.new_empty((s, h))
        all_to_all(
            back_SH, partial_NH, list(handle.send_counts), list(handle.recv_counts), self.group
        )
        out_TH = torch.zeros((handle.num_tokens, h), dtype=torch.float32, device=handle.device)
        for start, count in zip(offsets(handle.send_counts), handle.send_counts, strict=True):
            if count:
                idx = handle.send_src_index[start : start + count]
                out_TH.index_add_(0, idx, back_SH[start : start + count].float())
        return out_TH.to(partial_NH.dtype)

    def _combine_quantized(self, partial_NH: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        codec = combine_codec(self._combine_wire, partial_NH.shape[1])
        device, w = partial_NH.device, self.world_size
        s = sum(handle.send_counts)
        self._step = f"all_to_all of {self._combine_wire} combine rows"
        back_SR = all_to_all_encoded(
            codec, partial_NH, s, list(handle.send_counts), list(handle.recv_counts), self.group
        )
        self._step = None
        counts_W = torch.tensor(handle.send_counts, dtype=torch.int64, device=device)
        dest_S = torch.repeat_interleave(torch.arange(w, device=device), counts_W, output_size=s)
        index_TW = torch.full((handle.num_tokens, w), -1, dtype=torch.int64, device=device)
        index_TW[handle.send_src_index, dest_S] = torch.arange(s, device=device)
        return codec.decode_sum(back_SR, index_TW, partial_NH.dtype)
