"""Tier b: ``moewire bench`` end to end on CPU (spawned gloo workers, and the torchrun
launch path with two node agents on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

SMALL = [
    "--model",
    "qwen3-30b-a3b",
    "--tokens",
    "0",
    "5",
    "--iters",
    "2",
    "--warmup",
    "1",
    "--hidden",
    "256",
    "--intermediate",
    "64",
    "--experts",
    "12",
    "--topk",
    "4",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_bench_spawned_workers_write_every_output(tmp_path):
    out = {k: tmp_path / f"b.{k}" for k in ("json", "csv", "png")}
    cmd = [
        sys.executable,
        "-m",
        "moewire",
        "bench",
        "--world-size",
        "3",
        *SMALL,
        "--formats",
        "nvfp4",
        "fp8",
        "--skew",
        "skewed",
        "--json",
        str(out["json"]),
        "--csv",
        str(out["csv"]),
    ]
    try:
        import matplotlib  # noqa: F401

        cmd += ["--plot", str(out["png"])]
    except ImportError:
        out.pop("png")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    for routine in ("## quantize", "## dispatch", "## combine", "## layer", "## verdict"):
        assert routine in r.stdout
    # every table has its legend; skipped rows and the CPU caveat are stated
    assert r.stdout.count("\n(") >= 4 and "speedup: baseline median / case median" in r.stdout
    assert "- peak GB: CUDA memory only" in r.stdout and "peak GB  " not in r.stdout
    assert "do not predict a GPU cluster" in r.stdout and "BENCHMARKS.md" in r.stdout
    assert "dispatch at 5 tokens/rank: the baseline" in r.stdout
    # progress lines: 36 steps, plus 8 quantized combine cases (4 wires x 2 backends) at
    # each of the 2 token counts
    assert "[ 1/52]" in r.stderr and "[52/52]" in r.stderr
    doc = json.loads(out["json"].read_text())
    assert doc["environment"]["world_size"] == 3 and doc["environment"]["backend"] == "gloo"
    recs = doc["records"]
    dispatch = [x for x in recs if x["routine"] == "dispatch" and x["tokens"] == 5]
    assert dispatch[0]["baseline"] and dispatch[0]["speedup"] == pytest.approx(1.0)
    assert dispatch[0]["counts"] == "2/5/8"  # skewed split of 3 x 5 tokens
    nv = [x for x in dispatch if x["format"] == "nvfp4" and x["routing"] == "logits"]
    assert nv and all(x["bytes_per_token"] == 128 + 16 + 48 for x in nv)
    # the comm's share alone (rows packed beforehand), beside pack + dispatch
    assert all(x["dispatch_only_us"] > 0 for x in recs if x["routine"] == "dispatch")
    assert "dispatch only us" in r.stdout and "/ all-gather" in r.stdout
    assert all(x["time_us"] > 0 for x in recs if "time_us" in x)
    assert {x["routine"] for x in recs} == {"quantize", "dispatch", "combine", "layer"}
    for path in out.values():
        assert path.stat().st_size > 0


def test_bench_rejects_bad_arguments():
    cases = [
        (["nosuch"], "unknown routine"),
        (["--topk", "0"], "--topk must be positive"),
        (["--world-size", "3"], "multiple of the world size 3"),
        (["--experts", "12"], "n_group=8"),
    ]
    for args, message in cases:
        r = subprocess.run(
            [sys.executable, "-m", "moewire", "bench", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bench_under_torchrun_two_node_agents():
    """Two torchrun node agents on 127.0.0.1 (one process each), as a two-node launch would
    run: ``torchrun --nnodes 2 --node-rank N --master-addr HOST ...``."""
    port = _free_port()
    procs = []
    for node in range(2):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--node-rank",
            str(node),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            "-m",
            "moewire",
            "bench",
            "dispatch",
            "combine",
            "--device",
            "cpu",
            *SMALL,
            "--formats",
            "nvfp4",
        ]
        procs.append(
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
            )
        )
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    assert "CPU x2 (gloo)" in outs[0][0] and "## dispatch" in outs[0][0]
    assert "## dispatch" not in outs[1][0]  # only global rank 0 reports


def test_quantize_table_shows_both_flushes():
    # The GPU benchmark's table (its numbers need a GPU; the formatting does not): one row
    # per result, every column filled, the read-flush and write-flush figures side by side.
    from moewire.bench.routines.quantize import format_table

    meta = dict(
        device="dev",
        torch_version="t",
        triton_version="tr",
        copy_gbps=4000.0,
        copy_gbps_dirty=3900.0,
        empty_us=3.0,
        hidden=7168,
    )
    r = dict(
        meta,
        format="nvfp4",
        tokens=8192,
        op="pack",
        bytes=150_000_000,
        torch_us=900.0,
        triton_us=40.0,
        torch_gbps=166.7,
        triton_gbps=3750.0,
        frac_of_copy=0.9375,
        same_copy_frac=0.96,
        frac_of_copy_dirty=0.8,
        speedup=22.5,
        x_empty=13.3,
        host_us=12.34,
    )
    lines = format_table([r, dict(r, op="dequantize")]).splitlines()
    header, rows = lines[2], lines[4:]
    assert "4000 GB/s" in lines[0] and "3900 GB/s after a write flush" in lines[0]
    assert len(rows) == 2 and all(row.count("|") == header.count("|") for row in rows)
    cells = dict(zip(header.split("|"), rows[0].split("|"), strict=True))
    assert cells[" % of copy "].strip() == "93.8" and cells[" % dirty "].strip() == "80.0"
    assert cells[" host us "].strip() == "12.3"


def test_layer_fp8_expert_wires_add_cases(monkeypatch):
    """``--fp8-expert-wires`` adds one fp8-experts case per wire format (the fp8 rows case
    once), quantized before the dispatch; without it the cases are the default ones."""
    import argparse

    from moewire.bench.main import add_arguments
    from moewire.bench.routines import layer

    monkeypatch.setattr(layer, "fp8_skip_reason", lambda ctx: None)
    p = argparse.ArgumentParser()
    add_arguments(p)

    def cases(*argv):
        ctx = argparse.Namespace(args=p.parse_args(["layer", *argv]))
        return dict(layer.layer_cases(ctx))

    base = cases()
    more = cases("--fp8-expert-wires", "nvfp4", "fp8", "bf16")
    assert set(more) - set(base) == {"nvfp4 rows, fp8 experts", "bf16 rows, fp8 experts"}
    assert more["nvfp4 rows, fp8 experts"] == {"wire": "nvfp4", "experts": "fp8",
                                               "quantize": "before"}  # fmt: skip
    with pytest.raises(SystemExit):
        p.parse_args(["layer", "--fp8-expert-wires", "nosuch"])
