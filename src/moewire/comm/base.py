"""The dispatcher interface every backend implements, its handles and shared checks.

A backend moves wire rows (uint8 ``[T, R]``, one per token, see WIRE_FORMATS.md) from the
ranks that own the tokens to the ranks that host their experts (``dispatch``) and sums the
experts' partial outputs back onto the owners (``combine``). Backends only see bytes, so
every backend carries every format and every extra.

Every dispatch starts with one small all-gather of an int64 vector per rank: the values all
ranks must agree on (:data:`AGREE_KEYS`: backend, row width ``R``, and where the comm knows
them the wire format, ``H``, the nvfp4 global scale, the extras layout, ``E``), then the
backend's counts. The vector has the same length on every rank whatever the backend, so a
disagreement raises ``ValueError`` on every rank alike, naming each rank's value, instead of
deadlocking or corrupting a collective. It rides in the count exchange each dispatch makes
anyway: no extra collective.

A collective that fails (gloo and NCCL with ``TORCH_NCCL_BLOCKING_WAIT=1`` raise a
``RuntimeError`` when a peer dies or the group's timeout passes) is re-raised as
:class:`CommError` naming the moewire operation, with the original as ``__cause__``.

Shape legend: ``T`` tokens on this rank, ``N`` rows received, ``S`` rows sent (alltoall),
``R`` row bytes, ``H`` hidden, ``K`` top-k, ``W`` world size, ``M`` max tokens per rank.
"""

from __future__ import annotations

import functools
import struct
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from moewire.comm.combine_wire import COMBINE_DTYPES, COMBINE_WIRES, check_combine_wire
from moewire.formats import FORMATS
from moewire.formats.spec import WireSpec

#: Backend names in the order of their agreement id (append only: the id is on the wire).
_BACKEND_IDS = ("allgather", "alltoall", "grouped")
#: The values every rank's dispatch must agree on, in wire order; ``-1`` means "not known
#: to this comm" (no ``spec`` / no ``num_experts`` given), which must agree too.
AGREE_KEYS = (
    "comm backend",
    "row width (bytes)",
    "wire format",
    "hidden",
    "nvfp4 global_scale",
    "extras layout",
    "num_experts",
    "src_index",
    "combine wire",
)
_UNSET = -1


def _show(key: str, value: int) -> str:
    if value == _UNSET and key not in ("row width (bytes)", "src_index"):
        return "not given"
    if key == "comm backend" and 0 <= value < len(_BACKEND_IDS):
        return repr(_BACKEND_IDS[value])
    if key == "wire format" and 0 <= value < len(FORMATS):
        return repr(FORMATS[value])
    if key == "nvfp4 global_scale":
        return repr(struct.unpack("<d", struct.pack("<q", value))[0])
    if key == "extras layout":
        return f"{value:#010x}"
    if key == "combine wire" and 0 <= value < len(COMBINE_WIRES):
        return repr(COMBINE_WIRES[value])
    return str(value)


def _spec_agreement(spec: WireSpec | None) -> dict[str, int]:
    if spec is None:
        return {}
    g = spec.global_scale
    layout = ";".join(f"{n}:{d}:{w}" for n, (d, w) in spec.extras.items())
    return {
        "wire format": FORMATS.index(spec.format),
        "hidden": spec.hidden,
        "nvfp4 global_scale": (
            _UNSET if g is None else struct.unpack("<q", struct.pack("<d", float(g)))[0]
        ),
        "extras layout": zlib.crc32(layout.encode()),
    }


class CommError(RuntimeError):
    """A collective of a moewire comm failed: a peer rank died, exited, raised before the
    call or did not reach it within the process group's timeout. The group is unusable
    afterwards (destroy it and restart the ranks). ``__cause__`` is torch's error."""


def _group_timeout(group: ProcessGroup) -> str:
    for device in ("cpu", "cuda"):
        try:
            backend = group._get_backend(torch.device(device))
            return f"{backend.options._timeout.total_seconds():g} s"
        except Exception:
            continue
    return "unknown"


_F = TypeVar("_F", bound=Callable[..., Any])


def _named_failures(method: str, fn: _F) -> _F:
    """Wrap a collective method so that a torch.distributed failure inside it raises
    :class:`CommError` naming the backend, the method and the collective."""

    @functools.wraps(fn)
    def wrapper(self: Comm, *args: Any, **kwargs: Any) -> Any:
        self._step = None
        start = time.monotonic()
        try:
            return fn(self, *args, **kwargs)
        except (CommError, torch.OutOfMemoryError):
            raise
        except RuntimeError as err:
            raise self._failure(method, start, err) from err

    wrapper._moewire_named = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for method in ("dispatch", "dispatch_buffer", "combine"):
            fn = cls.__dict__.get(method)
            if fn is not None and not getattr(fn, "_moewire_named", False):
                setattr(cls, method, _named_failures(method, fn))

    def __init__(
        self,
        group: ProcessGroup | None = None,
        *,
        spec: WireSpec | None = None,
        num_experts: int | None = None,
        combine_wire: str = "bf16",
    ):
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
        #: Agreement values fixed at construction (see :data:`AGREE_KEYS`).
        self._agreement = {
            **dict.fromkeys(AGREE_KEYS, _UNSET),
            "comm backend": _BACKEND_IDS.index(self.name) if self.name in _BACKEND_IDS else _UNSET,
            "src_index": 0,
            **_spec_agreement(spec),
            "num_experts": _UNSET if num_experts is None else num_experts,
            "combine wire": COMBINE_WIRES.index(check_combine_wire(combine_wire)),
        }
        self._combine_wire = combine_wire
        #: The collective running now, for :class:`CommError` messages.
        self._step: str | None = None

    @property
    def combine_wire(self) -> str:
        """How partial rows travel back (:data:`moewire.comm.combine_wire.COMBINE_WIRES`)."""
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
            return self._check_device(check_rows(rows.rows, self._spec, "rows.rows")), rows
        return self._check_device(check_rows(rows, self._spec)), None

    def _check_device(self, rows: torch.Tensor) -> torch.Tensor:
        if self._backend == "nccl" and rows.device.type != "cuda":
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
            f"{_group_timeout(self._group)}): a peer rank died, exited, raised before this "
            f"call or did not reach it in time; the group is unusable now. "
            f"{type(err).__name__}: {first}"
        )

    def _exchange(
        self,
        agree: Mapping[str, int],
        values: Sequence[int],
        device: torch.device,
    ) -> list[tuple[int, ...]]:
        """All-gather this rank's agreement vector (:data:`AGREE_KEYS`, from the comm's own
        values updated with ``agree``) and ``values`` (int64, padded to ``W`` entries so that
        every backend sends the same length); raise ``ValueError`` on every rank if an
        agreement value differs, naming each rank's value. Returns each rank's ``values``,
        in rank order."""
        fields = {**self._agreement, **agree}
        assert len(fields) == len(AGREE_KEYS), f"unknown agreement keys {sorted(agree)}"
        n = len(values)
        pad = [0] * (self._world_size - n) if n < self._world_size else []
        local = torch.tensor(
            [*(fields[k] for k in AGREE_KEYS), *values, *pad], dtype=torch.int64, device=device
        )
        from moewire.comm._collectives import all_gather

        out = torch.empty(self._world_size * local.numel(), dtype=torch.int64, device=device)
        self._step = "the count exchange (all_gather of the agreement values and counts)"
        all_gather(out, local, self._group)
        self._step = None
        rows = [tuple(r) for r in out.view(self._world_size, -1).tolist()]
        for i, key in enumerate(AGREE_KEYS):
            seen = [r[i] for r in rows]
            if len(set(seen)) > 1:
                per_rank = ", ".join(f"rank {r}: {_show(key, v)}" for r, v in enumerate(seen))
                raise ValueError(
                    f"{key} differs across ranks ({per_rank}); every rank must use the "
                    f"same value ({self.name} dispatch)"
                )
        k = len(AGREE_KEYS)
        return [r[k : k + n] for r in rows]

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
