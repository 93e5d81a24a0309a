"""Communication: move wire rows between ranks (dispatch) and sum partial outputs back
(combine). Backends only see uint8 rows ``[T, R]``, so each carries every format and extra.

- ``allgather`` (:mod:`.allgather`): one all-gather / one reduce-scatter; the default.
- ``alltoall`` (:mod:`.alltoall`): sparse, each token only to the ranks of its experts.
- ``grouped`` (:mod:`.grouped`): the one-collective-per-section baseline (vLLM before PR 30014).

Usage (every call is a collective over ``group``)::

    comm = mw.make_comm("allgather", group)
    recv_NR, handle = comm.dispatch(spec.pack(x_TH, **extras))
    out_TH = comm.combine(partial_NH, handle)  # [T, H]; a handle combines once

    # to repeat a combine of one dispatch on purpose (timing, tests): a fresh copy each time
    out_TH = comm.combine(partial_NH, dataclasses.replace(handle))

    # every rank's token count known (an engine's DP metadata): no count exchange
    recv_NR, handle = comm.dispatch(rows_TR, counts=[T0, T1, ...])

    # zero-copy send: pack straight into this rank's slot of the all-gather buffer
    buf = comm.dispatch_buffer(x_TH.shape[0], spec.row_bytes, x_TH.device)
    spec.pack(x_TH, out=buf.rows, **extras)
    recv_NR, handle = comm.dispatch(buf)
"""

from __future__ import annotations

from typing import Any

from torch.distributed import ProcessGroup

from moewire.comm.allgather import AllGatherComm, AllGatherHandle
from moewire.comm.alltoall import AllToAllComm, AllToAllHandle
from moewire.comm.base import Comm, CommError, CommHandle, SendBuffer
from moewire.comm.grouped import GroupedComm
from moewire.formats.combine import COMBINE_DTYPES, COMBINE_WIRES, CombineCodec
from moewire.formats.spec import WireSpec

_BACKENDS: dict[str, type[Comm]] = {
    "allgather": AllGatherComm,
    "alltoall": AllToAllComm,
    "grouped": GroupedComm,
}
#: Backend names :func:`make_comm` accepts.
COMMS: tuple[str, ...] = tuple(_BACKENDS)


def make_comm(
    name: str,
    group: ProcessGroup | None = None,
    *,
    num_experts: int | None = None,
    spec: WireSpec | None = None,
    combine_wire: str = "bf16",
    check: str = "once",
    **kw: Any,
) -> Comm:
    """Build a dispatch/combine backend on a process group.

    Args:
        name: one of :data:`COMMS`: ``"allgather"``, ``"alltoall"`` or ``"grouped"``.
        group: any initialized ``torch.distributed`` process group (gloo with CPU rows,
            NCCL with CUDA rows); None means the default group.
        num_experts: ``E``, experts over the group; required by ``"alltoall"`` and a
            multiple of the group size (rank ``r`` hosts ``[r*E/W, (r+1)*E/W)``); optional
            otherwise (then only checked to be equal on every rank at dispatch).
        spec: the :class:`~moewire.WireSpec` of the rows; required by ``"grouped"``
            (section boundaries), optional otherwise (then dispatch checks
            ``rows.shape[1] == spec.row_bytes`` and that every rank uses the same format,
            hidden size, nvfp4 global scale and extras layout, and combine that
            ``partial.shape[1] == spec.hidden``).
        combine_wire: how ``combine`` moves the partial rows back, one of
            :data:`COMBINE_WIRES`: ``"bf16"`` (default: unquantized, in the partial dtype),
            ``"fp8"``, ``"mxfp8"``, ``"nvfp4"`` (dynamic per-row global scale) or
            ``"mxfp4"``; see :mod:`moewire.formats.combine`. ``"grouped"`` (the
            baseline) supports only ``"bf16"``.
        check: when every rank's agreement on the values above (and the row width) is
            checked in full: ``"once"`` (default: at the first dispatch, again if the row
            width changes; dispatches that exchange counts also compare a fingerprint of
            them for free) or ``"every_call"`` (a debug option: one more small collective
            and host sync per dispatch, also with ``counts=``). The environment variable
            ``MOEWIRE_CHECK_EVERY_CALL=1`` turns every comm to ``"every_call"``.
        **kw: backend options: ``"alltoall"`` takes ``src_index: bool`` (fill
            ``handle.recv_src_index``, one more small collective per dispatch).

    Returns:
        a :class:`Comm` with ``dispatch(rows, topk_ids=None, *, counts=None) -> (recv,
        handle)``,
        ``combine(partial, handle) -> out`` and ``dispatch_buffer(T, R, device)``.
    """
    if name not in _BACKENDS:
        raise ValueError(f"comm name must be one of {COMMS}, got {name!r}")
    if name == "alltoall" and num_experts is None:
        raise ValueError("make_comm('alltoall') needs num_experts=E; got None")
    if kw and name != "alltoall":
        raise TypeError(f"make_comm({name!r}) got unexpected options {sorted(kw)}")
    return _BACKENDS[name](
        group, spec=spec, num_experts=num_experts, combine_wire=combine_wire, check=check, **kw
    )


__all__ = [
    "COMBINE_DTYPES",
    "COMBINE_WIRES",
    "COMMS",
    "AllGatherComm",
    "AllGatherHandle",
    "AllToAllComm",
    "AllToAllHandle",
    "CombineCodec",
    "Comm",
    "CommError",
    "CommHandle",
    "GroupedComm",
    "SendBuffer",
    "make_comm",
]
