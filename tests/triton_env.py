"""Import Triton kernel modules for the device at hand: built for Triton's CPU interpreter
(``TRITON_INTERPRET=1``, set for these imports only, so that it does not leak into other
test modules) when there is no CUDA GPU, for the GPU otherwise."""

from __future__ import annotations

import contextlib
import importlib
import os

import pytest
import torch

CUDA = torch.cuda.is_available()


def import_kernels(*modules: str) -> None:
    """Import ``modules`` (dotted names) as described above; skips the calling test module
    where triton is not importable."""
    saved = os.environ.get("TRITON_INTERPRET")
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton", reason="triton is not importable")
        for name in modules:
            importlib.import_module(name)
        # Triton imports this lazily at the first launch and checks the interpreter then
        with contextlib.suppress(ImportError):
            importlib.import_module("triton.experimental.gluon")
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
