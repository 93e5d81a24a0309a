"""Token counts: the ``counts=`` argument of a dispatch, checked, and prefix sums.

``counts`` is every rank's token count, known to the caller (an engine's data-parallel
metadata): a sequence of ``W`` ints or a CPU integer tensor ``[W]``, the same on every rank.
Nothing here reads device memory, so a dispatch given ``counts`` never syncs the host.

Shape legend: ``W`` world size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def offsets(counts: Sequence[int]) -> list[int]:
    """Exclusive prefix sum: where each rank's block starts in a rank-ordered buffer."""
    out, acc = [], 0
    for c in counts:
        out.append(acc)
        acc += c
    return out


def normalize_counts(
    counts: object, world_size: int, rank: int, num_tokens: int, what: str = "rows.shape[0]"
) -> tuple[int, ...]:
    """``counts`` (a sequence of ints or a CPU integer tensor ``[W]``) as a tuple of ``W``
    non-negative ints whose entry ``rank`` is ``num_tokens``; ``ValueError`` otherwise. Reads
    no device memory: a CUDA tensor is refused (reading it would sync the host)."""
    if isinstance(counts, torch.Tensor):
        if counts.device.type != "cpu":
            raise ValueError(
                f"counts must be a CPU tensor or a sequence of ints (reading a {counts.device} "
                "tensor would sync the host with the device)"
            )
        if (
            counts.dim() != 1
            or counts.dtype.is_floating_point
            or counts.dtype.is_complex
            or (counts.dtype == torch.bool)
        ):
            raise ValueError(
                f"counts must be a 1-D integer tensor, got dtype {counts.dtype} and shape "
                f"{tuple(counts.shape)}"
            )
        counts = counts.tolist()
    if isinstance(counts, (str, bytes)) or not isinstance(counts, Sequence):
        raise ValueError(f"counts must be a sequence of ints or a CPU int tensor, got {counts!r}")
    out = tuple(counts)
    if len(out) != world_size:
        raise ValueError(
            f"counts must have one entry per rank (world size {world_size}), got {len(out)}: "
            f"{list(out)}"
        )
    if not all(type(c) is int and c >= 0 for c in out):
        out = tuple(_count(c, out) for c in out)
    if out[rank] != num_tokens:
        raise ValueError(
            f"counts[{rank}]={out[rank]} contradicts this rank's {what}={num_tokens} "
            f"(rank {rank}); counts must be every rank's token count"
        )
    return out


def _count(c: object, counts: tuple) -> int:
    if isinstance(c, bool) or not hasattr(c, "__index__"):
        raise ValueError(f"counts must be ints, got {c!r} in {list(counts)}")
    value = c.__index__()  # numpy integers
    if value < 0:
        raise ValueError(f"counts must be non-negative, got {value} in {list(counts)}")
    return value
