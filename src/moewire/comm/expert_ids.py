"""The one check of top-k expert ids, run before any id is used as an index.

Used where ids enter from outside: ``alltoall``'s ``dispatch(rows, topk_ids)`` (the sender's
routing) and :class:`moewire.EPMoE` with ``routing="topk"`` (ids that arrived in rows).

Shape legend: ``T`` tokens, ``K`` top-k, ``E`` experts.
"""

from __future__ import annotations

import torch

#: Most distinct bad expert ids an error message lists.
MAX_BAD_IDS = 8


def _check_type_and_shape(topk_ids: object, num_tokens: int | None, name: str) -> torch.Tensor:
    if not isinstance(topk_ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(topk_ids).__name__}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got dtype {topk_ids.dtype}")
    rows_ok = num_tokens is None or topk_ids.shape[0] == num_tokens
    if topk_ids.dim() != 2 or not rows_ok or topk_ids.shape[1] < 1:
        t = "T" if num_tokens is None else f"T={num_tokens}"
        raise ValueError(
            f"{name} must be [{t}, K>=1] (one row per token), got shape {tuple(topk_ids.shape)}"
        )
    return topk_ids


def check_topk_ids(
    topk_ids: object,
    num_experts: int,
    *,
    num_tokens: int | None = None,
    name: str = "topk_ids",
    distinct: bool = False,
) -> torch.Tensor:
    """Return ``topk_ids`` unchanged, or raise naming the offending values.

    Args:
        topk_ids: int32/int64 ``[T, K]``, ``K >= 1``, on any device; every id in ``[0, E)``.
        num_experts: ``E``.
        num_tokens: ``T`` when the caller knows it (then the rows must match); None: any.
        name: what the messages call the ids (e.g. ``"received topk_ids"``).
        distinct: also require that no token lists an expert twice (as
            :func:`moewire.moe.route` guarantees).

    Raises:
        TypeError: not a tensor, or not int32/int64.
        ValueError: not ``[T, K>=1]``; an id out of range (lists the distinct bad ids, at
            most 8); with ``distinct``, a token that lists an expert twice.

    One host sync (reads two counts), so call it outside CUDA-graph capture.
    """
    ids_TK = _check_type_and_shape(topk_ids, num_tokens, name)
    if ids_TK.numel() == 0:
        return ids_TK
    bad_TK = (ids_TK < 0) | (ids_TK >= num_experts)
    dup_T = None
    if distinct and ids_TK.shape[1] > 1:
        s_TK = ids_TK.sort(dim=-1).values
        dup_T = (s_TK[:, 1:] == s_TK[:, :-1]).any(dim=-1)
        n_bad, n_dup = torch.stack([bad_TK.sum(), dup_T.sum()]).tolist()
    else:
        n_bad, n_dup = int(bad_TK.sum()), 0
    if n_bad:
        values = torch.unique(ids_TK[bad_TK]).tolist()
        shown = values[:MAX_BAD_IDS] + (["..."] if len(values) > MAX_BAD_IDS else [])
        raise ValueError(f"{name}: expert ids must be in [0, {num_experts}), got {shown}")
    if n_dup:
        first = int(dup_T.nonzero()[0, 0])
        raise ValueError(
            f"{name}: {n_dup} tokens list an expert more than once (the router picks "
            f"distinct experts), e.g. token {first}: {ids_TK[first].tolist()}"
        )
    return ids_TK
