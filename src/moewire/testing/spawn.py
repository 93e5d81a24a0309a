"""Run a function on every rank of a fresh gloo process group on CPU.

    from moewire.testing.spawn import run_distributed

    def _worker(n):                       # module level, so spawn can pickle it
        rank = torch.distributed.get_rank()
        return {"x": torch.full((n,), rank)}

    results = run_distributed(_worker, 3, 5, timeout=60)   # [rank 0's dict, rank 1's, ...]

Each call spawns ``world_size`` fresh processes (torch.multiprocessing, ``spawn``; about 2-4 s
each, so run many cases inside one call), initializes a gloo group over a ``file://`` store
in a private temporary directory (no network beyond this host), calls ``fn(*args)`` on every
rank and returns the results to the parent, where the assertions belong. Tensors come back
on CPU. A worker exception is re-raised in the parent (same type where it pickles) with the
worker's traceback attached as its ``__cause__``; a run that exceeds ``timeout`` seconds
(e.g. a collective that one rank never joins) kills every worker and raises
``TimeoutError``. Collectives inside the workers also time out after ``timeout`` seconds.
"""

from __future__ import annotations

import datetime
import os
import pickle
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

import torch
import torch.multiprocessing as mp

#: Seconds the parent waits for the other ranks after one rank failed before killing them.
_GRACE_S = 5.0


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a worker process."""

    def __str__(self) -> str:
        return self.args[0]


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _worker(
    rank: int,
    world_size: int,
    tmpdir: str,
    fn: Callable[..., Any],
    args: tuple,
    timeout: float,
    threads: int,
) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    failed_at: float | None = None  # when fn raised, before the group is torn down
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{os.path.join(tmpdir, 'store')}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            result = _to_cpu(fn(*args))
        except BaseException:
            failed_at = time.time()
            raise
        finally:
            dist.destroy_process_group()
        _write(torch.save, result, _path(tmpdir, "result", rank))
    except BaseException as exc:
        tb = traceback.format_exc()
        try:
            pickle.dumps(exc)
        except Exception:
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        _write(pickle.dump, (failed_at or time.time(), exc, tb), _path(tmpdir, "error", rank))


def _path(tmpdir: str, kind: str, rank: int) -> str:
    return os.path.join(tmpdir, f"{kind}_{rank}.pkl")


def _write(dump: Callable[[Any, Any], None], obj: Any, path: str) -> None:
    with open(path + ".tmp", "wb") as f:
        dump(obj, f)
    os.replace(path + ".tmp", path)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    threads: int = 1,
) -> list[Any]:
    """Run ``fn(*args)`` on every rank of a new ``world_size``-rank gloo group on CPU.

    Args:
        fn: a module-level (picklable) function; inside it the default process group is
            initialized (``torch.distributed.get_rank()`` gives the rank). Its return value
            must be picklable; tensors in (nested) dicts, lists and tuples are moved to CPU.
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
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    ctx = mp.get_context("spawn")
    tmpdir = tempfile.mkdtemp(prefix="moewire_dist_")
    procs = []
    try:
        for rank in range(world_size):
            p = ctx.Process(
                target=_worker,
                args=(rank, world_size, tmpdir, fn, args, timeout, threads),
                daemon=True,
            )
            p.start()
            procs.append(p)
        hung = _wait(procs, tmpdir, timeout)
        results, errors = _collect(procs, tmpdir, hung)
        if errors:
            _, rank, exc, tb = min(errors, key=lambda e: (e[0], e[1]))
            failed = sorted(e[1] for e in errors)
            others = f" (ranks {failed} failed; this one first)" if len(failed) > 1 else ""
            raise exc from RemoteTraceback(f"\n\nrank {rank} of {world_size}{others}:\n{tb}")
        if hung:
            raise TimeoutError(
                f"run_distributed({getattr(fn, '__name__', fn)!r}, world_size={world_size}): "
                f"ranks {hung} did not finish within {timeout} s and were killed"
            )
        return results
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        shutil.rmtree(tmpdir, ignore_errors=True)


def _wait(procs: list, tmpdir: str, timeout: float) -> list[int]:
    """Wait for every worker (at most ``timeout`` s, or ``_GRACE_S`` after the first
    failure), kill the ones still running and return their ranks."""
    deadline = time.monotonic() + timeout
    failed_at: float | None = None
    while any(p.is_alive() for p in procs):
        now = time.monotonic()
        if now >= deadline or (failed_at is not None and now >= failed_at + _GRACE_S):
            break
        wait([p.sentinel for p in procs if p.is_alive()], timeout=0.5)
        if failed_at is None and _any_failed(procs, tmpdir):
            failed_at = time.monotonic()
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join()
    return hung


def _collect(procs: list, tmpdir: str, hung: list[int]) -> tuple[list[Any], list[tuple]]:
    """Every rank's result (``None`` where it failed) and ``(when, rank, exc, tb)`` of
    every failure."""
    results, errors = [], []
    for rank, p in enumerate(procs):
        err_path, res_path = _path(tmpdir, "error", rank), _path(tmpdir, "result", rank)
        results.append(None)
        if os.path.exists(err_path):
            with open(err_path, "rb") as f:
                when, exc, tb = pickle.load(f)
            errors.append((when, rank, exc, tb))
        elif os.path.exists(res_path):
            results[rank] = torch.load(res_path, weights_only=False)
        elif rank not in hung:
            exc = RuntimeError(f"rank {rank} exited with code {p.exitcode}")
            errors.append((time.time(), rank, exc, ""))
    return results, errors


def _any_failed(procs: list, tmpdir: str) -> bool:
    return any(
        (not p.is_alive() and p.exitcode != 0) or os.path.exists(_path(tmpdir, "error", rank))
        for rank, p in enumerate(procs)
    )
