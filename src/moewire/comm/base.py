"""The dispatcher interface every backend implements, its handles and shared checks.

A backend moves wire rows (uint8 ``[T, R]``, one per token, see WIRE_FORMATS.md) from the
ranks that own the tokens to the ranks that host their experts (``dispatch``) and sums the
experts' partial outputs back onto the owners (``combine``). Backends only see bytes, so
every backend carries every format and every extra.

Token counts. A dispatch needs every rank's token count. Given by the caller
(``dispatch(rows, counts=[T_0, T_1, ...])``, as an engine's data-parallel metadata has it),
``allgather`` and ``grouped`` move the rows with no count exchange and no host sync; not
given, every dispatch first all-gathers one small int64 vector per rank (the counts plus a
fingerprint of the agreement values, :mod:`moewire.comm.agreement`) and reads it on the host.

Agreement. The values every rank must agree on (format, ``H``, global scale, extras, ``E``,
row width, ...) are checked in full once per comm, at its first dispatch, and again only
when they change (see :mod:`moewire.comm.agreement`; ``check="every_call"`` checks at every
dispatch). A disagreement raises ``ValueError`` on every rank alike, naming each rank's value.

A collective that fails (gloo and NCCL with ``TORCH_NCCL_BLOCKING_WAIT=1`` raise a
``RuntimeError`` when a peer dies or the group's timeout passes) is re-raised as
:class:`CommError` naming the moewire operation, with the original as ``__cause__``.

Shape legend: ``T`` tokens on this rank, ``N`` rows received, ``S`` rows sent (alltoall),
``R`` row bytes, ``H`` hidden, ``K`` top-k, ``W`` world size, ``M`` max tokens per rank.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from moewire.comm import agreement as agr
from moewire.comm.counts import normalize_counts
from moewire.comm.errors import CommError, group_timeout, named_failures
from moewire.formats.combine import (
    COMBINE_WIRES,
    check_combine_wire,
    check_partial_dtype,
)
from moewire.formats.spec import WireSpec

#: What ``counts=`` may be: a sequence of ints or a CPU integer tensor ``[W]``.
Counts = Sequence[int] | torch.Tensor


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
        combined: set by the combine that consumed this handle: a handle combines once.
            Not an argument, so ``dataclasses.replace(handle)`` is a fresh, uncombined
            copy: what a benchmark or a test that repeats a combine passes each time.
    """

    num_tokens: int
    send_counts: tuple[int, ...]
    recv_counts: tuple[int, ...]
    device: torch.device
    combined: bool = field(default=False, init=False, repr=False, compare=False)

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

    @classmethod
    def _trusted(cls, **fields: Any) -> CommHandle:
        """A handle of values this library computed (a backend's dispatch): built without
        the checks of ``__init__`` (a few microseconds of host time per dispatch)."""
        handle = object.__new__(cls)
        handle.__dict__.update(fields)  # ``combined``: the class default, as __init__ leaves it
        return handle

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
        return rows  # type: ignore[return-value]  # checked: uint8 [N, row_bytes], R >= 16
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
    #: Whether :meth:`dispatch` needs ``topk_ids`` (it sends a token only to the ranks of
    #: its experts): the caller routes its tokens before the dispatch.
    needs_topk_ids: ClassVar[bool] = False
    #: Whether :meth:`dispatch` returns every rank's rows, all of them, rank by rank (what
    #: padded batches, ``EPMoE.forward(valid_counts=...)``, rely on).
    rank_ordered: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for method in ("dispatch", "dispatch_buffer", "combine"):
            fn = cls.__dict__.get(method)
            if fn is not None and not getattr(fn, "_moewire_named", False):
                setattr(cls, method, named_failures(method, fn))

    def __init__(
        self,
        group: ProcessGroup | None = None,
        *,
        spec: WireSpec | None = None,
        num_experts: int | None = None,
        combine_wire: str = "bf16",
        check: str = "once",
    ):
        self._check_options(spec, combine_wire)
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
        if num_experts is not None and (
            isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1
        ):
            raise ValueError(f"num_experts must be a positive int or None, got {num_experts!r}")
        self._group = group
        self._rank = rank
        self._world_size = dist.get_world_size(group)
        self._spec = spec
        self._backend = str(dist.get_backend(group)).lower()
        #: Agreement values fixed at construction (see :data:`agreement.AGREE_KEYS`).
        self._agreement = {
            **dict.fromkeys(agr.AGREE_KEYS, agr.UNSET),
            "comm backend": agr.BACKEND_IDS.index(self.name),
            "src_index": 0,
            **agr.spec_agreement(spec),
            "num_experts": agr.UNSET if num_experts is None else num_experts,
            "combine wire": COMBINE_WIRES.index(combine_wire),
        }
        self._extras_text = agr.extras_text(spec)
        self._check_every_call = agr.check_mode(check)
        #: row width -> (agreement vector, its fingerprint), built on first use.
        self._vectors: dict[int, tuple[tuple[int, ...], int]] = {}
        #: The row width whose agreement every rank has confirmed (None: not yet).
        self._agreed_width: int | None = None
        self._combine_wire = combine_wire
        #: The collective running now, for :class:`CommError` messages.
        self._step: str | None = None

    @property
    def combine_wire(self) -> str:
        """How partial rows travel back (:data:`moewire.formats.combine.COMBINE_WIRES`)."""
        return self._combine_wire

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
        self,
        num_tokens: int,
        row_bytes: int,
        device: torch.device | str,
        *,
        counts: Counts | None = None,
    ) -> SendBuffer:
        """Rows to pack into, then pass to :meth:`dispatch` (the in-place send path).

        Args:
            num_tokens: ``T``, this rank's tokens (0 allowed).
            row_bytes: ``R``, bytes per row (``spec.row_bytes``).
            device: where the rows live (the group's device: CPU for gloo, CUDA for NCCL).
            counts: every rank's token count, as in :meth:`dispatch`; optional.

        Returns:
            a :class:`SendBuffer`; pack with ``spec.pack(x, out=buf.rows, ...)`` and call
            ``dispatch(buf, topk_ids)``. For ``allgather`` a collective unless ``counts`` is
            given (it exchanges the counts then, so dispatch does not); allocation only for
            the other backends.
        """
        self._check_buffer_args(num_tokens, row_bytes)
        if counts is not None:
            normalize_counts(counts, self.world_size, self.rank, num_tokens, "num_tokens")
        rows = torch.empty((num_tokens, row_bytes), dtype=torch.uint8, device=device)
        return SendBuffer(rows=rows, owner=self)

    @abstractmethod
    def dispatch(
        self,
        rows: torch.Tensor | SendBuffer,
        topk_ids: torch.Tensor | None = None,
        *,
        counts: Counts | None = None,
    ) -> tuple[torch.Tensor, CommHandle]:
        """Move this rank's rows to the ranks that need them.

        Args:
            rows: uint8 ``[T, R]`` wire rows on the group's device (CPU for gloo, CUDA
                for NCCL), or a :class:`SendBuffer` packed in place. ``T`` may be 0 and
                may differ per rank; ``R`` must be equal on every rank (``spec.row_bytes``
                when the comm has a ``spec``).
            topk_ids: int32/int64 ``[T, K]`` expert ids in ``[0, E)`` on any device;
                required by ``alltoall``, ignored by the others.
            counts: every rank's token count ``[T_0, ..., T_{W-1}]``: a sequence of ``W``
                non-negative Python ints or a CPU integer tensor ``[W]``, the same on every
                rank (an engine's data-parallel metadata), with ``counts[rank] == T``.
                ``allgather`` and ``grouped`` then skip the count exchange: no host sync and
                no blocking host-to-device copy (capturable in a CUDA graph, once the comm
                has checked agreement, i.e. after one eager dispatch). ``alltoall`` still
                exchanges its per-destination counts (data dependent). None: exchanged.
                Pass ``counts`` on every rank or on none in one dispatch (like any argument
                that decides which collectives run).

        Returns:
            ``(recv, handle)``: ``recv`` uint8 ``[N, R]`` (order: see the backend) and the
            handle to pass to :meth:`combine`; handles of both paths are alike.

        Raises:
            ValueError: ``counts`` of the wrong length, with a negative or non-int entry, or
                whose entry for this rank is not ``T`` (the message names both); a value the
                ranks disagree on (on every rank, naming each rank's value).
            CommError: a collective failed (a peer died or the group's timeout passed).
        """

    @abstractmethod
    def combine(self, partial: torch.Tensor, handle: CommHandle) -> torch.Tensor:
        """Sum every rank's partial outputs back onto the tokens' owner.

        Args:
            partial: bfloat16 or float32 ``[N, H]``, one row per received row of the
                matching dispatch (zeros where this rank's experts did not apply).
                ``H`` and the dtype must be the same on every rank; ``H == spec.hidden``
                when the comm has a ``spec``.
            handle: the handle that dispatch returned; it combines once (to repeat a
                combine on purpose, pass a fresh copy each time: ``dataclasses.replace``).

        Returns:
            ``[T, H]`` of ``partial``'s dtype: for each of this rank's tokens, the sum over
            all ranks' partial rows for it.

        Raises:
            ValueError: a combined ``handle``; ``partial`` of the wrong shape or device.
        """

    # ------------------------------------------------------------------- helpers
    def _check_options(self, spec: WireSpec | None, combine_wire: object) -> None:
        """What this backend accepts of ``spec`` and ``combine_wire`` (checked first)."""
        check_combine_wire(combine_wire)

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
            return self._check_device(check_rows(rows.rows, self._spec, "rows.rows")), rows
        return self._check_device(check_rows(rows, self._spec)), None

    def _check_device(self, rows: torch.Tensor) -> torch.Tensor:
        if self._backend == "nccl" and not rows.is_cuda:
            raise ValueError(
                f"rows are on {rows.device}, but the group's backend 'nccl' needs CUDA tensors"
            )
        return rows

    def _failure(self, method: str, start: float, err: BaseException) -> CommError:
        step = self._step or "a collective"
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return CommError(
            f"moewire {self.name}.{method} (rank {self._rank} of {self._world_size}): {step} "
            f"failed after {time.monotonic() - start:.1f} s (process-group timeout "
            f"{group_timeout(self._group)}): a peer rank died, exited, raised before this "
            f"call or did not reach it in time; the group is unusable now. "
            f"{type(err).__name__}: {first}"
        )

    def _vector(self, row_bytes: int) -> tuple[tuple[int, ...], int]:
        got = self._vectors.get(row_bytes)
        if got is None:
            vec = agr.agreement_vector({**self._agreement, "row width (bytes)": row_bytes})
            got = self._vectors[row_bytes] = (vec, agr.fingerprint(vec))
        return got

    def _check_agreement(self, row_bytes: int, device: torch.device) -> None:
        """The full agreement check (a small collective); raises on every rank alike."""
        self._step = "the agreement check (all_gather of the values every rank must share)"
        vec = self._vector(row_bytes)[0]
        who = f"{self.name} dispatch"
        agr.check_agreement(self._group, vec, self._extras_text, device, who)
        self._step = None
        self._agreed_width = row_bytes

    def _ensure_agreed(self, row_bytes: int, device: torch.device) -> None:
        """The full check at the first dispatch, after a row width change, or every call
        with ``check="every_call"``; nothing otherwise (no collective, no sync)."""
        if self._check_every_call or self._agreed_width != row_bytes:
            self._check_agreement(row_bytes, device)

    def _exchange(
        self, row_bytes: int, values: Sequence[int], device: torch.device
    ) -> list[tuple[int, ...]]:
        """All-gather this rank's ``values`` (int64, padded to ``W`` entries so that every
        backend sends the same length) with the fingerprint of its agreement values; returns
        each rank's ``values`` in rank order. A fingerprint that differs between ranks (seen
        by every rank alike) runs the full check, which raises naming the values."""
        fp = self._vector(row_bytes)[1]
        n = len(values)
        pad = [0] * (self._world_size - n) if n < self._world_size else []
        local = torch.tensor([fp, *values, *pad], dtype=torch.int64, device=device)
        from moewire.comm._collectives import all_gather

        out = torch.empty(self._world_size * local.numel(), dtype=torch.int64, device=device)
        self._step = "the count exchange (all_gather of the counts)"
        all_gather(out, local, self._group)
        self._step = None
        rows = out.view(self._world_size, -1).tolist()
        if self._check_every_call or any(r[0] != fp for r in rows):
            self._check_agreement(row_bytes, device)
        assert all(r[0] == fp for r in rows), "agreement fingerprints differ, values agree"
        self._agreed_width = row_bytes
        return [tuple(r[1 : 1 + n]) for r in rows]

    def _counts(
        self, row_bytes: int, num_tokens: int, counts: Counts | None, device: torch.device
    ) -> tuple[int, ...]:
        """Every rank's token count: ``counts`` checked (plus the agreement check when it is
        due), or exchanged when None."""
        if counts is None:
            return tuple(c for (c,) in self._exchange(row_bytes, [num_tokens], device))
        counts_W = normalize_counts(counts, self._world_size, self._rank, num_tokens)
        self._ensure_agreed(row_bytes, device)
        return counts_W

    def _check_partial(
        self, partial: object, handle: object, handle_type: type[CommHandle]
    ) -> torch.Tensor:
        if not isinstance(handle, handle_type):
            raise TypeError(
                f"handle must be the {handle_type.__name__} from this {self.name} comm's "
                f"dispatch, got {type(handle).__name__}"
            )
        check_partial_dtype(partial)
        if partial.dim() != 2 or partial.shape[0] != handle.num_recv:
            raise ValueError(
                f"partial must be [N={handle.num_recv}, H] (one row per received row), "
                f"got shape {tuple(partial.shape)}"
            )
        if self._spec is not None and partial.shape[1] != self._spec.hidden:
            raise ValueError(
                f"partial has hidden size {partial.shape[1]}, but this {self.name} comm's spec "
                f"has hidden={self._spec.hidden}: combine takes [N, spec.hidden] partial rows"
            )
        if partial.device != handle.device:
            raise ValueError(
                f"partial is on {partial.device}, the dispatched rows were on {handle.device}"
            )
        if handle.combined:
            raise ValueError(
                f"{self.name} combine: this handle was already combined; each dispatch's "
                "handle combines once: dispatch again (or, to repeat a combine on purpose, "
                "pass a fresh copy: dataclasses.replace(handle))"
            )
        object.__setattr__(handle, "combined", True)  # frozen: the one mutable field
        return partial.contiguous()
