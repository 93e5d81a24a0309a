"""Checks ``EPMoE`` makes before it runs (kept apart from ``layer.py``, which wires the
stages): a process group exists, the fp8 expert path can run on the device, and the nvfp4
global scale follows ``load_state_dict``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def check_process_group(comm: str) -> None:
    """Raise ``RuntimeError`` naming the fix unless a default process group exists."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"EPMoE(comm={comm!r}) needs an initialized process group: call "
            "torch.distributed.init_process_group(...) first (torchrun sets up its "
            "environment), or use comm='local' for one process that holds every expert"
        )


def check_fp8_device(device: torch.device | None) -> None:
    """Raise ``ValueError`` unless ``experts="fp8"`` (``torch._scaled_grouped_mm``) can run
    on ``device`` (None: on any visible device): a CUDA GPU of compute capability 9.0+."""
    fix = "use experts='fp8_loop' (runs anywhere) or 'auto'"
    if device is not None and device.type != "cuda":
        raise ValueError(
            f"experts='fp8' runs torch._scaled_grouped_mm, which needs a CUDA GPU of compute "
            f"capability 9.0+; the expert weights are on {device}: {fix}"
        )
    if not torch.cuda.is_available() or not hasattr(torch, "_scaled_grouped_mm"):
        raise ValueError(
            "experts='fp8' runs torch._scaled_grouped_mm, which needs a CUDA GPU of compute "
            f"capability 9.0+; no CUDA GPU is visible (or this torch lacks the op): {fix}"
        )
    cap = torch.cuda.get_device_capability(device)
    if cap[0] < 9:
        raise ValueError(
            f"experts='fp8' needs compute capability 9.0+ (torch._scaled_grouped_mm); "
            f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}: {fix}"
        )


def reload_global_scale(module: nn.Module, incompatible_keys: object) -> None:
    """After ``load_state_dict``: rebuild the nvfp4 wire from the loaded global scale
    (0: not calibrated, so the next forward calibrates)."""
    g = float(module.global_scale_bits.view(torch.float32).item())
    if g == 0:
        module.spec = module.travel_spec = module.comm = None
    elif module.spec is None or module.spec.global_scale != g:
        module._build_wire(g)


def check_padding(
    comm: Any,
    world_size: int,
    t: int,
    counts: Sequence[int] | torch.Tensor | None,
    valid: torch.Tensor | None,
) -> None:
    """``EPMoE.forward``'s ``valid_counts`` (padded batches) fits: ``comm`` delivers rows
    rank by rank (:attr:`moewire.comm.Comm.rank_ordered`), ``counts`` puts every rank at
    this rank's ``T``, and it is an int tensor ``[W]``."""
    if valid is None:
        return
    if not comm.rank_ordered:
        raise ValueError(f"valid_counts: comm={comm.name!r} does not deliver rows rank by rank")
    if counts is None or [int(c) for c in counts] != [t] * world_size:
        raise ValueError(
            f"valid_counts needs counts with every rank at this rank's T={t} (padded "
            f"batches), got counts={None if counts is None else list(counts)}"
        )
    if not isinstance(valid, torch.Tensor) or valid.shape != (world_size,):
        raise ValueError(
            f"valid_counts must be an int tensor [W={world_size}], got "
            f"{valid if not isinstance(valid, torch.Tensor) else list(valid.shape)}"
        )
