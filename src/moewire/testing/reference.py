"""The single-process dispatch reference: what a rank must receive, built from every rank's
inputs on one process (DESIGN.md's invariance contract, ``pack(allgather(x))``).

Shape legend: ``T`` tokens of one source rank, ``K`` top-k, ``H`` hidden, ``E`` experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moewire.formats import WireSpec


def hosts(ids_TK: torch.Tensor, rank: int, world_size: int, num_experts: int) -> torch.Tensor:
    """bool ``[T]``: rank ``rank`` hosts at least one of the token's experts (rank ``r``
    hosts experts ``[r*E/W, (r+1)*E/W)``)."""
    lo, hi = rank * num_experts // world_size, (rank + 1) * num_experts // world_size
    return ((ids_TK >= lo) & (ids_TK < hi)).any(dim=-1)


def dispatch_reference(
    spec: WireSpec,
    inputs: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]],
    backend: str,
    *,
    rank: int,
    ids: Sequence[torch.Tensor] | None = None,
    num_experts: int | None = None,
) -> torch.Tensor:
    """The rows rank ``rank`` must receive from a dispatch, in source-rank order: the
    gathered tokens (for ``"alltoall"`` only those it hosts an expert of), packed at once.

    Args:
        spec: the wire spec every rank packs with.
        inputs: per source rank, ``(x_TH, extras)`` as passed to ``spec.pack``.
        backend: ``"allgather"``/``"grouped"`` (every token) or ``"alltoall"`` (the tokens
            with at least one expert on ``rank``).
        rank: the receiving rank.
        ids: per source rank, int ``[T, K]`` expert ids; needed for ``"alltoall"``.
        num_experts: ``E``; needed for ``"alltoall"``.
    """
    xs, extras = [], {name: [] for name in inputs[0][1]}
    for src, (x, ex) in enumerate(inputs):
        keep = slice(None)
        if backend == "alltoall":
            keep = hosts(ids[src], rank, len(inputs), num_experts)
        xs.append(x[keep])
        for name, t in ex.items():
            extras[name].append(t[keep])
    return spec.pack(torch.cat(xs), **{name: torch.cat(ts) for name, ts in extras.items()})
