"""The one process-spawn harness: a function on every rank of a fresh process group.

    from moewire.testing.spawn import run_distributed

    def _worker(n):                       # module level, so spawn can pickle it
        rank = torch.distributed.get_rank()
        return {"x": torch.full((n,), rank)}

    results = run_distributed(_worker, 3, 5, timeout=60)   # [rank 0's dict, rank 1's, ...]

Each call spawns ``world_size`` fresh processes (torch.multiprocessing, ``spawn``; about 2-4 s
each, so run many cases inside one call), initializes a process group over a ``file://``
store in a private temporary directory (no network beyond this host; gloo on CPU, or NCCL
with one GPU per rank), calls ``fn(*args)`` on every rank and returns the results to the
parent, where the assertions belong. Tensors come back on CPU.

:func:`run_distributed` is what tests and checks call: a worker exception is re-raised in
the parent (same type where it pickles) with the worker's traceback attached as its
``__cause__``; a run that exceeds ``timeout`` seconds (e.g. a collective that one rank
never joins) kills every worker and raises ``TimeoutError``. Collectives inside the workers
also time out after ``timeout`` seconds. :func:`spawn` is the same run returning how each
rank ended (:class:`RankOutcome`) instead of raising, for callers that inspect failures
(``moewire bench`` turns a worker's ``ValueError`` into one line; the dead-peer tests let
a rank die or hang). :func:`init_group` is the group set-up both use, also for ranks that
torchrun started.
"""

from __future__ import annotations

import datetime
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Collection
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

import torch
import torch.multiprocessing as mp

#: Seconds the parent waits for the other ranks after one rank failed before killing them.
GRACE_S = 5.0


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a worker process."""

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class RankOutcome:
    """How one spawned rank ended."""

    rank: int
    pid: int
    #: The process's exit code (1 after ``fn`` raised; negative: killed by that signal).
    exitcode: int | None
    #: ``fn``'s return value, tensors on CPU; None where it failed or hung.
    result: Any = None
    #: The exception ``fn`` (or the group set-up) raised; None where it returned.
    error: BaseException | None = None
    traceback: str = ""
    #: ``time.time()`` of the failure (orders the failures of a run).
    failed_at: float | None = None
    #: Still running when the run ended (deadline, grace after a failure, or the ranks
    #: waited for were done), and killed by the parent.
    hung: bool = False


def init_group(
    rank: int,
    world_size: int,
    init_method: str,
    *,
    device_type: str = "cpu",
    timeout: float = 60.0,
) -> torch.device:
    """Initialize the default process group and return this rank's device.

    Args:
        rank, world_size: this process's rank and the number of ranks.
        init_method: ``file://PATH`` (a store on this host) or ``env://`` (torchrun).
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL on GPU ``LOCAL_RANK`` where
            torchrun set it, else GPU ``rank``).
        timeout: seconds after which a collective that cannot complete raises.
    """
    import torch.distributed as dist

    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    kwargs: dict[str, Any] = {}
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout),
        **kwargs,
    )
    return device


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


@dataclass(frozen=True)
class _Options:
    world_size: int
    tmpdir: str
    device_type: str
    timeout: float
    threads: int | None


def _worker(rank: int, opts: _Options, fn: Callable[..., Any], args: tuple) -> None:
    import torch.distributed as dist

    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    failed_at: float | None = None  # when fn raised, before the group is torn down
    try:
        init_group(
            rank,
            opts.world_size,
            f"file://{os.path.join(opts.tmpdir, 'store')}",
            device_type=opts.device_type,
            timeout=opts.timeout,
        )
        try:
            result = _to_cpu(fn(*args))
        except BaseException:
            failed_at = time.time()
            raise
        finally:
            dist.destroy_process_group()
        _write(torch.save, result, _path(opts.tmpdir, "result", rank))
    except BaseException as exc:
        tb = traceback.format_exc()
        try:
            pickle.dumps(exc)
        except Exception:
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        _write(pickle.dump, (failed_at or time.time(), exc, tb), _path(opts.tmpdir, "error", rank))
        sys.exit(1)  # the error is in the file: exit code 1 without a second traceback


def _path(tmpdir: str, kind: str, rank: int) -> str:
    return os.path.join(tmpdir, f"{kind}_{rank}.pkl")


def _write(dump: Callable[[Any, Any], None], obj: Any, path: str) -> None:
    with open(path + ".tmp", "wb") as f:
        dump(obj, f)
    os.replace(path + ".tmp", path)


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    run_timeout: float | None = None,
    threads: int | None = 1,
    device_type: str = "cpu",
    grace: float | None = GRACE_S,
    wait_for: Collection[int] | None = None,
) -> list[RankOutcome]:
    """Run ``fn(*args)`` on every rank of a new ``world_size``-rank group; never raises
    for a rank's failure.

    Args:
        fn: a module-level (picklable) function; inside it the default process group is
            initialized (``torch.distributed.get_rank()`` gives the rank). Its return value
            must be picklable; tensors in (nested) dicts, lists and tuples are moved to CPU.
        world_size: number of ranks, >= 1 (with ``device_type="cuda"``: at most the GPUs).
        *args: picklable arguments passed to ``fn`` on every rank.
        timeout: seconds after which a collective inside the workers raises.
        run_timeout: seconds for the whole run, spawn included (None: no limit); ranks still
            running then are killed (``hung``).
        threads: ``torch.set_num_threads`` in each worker (None: torch's default).
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL, GPU ``rank`` for rank ``rank``).
        grace: seconds the other ranks get after the first failure before they are killed
            (``hung``); None: they are waited for.
        wait_for: the ranks whose end ends the run (default: all); any other rank still
            running then is killed (``hung``).

    Returns:
        one :class:`RankOutcome` per rank, in rank order; every worker has been reaped.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    tmpdir = tempfile.mkdtemp(prefix="moewire_dist_")
    opts = _Options(world_size, tmpdir, device_type, timeout, threads)
    ctx = mp.get_context("spawn")
    procs = []
    try:
        for rank in range(world_size):
            p = ctx.Process(target=_worker, args=(rank, opts, fn, args), daemon=True)
            p.start()
            procs.append(p)
        waited = [procs[r] for r in (range(world_size) if wait_for is None else wait_for)]
        hung = _wait(procs, waited, tmpdir, run_timeout, grace)
        return [_outcome(rank, p, tmpdir, rank in hung) for rank, p in enumerate(procs)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(tmpdir, ignore_errors=True)


def _wait(
    procs: list, waited: list, tmpdir: str, run_timeout: float | None, grace: float | None
) -> list[int]:
    """Wait until every process of ``waited`` has ended (at most ``run_timeout`` s, or
    ``grace`` s after the first failure), kill every one still running and return the ranks
    that the kill ended."""
    deadline = None if run_timeout is None else time.monotonic() + run_timeout
    failed_at: float | None = None
    while any(p.is_alive() for p in waited):
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        if failed_at is not None and grace is not None and now >= failed_at + grace:
            break
        wait([p.sentinel for p in procs if p.is_alive()], timeout=0.5)
        if failed_at is None and _any_failed(procs, tmpdir):
            failed_at = time.monotonic()
    alive = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for rank in alive:
        procs[rank].kill()
    for p in procs:
        p.join()
    # one that was on its way out (e.g. a failed rank released by its peers' exit) is not
    return [rank for rank in alive if procs[rank].exitcode == -signal.SIGKILL]


def _outcome(rank: int, p: Any, tmpdir: str, hung: bool) -> RankOutcome:
    """What rank ``rank``'s files and exit code say about how it ended."""
    err_path, res_path = _path(tmpdir, "error", rank), _path(tmpdir, "result", rank)
    base = {"rank": rank, "pid": p.pid, "exitcode": p.exitcode, "hung": hung}
    if os.path.exists(err_path):
        with open(err_path, "rb") as f:
            when, exc, tb = pickle.load(f)
        return RankOutcome(**base, error=exc, traceback=tb, failed_at=when)
    if os.path.exists(res_path):
        return RankOutcome(**base, result=torch.load(res_path, weights_only=False))
    if hung:
        return RankOutcome(**base)
    exc = RuntimeError(f"rank {rank} exited with code {p.exitcode}")
    return RankOutcome(**base, error=exc, failed_at=time.time())


def _any_failed(procs: list, tmpdir: str) -> bool:
    return any(
        (not p.is_alive() and p.exitcode != 0) or os.path.exists(_path(tmpdir, "error", rank))
        for rank, p in enumerate(procs)
    )


def first_failure(outcomes: list[RankOutcome]) -> RankOutcome | None:
    """The rank that failed first (the others usually fail because of it: a peer left the
    group); None where no rank raised."""
    failed = [o for o in outcomes if o.error is not None]
    return min(failed, key=lambda o: (o.failed_at, o.rank)) if failed else None


def results(outcomes: list[RankOutcome], name: str, run_timeout: float | None) -> list[Any]:
    """Every rank's result, or raise: the first failure's exception with the worker
    traceback as ``__cause__``, else ``TimeoutError`` naming the ranks that hung (``name``
    the run, ``run_timeout`` its limit)."""
    first, world = first_failure(outcomes), len(outcomes)
    if first is not None:
        failed = sorted(o.rank for o in outcomes if o.error is not None)
        others = f" (ranks {failed} failed; this one first)" if len(failed) > 1 else ""
        where = f"\n\nrank {first.rank} of {world}{others}:\n{first.traceback}"
        raise first.error from RemoteTraceback(where)
    hung = [o.rank for o in outcomes if o.hung]
    if hung:
        raise TimeoutError(
            f"{name}: ranks {hung} did not finish within {run_timeout} s and were killed"
        )
    return [o.result for o in outcomes]


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    threads: int = 1,
) -> list[Any]:
    """Run ``fn(*args)`` on every rank of a new ``world_size``-rank gloo group on CPU.

    Args:
        fn: a module-level (picklable) function, as for :func:`spawn`.
        world_size: number of ranks, >= 1.
        *args: picklable arguments passed to ``fn`` on every rank.
        timeout: seconds for the whole run (spawn included) and for each collective.
        threads: ``torch.set_num_threads`` in each worker.

    Returns:
        ``[result of rank 0, result of rank 1, ...]``.

    Raises:
        the exception of the rank that failed first (the others usually fail because of
        it: a peer left the group), with the worker traceback as ``__cause__``;
        ``TimeoutError`` if the run exceeds ``timeout``.
    """
    outcomes = spawn(fn, world_size, *args, timeout=timeout, run_timeout=timeout, threads=threads)
    name = f"run_distributed({getattr(fn, '__name__', fn)!r}, world_size={world_size})"
    return results(outcomes, name, timeout)
