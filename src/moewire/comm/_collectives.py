"""The three tensor collectives the backends use, portable across torch versions and backends.

- torch 2.13 names them ``all_gather_single`` / ``reduce_scatter_single`` and deprecates
  ``all_gather_into_tensor`` / ``reduce_scatter_tensor``; torch 2.11 only has the latter.
  We pick whichever exists, so neither version warns.
- gloo (CPU) in torch 2.13 implements ``all_gather_single``, ``reduce_scatter_single`` and
  ``all_to_all_single`` for every dtype used here (uint8, int64, fp32, bf16; checked with
  2-4 ranks). Older gloo builds lack the first two; when gloo reports an op unsupported
  we fall back, on every rank alike (the error is raised locally, before any traffic):
  all-gather -> ``all_gather`` into a list of views of the one output buffer;
  reduce-scatter -> ``all_reduce`` of the whole padded input, then this rank's slice.
  NCCL always takes the real collective. ``all_to_all_single`` has no fallback.
- The all-gather and the reduce-scatter call the process group's own method (what c10d's
  wrapper ends in, with the same options: synchronous, ``SUM``), not the wrapper: its
  Python checks and logging decorator cost about ten microseconds of host time per call,
  and at decode sizes the layer's dispatch and combine are host-bound. The wrapper is
  taken where the group is inside c10d's coalescing manager (it records the op instead).

Shape legend: ``W`` world size, ``M`` rows per rank, ``C`` columns.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
#: The process group's methods those wrappers call (torch 2.13 names, else torch 2.11's).
_PG_ALL_GATHER = (
    "all_gather_single" if hasattr(ProcessGroup, "all_gather_single") else "_allgather_base"
)
_PG_REDUCE_SCATTER = (
    "reduce_scatter_single"
    if hasattr(ProcessGroup, "reduce_scatter_single")
    else "_reduce_scatter_base"
)


def _options(kind: str):
    """Options of a synchronous collective, as c10d's wrapper fills them (``SUM``)."""
    c10d = dist.distributed_c10d
    if kind == "all_gather":
        opts = c10d.AllgatherOptions()
    else:
        opts = c10d.ReduceScatterOptions()
        opts.reduceOp = dist.ReduceOp.SUM
    if hasattr(opts, "asyncOp"):
        opts.asyncOp = False
    return opts


def _coalescing(group: ProcessGroup) -> bool:
    """Whether ``group`` is inside c10d's coalescing manager (also where this torch keeps
    that state elsewhere: the wrapper is then the safe path)."""
    state = getattr(getattr(dist.distributed_c10d, "_world", None), "pg_coalesce_state", None)
    return state is None or group in state


def _direct(kind: str) -> Callable:
    """``collective(out, inp, group=group)`` through the group's own method where it has
    one (see the module docstring), else through c10d's wrapper."""
    method, wrapper = {
        "all_gather": (_PG_ALL_GATHER, _ALL_GATHER),
        "reduce_scatter": (_PG_REDUCE_SCATTER, _REDUCE_SCATTER),
    }[kind]
    opts = _options(kind)

    def collective(out: torch.Tensor, inp: torch.Tensor, group: ProcessGroup) -> None:
        fn = getattr(group, method, None)
        if fn is None or _coalescing(group):
            wrapper(out, inp, group=group)
            return
        work = fn(out, inp, opts)
        if work is not None:  # backends that synchronize in C++ return None
            work.wait()

    return collective


_ALL_GATHER_DIRECT = _direct("all_gather")
_REDUCE_SCATTER_DIRECT = _direct("reduce_scatter")

#: ``(backend, op)`` pairs found unsupported in this process; those take the fallback.
_UNSUPPORTED: set[tuple[str, str]] = set()


#: group -> its backend's name, lower case (looked up once per group: c10d's lookup costs
#: about a microsecond of host time per collective).
_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _backend(group: ProcessGroup) -> str:
    name = _BACKENDS.get(group)
    if name is None:
        name = _BACKENDS[group] = str(dist.get_backend(group)).lower()
    return name


def _is_unsupported(err: Exception) -> bool:
    msg = str(err).lower()
    return "support" in msg or "implement" in msg


def _native(name: str, collective, out: torch.Tensor, inp: torch.Tensor, group) -> bool:
    """Run the single-tensor collective; False where this gloo build does not implement it
    (remembered: the caller falls back to the list form from then on)."""
    key = (_backend(group), name)
    if key in _UNSUPPORTED:
        return False
    try:
        collective(out, inp, group)
        return True
    except (RuntimeError, NotImplementedError) as err:
        if key[0] != "gloo" or not _is_unsupported(err):
            raise
        _UNSUPPORTED.add(key)
        return False


def all_gather(out_WMC: torch.Tensor, in_MC: torch.Tensor, group: ProcessGroup) -> None:
    """Gather equal-size ``in_MC`` of every rank into ``out_WMC`` (``[W*M, C]``, rank order).

    ``in_MC`` may be this rank's slot of ``out_WMC`` (in-place all-gather)."""
    if not _native("all_gather", _ALL_GATHER_DIRECT, out_WMC, in_MC, group):
        world = dist.get_world_size(group)
        dist.all_gather(list(out_WMC.chunk(world)), in_MC.clone(), group=group)


def reduce_scatter(out_MC: torch.Tensor, in_WMC: torch.Tensor, group: ProcessGroup) -> None:
    """Sum ``in_WMC`` over ranks and keep this rank's block of ``M`` rows in ``out_MC``."""
    if not _native("reduce_scatter", _REDUCE_SCATTER_DIRECT, out_MC, in_WMC, group):
        total = in_WMC.clone()
        dist.all_reduce(total, group=group)
        m, rank = out_MC.shape[0], dist.get_rank(group)
        out_MC.copy_(total[rank * m : (rank + 1) * m])


def all_to_all(
    out_NC: torch.Tensor,
    in_SC: torch.Tensor,
    out_counts: list[int],
    in_counts: list[int],
    group: ProcessGroup,
) -> None:
    """Send ``in_counts[r]`` consecutive rows of ``in_SC`` to rank ``r``; receive
    ``out_counts[r]`` rows from rank ``r`` into ``out_NC`` (source-rank order)."""
    dist.all_to_all_single(out_NC, in_SC, out_counts, in_counts, group=group)


def all_to_all_encoded(
    codec,
    partial_NH: torch.Tensor,
    recv_rows: int,
    out_counts: list[int],
    in_counts: list[int],
    group: ProcessGroup,
    exchange: bool = True,
) -> torch.Tensor:
    """``partial_NH`` encoded by a combine ``codec`` (``moewire.formats.combine``) and sent
    as :func:`all_to_all` does; returns the received combine rows ``[recv_rows, R]``.
    ``exchange=False`` skips the collective: only where every rank skips it (no rank moves
    a row)."""
    send_NR = codec.encode(partial_NH)
    recv_XR = torch.empty((recv_rows, codec.row_bytes), dtype=torch.uint8, device=partial_NH.device)
    if exchange:
        all_to_all(recv_XR, send_NR, out_counts, in_counts, group)
    return recv_XR
