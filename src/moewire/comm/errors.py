"""Failures of a comm's collectives, named: :class:`CommError` and the wrapper that raises it.

A collective that fails (gloo and NCCL with ``TORCH_NCCL_BLOCKING_WAIT=1`` raise a
``RuntimeError`` when a peer dies or the group's timeout passes) is re-raised as
:class:`CommError` naming the moewire operation, with the original as ``__cause__``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.distributed import ProcessGroup


class CommError(RuntimeError):
    """A collective of a moewire comm failed: a peer rank died, exited, raised before the
    call or did not reach it within the process group's timeout. The group is unusable
    afterwards (destroy it and restart the ranks). ``__cause__`` is torch's error."""


def group_timeout(group: ProcessGroup) -> str:
    for device in ("cpu", "cuda"):
        try:
            backend = group._get_backend(torch.device(device))
            return f"{backend.options._timeout.total_seconds():g} s"
        except Exception:
            continue
    return "unknown"


_F = TypeVar("_F", bound=Callable[..., Any])


def named_failures(method: str, fn: _F) -> _F:
    """Wrap a collective method so that a torch.distributed failure inside it raises
    :class:`CommError` naming the backend, the method and the collective."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._step = None
        start = time.monotonic()
        try:
            return fn(self, *args, **kwargs)
        except (CommError, torch.OutOfMemoryError):
            raise
        except RuntimeError as err:
            raise self._failure(method, start, err) from err

    wrapper._moewire_named = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
