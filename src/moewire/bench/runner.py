"""Launching, timing and reporting for ``moewire bench``.

The benchmark runs one process per rank. ``launch`` either joins the group that torchrun
set up (``RANK``/``WORLD_SIZE`` in the environment, single- or multi-node), or spawns its
own workers on this machine: one per visible GPU with NCCL, or ``--world-size`` CPU
processes (default: 4, at most one per core) with gloo over a file store. Every rank runs
every routine; rank 0 prints progress and the report and writes ``--json``/``--csv``/``--plot``.

Timing: each iteration starts with all ranks aligned (device sync + barrier); the time of
an iteration is measured with CUDA events on GPU and ``time.perf_counter`` on CPU; a case's
time is the median over iterations after warm-up, then the maximum of that over ranks
(the slowest rank is the collective's time).
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moewire.testing.spawn import RankOutcome, first_failure, init_group, results, spawn


@dataclass
class BenchContext:
    """What a routine sees: the group, the device and the options."""

    group: dist.ProcessGroup
    rank: int
    world_size: int
    device: torch.device
    args: object
    env: dict = field(default_factory=dict)
    #: Steps of the whole run, for the progress lines.
    total_steps: int = 0
    _step: int = 0
    #: Seconds per iteration of the last :meth:`time` call, slowest rank of each.
    last_samples: list = field(default_factory=list)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        self.sync()
        if self.is_cuda:
            dist.barrier(group=self.group, device_ids=[self.device.index])
        else:
            dist.barrier(group=self.group)

    def max_over_ranks(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t.item())

    def all_true(self, ok: bool) -> bool:
        t = torch.tensor([0 if ok else 1], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item()) == 0

    def time(self, fn: Callable[[], object], iters: int, warmup: int) -> float:
        """Seconds per call of ``fn``: median over ``iters`` aligned iterations after
        ``warmup`` untimed ones, then the maximum over ranks. The slowest rank's time of
        each iteration is kept for :meth:`spread`."""
        for _ in range(warmup):
            fn()
        samples = []
        if self.is_cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            for _ in range(iters):
                self.barrier()
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
        else:
            samples = wall_times(fn, iters, before=self.barrier)
        per_iter = torch.tensor(samples, dtype=torch.float64, device=self.device)
        dist.all_reduce(per_iter, op=dist.ReduceOp.MAX, group=self.group)
        self.last_samples = per_iter.tolist()
        return self.max_over_ranks(statistics.median(samples))

    def spread(self) -> dict:
        """The last :meth:`time` call's per-iteration times (slowest rank, us) and their
        min and max, for a record."""
        return spread_fields([s * 1e6 for s in self.last_samples])

    def progress(self, label: str) -> None:
        """One progress line on rank 0 (stderr): ``[ k/total] label``."""
        self._step += 1
        if self.rank == 0:
            w = len(str(self.total_steps))
            print(f"[{self._step:>{w}}/{self.total_steps}] {label}", file=sys.stderr, flush=True)


def wall_times(
    fn: Callable[[], object], iters: int, before: Callable[[], object] | None = None
) -> list[float]:
    """Wall seconds until each of ``iters`` calls of ``fn`` returns, ``before()`` (untimed)
    run ahead of each."""
    samples = []
    for _ in range(iters):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def spread_fields(samples_us: list[float]) -> dict:
    """A record's spread fields from its per-iteration times in us: min, max and all."""
    return {
        "time_us_min": min(samples_us),
        "time_us_max": max(samples_us),
        "samples_us": samples_us,
    }


def environment(device: torch.device, world_size: int, backend: str) -> dict:
    """The card, world size and versions, for every report."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device.type,
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "world_size": world_size,
        "backend": backend,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        try:
            v = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception:  # pragma: no cover - NCCL missing from this build
            env["nccl"] = "unavailable"
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = "not installed"
    return env


# ------------------------------------------------------------------------------ reporting
def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        rest = [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        return "  ".join([r[0].ljust(widths[0]), *rest])

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def fmt_num(v: object, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.{digits}f}"
    return str(v)


def fmt_time(r: dict) -> str:
    """``median (min-max)`` in us."""
    if "time_us_min" not in r:
        return f"{r['time_us']:.1f}"
    return f"{r['time_us']:.1f} ({r['time_us_min']:.0f}-{r['time_us_max']:.0f})"


def fmt_speedup(r: dict) -> str:
    """``1.23x [1.10-1.35]``; just ``1.00x`` for a baseline."""
    if not r.get("speedup"):
        return "-"
    ci = r.get("speedup_ci95")
    if r.get("baseline") or not ci:
        return f"{r['speedup']:.2f}x"
    return f"{r['speedup']:.2f}x [{ci[0]:.2f}-{ci[1]:.2f}]"


def write_json(path: str, env: dict, records: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"environment": env, "records": records}, f, indent=2, default=str)


def write_csv(path: str, records: list[dict]) -> None:
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(records)


def write_plot(path: str, env: dict, records: list[dict]) -> None:
    """One panel per routine: time (us) vs tokens per rank for each case, log-log; and a
    panel of bytes per token per case."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib)") from e
    routines = list(dict.fromkeys(rec["routine"] for rec in records))
    wire = [r for r in records if r["routine"] == "dispatch"] or records
    panels = len(routines) + 1
    ncols = min(2, panels)
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(8 * ncols, 6 * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[panels:]:
        ax.set_visible(False)
    for ax, routine in zip(flat, routines, strict=False):
        recs = [r for r in records if r["routine"] == routine and r.get("time_us")]
        for case in dict.fromkeys(r["case"] for r in recs):
            pts = sorted((r["tokens"], r["time_us"]) for r in recs if r["case"] == case)
            style = "k--" if any(r.get("baseline") for r in recs if r["case"] == case) else "-o"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=case, markersize=3)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel("time per call (us), median, slowest rank")
        ax.set_title(f"{routine}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax = flat[panels - 1]
    by_case = {}
    for r in wire:
        if r.get("bytes_per_token"):
            by_case.setdefault(r["case"], r["bytes_per_token"])
    ax.barh(list(by_case), list(by_case.values()), color="tab:blue")
    ax.set_xlabel("bytes per token on the wire")
    ax.set_title(f"bytes per token ({wire[0]['routine']})")
    ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(
        f"moewire bench: {env.get('card')} x{env.get('world_size')} ({env.get('backend')}), "
        f"torch {env.get('torch')}, {env.get('date')}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ launching
def _rank_main(main: Callable[[BenchContext], None], args: object, device_type: str) -> None:
    """One rank, its group set up (:func:`moewire.testing.spawn.init_group`): its context,
    then ``main(ctx)``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if device_type == "cuda":
        device, backend = torch.device("cuda", torch.cuda.current_device()), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    ctx = BenchContext(dist.group.WORLD, rank, world, device, args)
    ctx.env = environment(device, world, backend)
    main(ctx)


def resolve_world(args: object) -> tuple[str, int, bool]:
    """``(device type, world size, under torchrun)`` the benchmark will run with."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        device_type = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
        return device_type, int(os.environ["WORLD_SIZE"]), True
    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device_type = args.device or ("cuda" if ngpu else "cpu")
    if device_type == "cuda" and ngpu == 0:
        raise ValueError("--device cuda: no CUDA GPU is visible")
    if args.world_size is not None and args.world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
    world = args.world_size or (ngpu if device_type == "cuda" else min(4, cpu_cores()))
    if device_type == "cuda" and world > ngpu:
        raise ValueError(f"--world-size {world} > {ngpu} visible GPUs")
    return device_type, world, False


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def launch(main: Callable[[BenchContext], None], args: object) -> None:
    """Run ``main(ctx)`` on every rank: under torchrun when its variables are set,
    otherwise in freshly spawned processes on this machine (:mod:`moewire.testing.spawn`)."""
    device_type, world, torchrun = resolve_world(args)
    timeout = getattr(args, "timeout", 600)
    threads = max(1, (os.cpu_count() or 1) // world) if device_type == "cpu" else None
    if not torchrun:
        kw = {"timeout": timeout, "threads": threads, "device_type": device_type}
        outcomes = spawn(_rank_main, world, main, args, device_type, **kw)
        failed = first_failure(outcomes)
        if failed is not None and (err := _user_error(failed)) is not None:
            raise err from None
        results(outcomes, "moewire bench", None)
        return
    if threads is not None:
        torch.set_num_threads(threads)
    init_group(int(os.environ["RANK"]), world, "env://", device_type=device_type, timeout=timeout)
    try:
        _rank_main(main, args, device_type)
    finally:
        dist.destroy_process_group()


def _user_error(failed: RankOutcome) -> Exception | None:
    """A worker's ``ValueError``/``TypeError`` as one line naming the rank and the cause
    (the CLI prints it); None for any other failure (it keeps its full traceback)."""
    kind = type(failed.error)
    if kind in (ValueError, TypeError):
        return kind(f"rank {failed.rank}: {failed.error}")
    return None
