"""Tier a: the ``moewire`` command line."""

from __future__ import annotations

import json
import subprocess
import sys

from moewire.cli import main


def test_formats_deepseek_r1_table(capsys):
    assert main(["formats", "--hidden", "7168", "--experts", "256", "--topk", "8"]) == 0
    out = capsys.readouterr().out
    nvfp4_logits = next(l for l in out.splitlines() if l.startswith("nvfp4") and "logits" in l)
    assert "15360 -> 5056" in nvfp4_logits and "3.04x" in nvfp4_logits
    nvfp4_topk = next(l for l in out.splitlines() if l.startswith("nvfp4") and "topk" in l)
    assert "15360 -> 4096" in nvfp4_topk and "3.75x" in nvfp4_topk


def test_formats_json(capsys):
    assert main(["formats", "--hidden", "256", "--experts", "16", "--topk", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    recs = {(r["format"], r["routing"]): r for r in doc["formats"]}
    assert len(recs) == 12
    assert recs[("bf16", "logits")]["row_bytes"] == 512 + 64
    assert recs[("nvfp4", "topk")]["row_bytes"] == 128 + 16 + 16 + 16
    for r in recs.values():
        assert r["sqnr_gaussian_db"] > 15 and r["sqnr_heavy_tailed_db"] > 15


def test_formats_bad_arguments(capsys):
    assert main(["formats", "--hidden", "-4"]) == 2
    assert "--hidden must be positive" in capsys.readouterr().err
    assert main(["formats", "--hidden", "96", "--experts", "8", "--topk", "2"]) == 0
    assert "fp8_block128: hidden 96 is not a multiple" in capsys.readouterr().out


def test_python_dash_m():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "moewire",
            "formats",
            "--hidden",
            "128",
            "--experts",
            "4",
            "--topk",
            "1",
            "--tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "mxfp4" in r.stdout
