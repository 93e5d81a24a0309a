"""``grouped``: vLLM's way before its PR 30014, kept as the measured baseline. It never wins.

Each section of the row (payload, scales, each extra) travels in its own collective, and
uneven per-rank counts are handled as vLLM did (vLLM's ``all_gatherv`` /
``reduce_scatterv``): dispatch is, per section, a group of ``W`` broadcasts (rank ``r``
broadcasts its ``T_r`` rows of that section); combine is a group of ``W`` reduces (the
rows of rank ``r``'s tokens are summed onto rank ``r``). That is ``W * sections``
collectives per dispatch where ``allgather`` issues one; on 4x H200 at DeepSeek-R1 shapes
it measured 122 us vs 39 us at 64 tokens/rank (DESIGN.md).

Each section's bytes up to the next section's offset (its zero padding included) travel
together, so the received rows equal ``allgather``'s bit for bit. The broadcasts of one
section are issued asynchronously and waited on together (a group of broadcasts).

Shape legend: ``T`` tokens on this rank, ``W`` world size, ``N`` rows received,
``R`` row bytes, ``H`` hidden.
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.distributed as dist

from moewire.comm.allgather import AllGatherHandle
from moewire.comm.base import Comm, Counts, SendBuffer
from moewire.comm.counts import offsets
from moewire.formats.combine import check_combine_wire
from moewire.formats.spec import WireSpec


def check_grouped_combine_wire(combine_wire: object) -> str:
    """Return ``combine_wire`` if it is ``"bf16"``, else raise ``ValueError``: the baseline
    sums the partial rows with one unquantized reduce per rank."""
    if check_combine_wire(combine_wire) != "bf16":
        raise ValueError(
            f"combine_wire={combine_wire!r}: comm='grouped' (the baseline: one collective per "
            "tensor, one reduce per rank) supports only combine_wire='bf16'; use 'allgather' "
            "or 'alltoall' for a quantized combine"
        )
    return combine_wire


def byte_ranges(spec: WireSpec) -> tuple[tuple[str, int, int], ...]:
    """``(section, start, stop)`` byte ranges that tile a row of ``spec`` in order; each
    section's range runs to the next section's offset (its padding included)."""
    secs = sorted(spec.sections.values(), key=lambda s: s.offset)
    out = []
    for i, sec in enumerate(secs):
        stop = secs[i + 1].offset if i + 1 < len(secs) else spec.row_bytes
        if stop > sec.offset:
            out.append((sec.name, sec.offset, stop))
    return tuple(out)


class GroupedComm(Comm):
    """One collective per row section (the baseline); needs ``spec``.

    ``dispatch`` returns every rank's rows in rank order, bit-identical to ``allgather``;
    ``topk_ids`` is ignored. ``combine`` sums in ``partial``'s dtype with one reduce per
    rank (vLLM's ``reduce_scatterv``); its handle is an :class:`AllGatherHandle`.
    """

    name = "grouped"

    def _check_options(self, spec: WireSpec | None, combine_wire: object) -> None:
        check_grouped_combine_wire(combine_wire)
        if spec is None:
            raise ValueError(
                "the 'grouped' backend needs spec= (a moewire.WireSpec) to send each row "
                "section in its own collective; got None"
            )

    @cached_property
    def _ranges(self) -> tuple[tuple[str, int, int], ...]:
        assert self._spec is not None
        return byte_ranges(self._spec)

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)

    def dispatch(
        self,
        rows: torch.Tensor | SendBuffer,
        topk_ids: torch.Tensor | None = None,
        *,
        counts: Counts | None = None,
    ) -> tuple[torch.Tensor, AllGatherHandle]:
        """See :meth:`Comm.dispatch`. ``recv``: uint8 ``[sum_r T_r, R]`` in rank order.
        With ``counts`` no count exchange: only the broadcasts of the row sections."""
        rows_TR, _ = self._send_rows(rows)
        t, r = rows_TR.shape
        device = rows_TR.device
        counts = self._counts(r, t, counts, device)
        starts = offsets(counts)
        recv_NR = torch.empty((sum(counts), r), dtype=torch.uint8, device=device)
        for section, lo, hi in self._ranges:
            self._step = f"the broadcasts of the {section!r} section"
            parts, works = [], []
            for src, count in enumerate(counts):
                if count == 0:
                    continue
                if src == self.rank:
                    part = rows_TR[:, lo:hi].contiguous()
                else:
                    part = torch.empty((count, hi - lo), dtype=torch.uint8, device=device)
                works.append(
                    dist.broadcast(part, self._global(src), group=self.group, async_op=True)
                )
                parts.append((src, part))
            for work in works:
                work.wait()
            for src, part in parts:
                recv_NR[starts[src] : starts[src] + counts[src], lo:hi] = part
        handle = AllGatherHandle._trusted(
            num_tokens=t,
            send_counts=(t,) * self.world_size,
            recv_counts=counts,
            device=device,
            max_count=max(counts),
            padded_index=None,
        )
        return recv_NR, handle

    def combine(self, partial: torch.Tensor, handle: AllGatherHandle) -> torch.Tensor:  # type: ignore[override]
        """See :meth:`Comm.combine`: one reduce per rank onto that rank's tokens."""
        partial_NH = self._check_partial(partial, handle, AllGatherHandle)
        # reduce() may overwrite a non-root's input (gloo does), so work on a copy.
        work_NH = partial_NH.clone()
        starts = offsets(handle.recv_counts)
        works = []
        for dst, count in enumerate(handle.recv_counts):
            if count:
                seg = work_NH[starts[dst] : starts[dst] + count]
                works.append(dist.reduce(seg, self._global(dst), group=self.group, async_op=True))
        for work in works:
            work.wait()
        mine = starts[self.rank]
        return work_NH[mine : mine + handle.num_tokens]
