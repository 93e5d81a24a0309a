"""The dispatcher interface every backend implements, its handles and shared checks.

A backend moves wire rows (uint8 ``[T, R]``, one per token, see WIRE_FORMATS.md) from the
ranks that own the tokens to the ranks that host their experts (``dispatch``) and sums the
experts' partial outputs back onto the owners (``combine``). Backends only see bytes, so
every backend carries every format and every extra.

Every dispatch starts with one small all-gather of an int64 vector per rank: the values all
ranks must agree on (today: the row width ``R``; alltoall also ``E``), then the backend's
counts. A disagreement raises ``ValueError`` on every rank alike, naming each rank's value,
instead of deadlocking or corrupting a collective. Issue 8 adds its agreement fields here.

Shape legend: ``T`` tokens on this rank, ``N`` rows received, ``S`` rows sent (alltoall),
``R`` row bytes, ``H`` hidden, ``K`` top-k, ``W`` world size, ``M`` max tokens per rank.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from moewire.formats.spec import WireSpec

#: dtypes :meth:`Comm.combine` accepts (and returns): partial sums are added in this dtype.
COMBINE_DTYPES = (torch.bfloat16, torch.float32)


def _check_counts(name: str, counts: object) -> None:
    if not isinstance(counts, tuple) or not all(
        isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts
    ):
        raise ValueError(f"{name} must be a tuple of non-negative ints, got {counts!r}")


@dataclass(frozen=True, eq=False)
class CommHandle:
    """What :meth:`Comm.combine` needs to undo one :meth:`Comm.dispatch`.

    Attributes:
        num_tokens: ``T``, tokens this rank dispatched (rows combine returns).
        send_counts: ``[W]`` rows this rank sent to each rank.
        recv_counts: ``[W]`` rows this rank received from each rank (``N = sum``).
        device: device of the dispatched rows; combine's input must be on it.
    """

    num_tokens: int
    send_counts: tuple[int, ...]
    recv_counts: tuple[int, ...]
    device: torch.device

    def __post_init__(self) -> None:
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int):
            raise TypeError(f"num_tokens must be an int, got {self.num_tokens!r}")
        if self.num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {self.num_tokens}")
        _check_counts("send_counts", self.send_counts)
        _check_counts("recv_counts", self.recv_counts)
        if len(self.send_counts) != len(self.recv_counts):
            raise ValueError(
                f"send_counts and recv_counts must have one entry per rank, got "
                f"{len(self.send_counts)} and {len(self.recv_counts)}"
            )

    @property
    def num_recv(self) -> int:
        """``N``: rows received, the rows ``combine`` expects."""
        return sum(self.recv_counts)


@dataclass(frozen=True, eq=False)
class SendBuffer:
    """Rows to pack into before :meth:`Comm.dispatch` (from :meth:`Comm.dispatch_buffer`).

    Attributes:
        rows: uint8 ``[T, R]``; write every byte of it (``spec.pack(x, out=buf.rows)``).
            For ``allgather`` it is this rank's slot of the all-gather output, so dispatch
            sends it without a copy; for the other backends a plain tensor.
        buffer: ``allgather`` only: the whole output, uint8 ``[W*M, R]``; else None.
        gathered: ``allgather`` only: the exchanged per-rank ``(R, T)`` pairs; else None.
    """

    rows: torch.Tensor
    buffer: torch.Tensor | None = None
    gathered: tuple[tuple[int, ...], ...] | None = None
    owner: object = field(default=None, repr=False)


def check_rows(rows: object, spec: WireSpec | None, name: str = "rows") -> torch.Tensor:
    """Raise unless ``rows`` is uint8 ``[T, R]`` (``R == spec.row_bytes`` when given)."""
    if spec is not None:
        spec.check_rows(rows, name)  # type: ignore[arg-type]
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(rows).__name__}")
    if rows.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8 wire rows, got dtype {rows.dtype}")
    if rows.dim() != 2 or rows.shape[1] == 0:
        raise ValueError(f"{name} must be [T, R] with R >= 1, got shape {tuple(rows.shape)}")
    return rows


class Comm(ABC):
    """A dispatch/combine backend on one process group (see :func:`moewire.make_comm`).

    Every method that takes tensors is a collective: every rank of the group calls it, in
    the same order as its other collectives on the group, also ranks with zero tokens.
    Collectives run under the group's timeout (``init_process_group(timeout=...)``).
    """

    name: ClassVar[str]

    def __init__(self, group: ProcessGroup | None = None, *, spec: WireSpec | None = None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"make_comm({self.name!r}) needs torch.distributed initialized "
                "(call torch.distributed.init_process_group first)"
            )
        if group is None:
            group = dist.group.WORLD
        if not isinstance(group, ProcessGroup):
            raise TypeError(f"group must be a ProcessGroup or None, got {type(group).__name__}")
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError("group: this process is not a member of the given process group")
        if spec is not None and not isinstance(spec, WireSpec):
            raise TypeError(f"spec must be a moewire.WireSpec or None, got {type(spec).__name__}")
        self._group = group
        self._rank = rank
        self._world_size = dist.get_world_size(group)
        self._spec = spec

    @property
    def group(self) -> ProcessGroup:
        return self._group

    @property
    def rank(self) -> int:
        """This process's rank in :attr:`group`."""
        return self._rank

    @property
    def world_size(self) -> int:
        """``W``, ranks in :attr:`group`."""
        return self._world_size

    @property
    def spec(self) -> WireSpec | None:
        """The row layout dispatch checks rows against, or None (any uint8 rows)."""
        return self._spec

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self._rank}, world_size={self._world_size})"

    # ------------------------------------------------------------------- the API
    def dispatch_buffer(
        self, num_tokens: int, row_bytes: int, device: torch.device | str
    ) -> SendBuffer:
        """Rows to pack into, then pass to :meth:`dispatch` (the in-place send path).

        Args:
            num_tokens: ``T``, this rank's tokens (0 allowed).
            row_bytes: ``R``, bytes per row (``spec.row_bytes``).
            device: where the rows live (the group's device: CPU for gloo, CUDA for NCCL).

        Returns:
            a :class:`SendBuffer`; pack with ``spec.pack(x, out=buf.rows, ...)`` and call
            ``dispatch(buf, topk_ids)``. A collective for ``allgather`` (it exchanges the
            counts then, so dispatch does not); allocation only for the other backends.
        """
        self._check_buffer_args(num_tokens, row_bytes)
        rows = torch.empty((num_tokens, row_bytes), dtype=torch.uint8, device=device)
        return SendBuffer(rows=rows, owner=self)

    @abstractmethod
    def dispatch(
        self, rows: torch.Tensor | SendBuffer, topk_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, CommHandle]:
        """Move this rank's rows to the ranks that need them.

        Args:
            rows: uint8 ``[T, R]`` wire rows (``T`` may be 0 and may differ per rank; ``R``
                must be equal on every rank), or a :class:`SendBuffer` packed in place.
            topk_ids: int32/int64 ``[T, K]`` expert ids in ``[0, E)``; needed by
                ``alltoall``, ignored by the others.

        Returns:
            ``(recv, handle)``: ``recv`` uint8 ``[N, R]`` (order: see the backend) and the
            handle to pass to :meth:`combine`.
        """

    @abstractmethod
    def combine(self, partial: torch.Tensor, handle: CommHandle) -> torch.Tensor:
        """Sum every rank's partial outputs back onto the tokens' owner.

        Args:
            partial: bfloat16 or float32 ``[N, H]``, one row per received row of the
                matching dispatch (zeros where this rank's experts did not apply).
                ``H`` and the dtype must be the same on every rank.
            handle: the handle that dispatch returned.

        Returns:
            ``[T, H]`` of ``partial``'s dtype: for each of this rank's tokens, the sum over
            all ranks' partial rows for it.
        """

    # ------------------------------------------------------------------- helpers
    def _check_buffer_args(self, num_tokens: int, row_bytes: int) -> None:
        for name, v, lo in (("num_tokens", num_tokens, 0), ("row_bytes", row_bytes, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if self._spec is not None and row_bytes != self._spec.row_bytes:
            raise ValueError(
                f"row_bytes={row_bytes} does not match spec.row_bytes={self._spec.row_bytes}"
            )

    def _send_rows(self, rows: torch.Tensor | SendBuffer) -> tuple[torch.Tensor, SendBuffer | None]:
        if isinstance(rows, SendBuffer):
            if rows.owner is not self:
                raise ValueError("rows: this SendBuffer was made by another Comm's dispatch_buffer")
            return check_rows(rows.rows, self._spec, "rows.rows"), rows
        return check_rows(rows, self._spec), None

    def _exchange(
        self,
        agree: Mapping[str, int],
        values: Sequence[int],
        device: torch.device,
    ) -> list[tuple[int, ...]]:
        """All-gather ``[*agree.values(), *values]`` (int64) from every rank; raise
        ``ValueError`` on every rank if an ``agree`` entry differs. Returns each rank's
        ``values``, in rank order."""
        local = torch.tensor([*agree.values(), *values], dtype=torch.int64, device=device)
        from moewire.comm._collectives import all_gather

        out = torch.empty(self._world_size * local.numel(), dtype=torch.int64, device=device)
        all_gather(out, local, self._group)
        rows = [tuple(r) for r in out.view(self._world_size, -1).tolist()]
        for i, key in enumerate(agree):
            seen = [r[i] for r in rows]
            if len(set(seen)) > 1:
                per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(seen))
                raise ValueError(
                    f"{key} differs across ranks ({per_rank}); every rank must use the "
                    f"same value ({self.name} dispatch)"
                )
        return [r[len(agree) :] for r in rows]

    def _check_partial(
        self, partial: object, handle: object, handle_type: type[CommHandle]
    ) -> torch.Tensor:
        if not isinstance(handle, handle_type):
            raise TypeError(
                f"handle must be the {handle_type.__name__} from this {self.name} comm's "
                f"dispatch, got {type(handle).__name__}"
            )
        if not isinstance(partial, torch.Tensor):
            raise TypeError(f"partial must be a torch.Tensor, got {type(partial).__name__}")
        if partial.dtype not in COMBINE_DTYPES:
            raise TypeError(f"partial must be bfloat16 or float32, got dtype {partial.dtype}")
        if partial.dim() != 2 or partial.shape[0] != handle.num_recv:
            raise ValueError(
                f"partial must be [N={handle.num_recv}, H] (one row per received row), "
                f"got shape {tuple(partial.shape)}"
            )
        if partial.device != handle.device:
            raise ValueError(
                f"partial is on {partial.device}, the dispatched rows were on {handle.device}"
            )
        return partial.contiguous()


def offsets(counts: Sequence[int]) -> list[int]:
    """Exclusive prefix sum: where each rank's block starts in a rank-ordered buffer."""
    out, acc = [], 0
    for c in counts:
        out.append(acc)
        acc += c
    return out
