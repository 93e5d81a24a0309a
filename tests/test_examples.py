"""Tier b: every script in ``examples/`` runs as written on CPU and prints what it shows
(the torchrun ones with 2 gloo ranks on 127.0.0.1)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(script: str, nproc: int = 0) -> str:
    cmd = [sys.executable]
    if nproc:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1"]
        cmd += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    r = subprocess.run([*cmd, str(EXAMPLES / script)], capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_wire_api():
    out = _run("wire_api.py")
    assert "nvfp4 rows: (32, 5056) uint8" in out
    assert "bit-exact copy: True" in out
    for line in ("bf16            15360    1.00x    exact", "nvfp4            5056    3.04x"):
        assert line in out


def test_epmoe_torchrun():
    out = _run("epmoe_torchrun.py", nproc=2)
    for rank, (experts, tokens) in enumerate((("0-7", 5), ("8-15", 8))):
        assert f"rank {rank} of 2 (cpu, {tokens} tokens):" in out
        assert out.count(f"experts {experts}, output ({tokens}, 512)") == 3


def test_transformers_generate():
    pytest.importorskip("transformers")
    out = _run("transformers_generate.py", nproc=2)
    assert "2 MoE blocks made expert-parallel" in out
    assert "rank 0: prompt 'Expert parallel rank 0' (22 tokens) -> 6 new tokens" in out
    assert "rank 1: prompt 'MoE rank 1' (10 tokens) -> 16 new tokens" in out
