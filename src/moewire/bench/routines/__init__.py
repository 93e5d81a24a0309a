"""The routines of ``moewire bench``, one module each; each owns its cases, runs them and
renders its own table. ``bench/main.py`` runs them through :func:`get`.

- ``quantize``: pack and dequantize throughput on one device (Triton vs torch reference).
- ``comm``: routine ``dispatch``, and the per-rank inputs every routine draws from the seed.
- ``combine``: the return trip of the partial outputs, on ``dispatch``'s tokens and routing.
- ``layer``: the whole EP layer, stage by stage, with ``layer_refs``' hardware references.
- ``model``: a DeepSeek-V3-style model's forward with its MoE blocks swapped in (the model
  built by ``model_build``).
- ``eval``: the ``moewire eval`` front (what each configuration does to a trained model).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from moewire.bench.presets import ModelShape
from moewire.bench.runner import BenchContext


@dataclass(frozen=True)
class Routine:
    """What ``bench/main.py`` needs of a routine: ``run`` (every rank; rank 0's records are
    reported), ``steps`` (progress steps it will report) and ``render`` (its table)."""

    run: Callable[[BenchContext, ModelShape], list[dict]]
    steps: Callable[[BenchContext, ModelShape], int]
    render: Callable[[BenchContext, list[dict]], str]


_ROUTINES = {  # routine -> (module, run function, steps function)
    "quantize": ("quantize", "run_quantize", "steps"),
    "dispatch": ("comm", "run_dispatch", "steps"),
    "combine": ("combine", "run_combine", "steps"),
    "layer": ("layer", "run_layer", "steps"),
    "model": ("model", "run_model", "steps"),
}
ROUTINES = tuple(_ROUTINES)


def get(name: str) -> Routine:
    """The routine ``name`` (one of :data:`ROUTINES`)."""
    module, run, steps = _ROUTINES[name]
    m = importlib.import_module(f"moewire.bench.routines.{module}")
    return Routine(getattr(m, run), getattr(m, steps), m.render)
