"""The values every rank of a comm must agree on, and the check that they do.

A dispatch whose ranks disagree on the row layout would deadlock or corrupt a collective,
so a comm checks, before its first dispatch moves any row, that every rank uses the same
values (:data:`AGREE_KEYS`: backend, row width ``R`` and, where the comm knows them, the
wire format, ``H``, the nvfp4 global scale, the extras layout, ``E``, ``src_index``, the
combine wire). A disagreement raises ``ValueError`` on every rank alike, naming each rank's
value (for the extras layout: each rank's extras with their dtypes and widths).

When it runs (see :class:`moewire.comm.base.Comm`):

- in full (one small all-gather of ``len(AGREE_KEYS)`` int64 per rank) at the first
  dispatch of a comm, and again when the row width changes (a comm without ``spec``);
- dispatches that exchange counts (no ``counts=`` given) carry a 64-bit fingerprint of the
  same values in the count exchange at no extra collective; a fingerprint that differs
  triggers the full check, which then names the values;
- ``check="every_call"`` (or ``MOEWIRE_CHECK_EVERY_CALL=1`` in the environment) runs the full
  check at every dispatch, also with ``counts=``: a debug option (one more small collective
  and a device-to-host copy per call).

Shape legend: ``W`` world size, ``A`` agreement values (``len(AGREE_KEYS)``).
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from moewire.formats import FORMATS
from moewire.formats.combine import COMBINE_WIRES
from moewire.formats.spec import WireSpec

#: Backend names in the order of their agreement id (append only: the id is on the wire).
BACKEND_IDS = ("allgather", "alltoall", "grouped")
#: The values every rank's dispatch must agree on, in wire order; ``-1`` means "not known
#: to this comm" (no ``spec`` / no ``num_experts`` given), which must agree too.
AGREE_KEYS = (
    "comm backend",
    "row width (bytes)",
    "wire format",
    "hidden",
    "nvfp4 global_scale",
    "extras layout",
    "num_experts",
    "src_index",
    "combine wire",
)
UNSET = -1
#: ``check=`` values of a comm: the full agreement check once (per row width) or every call.
CHECK_MODES = ("once", "every_call")
#: Environment variable that turns every comm's check to ``"every_call"`` when set to 1.
CHECK_ENV = "MOEWIRE_CHECK_EVERY_CALL"


def check_mode(check: object) -> bool:
    """Whether the full agreement check runs at every dispatch: ``check`` validated, or
    forced on by ``MOEWIRE_CHECK_EVERY_CALL=1``."""
    if check not in CHECK_MODES:
        raise ValueError(f"check must be one of {CHECK_MODES}, got {check!r}")
    return check == "every_call" or os.environ.get(CHECK_ENV, "0").strip() == "1"


def show(key: str, value: int) -> str:
    """One agreement value as a person reads it."""
    if value == UNSET and key not in ("row width (bytes)", "src_index"):
        return "not given"
    if key == "comm backend" and 0 <= value < len(BACKEND_IDS):
        return repr(BACKEND_IDS[value])
    if key == "wire format" and 0 <= value < len(FORMATS):
        return repr(FORMATS[value])
    if key == "nvfp4 global_scale":
        return repr(struct.unpack("<d", struct.pack("<q", value))[0])
    if key == "extras layout":
        return f"{value:#010x}"
    if key == "combine wire" and 0 <= value < len(COMBINE_WIRES):
        return repr(COMBINE_WIRES[value])
    return str(value)


def extras_text(spec: WireSpec | None) -> str:
    """The extras layout of ``spec`` as text, e.g. ``{topk_ids: int32[8], ...}``."""
    if spec is None:
        return "not given"
    items = ", ".join(
        f"{n}: {str(d).removeprefix('torch.')}[{w}]" for n, (d, w) in spec.extras.items()
    )
    return "{" + items + "}"


def spec_agreement(spec: WireSpec | None) -> dict[str, int]:
    """The agreement values a :class:`~moewire.WireSpec` fixes (empty for None)."""
    if spec is None:
        return {}
    g = spec.global_scale
    layout = ";".join(f"{n}:{d}:{w}" for n, (d, w) in spec.extras.items())
    return {
        "wire format": FORMATS.index(spec.format),
        "hidden": spec.hidden,
        "nvfp4 global_scale": (
            UNSET if g is None else struct.unpack("<q", struct.pack("<d", float(g)))[0]
        ),
        "extras layout": zlib.crc32(layout.encode()),
    }


def agreement_vector(fields: Mapping[str, int]) -> tuple[int, ...]:
    """``fields`` in :data:`AGREE_KEYS` order (every key must be present)."""
    assert set(fields) == set(AGREE_KEYS), f"agreement keys {sorted(fields)}"
    return tuple(int(fields[k]) for k in AGREE_KEYS)


def fingerprint(vector: tuple[int, ...]) -> int:
    """A signed 64-bit digest of an agreement vector (rides in the count exchange)."""
    raw = struct.pack(f"<{len(vector)}q", *vector)
    return struct.unpack("<q", hashlib.blake2b(raw, digest_size=8).digest())[0]


def check_agreement(
    group: ProcessGroup,
    vector: tuple[int, ...],
    extras: str,
    device: torch.device,
    who: str,
) -> None:
    """All-gather every rank's agreement ``vector`` (int64 ``[A]``) and raise ``ValueError``
    on every rank, naming each rank's value, where one differs. ``extras``: this rank's
    :func:`extras_text`, gathered only when the extras layout differs. ``who`` names the
    operation in the message (e.g. ``"allgather dispatch"``)."""
    from moewire.comm._collectives import all_gather

    world = dist.get_world_size(group)
    local_A = torch.tensor(vector, dtype=torch.int64, device=device)
    out_WA = torch.empty(world * len(vector), dtype=torch.int64, device=device)
    all_gather(out_WA, local_A, group)
    rows = [tuple(r) for r in out_WA.view(world, -1).tolist()]
    # the row width last: when it differs it is usually the consequence of another value
    keys = sorted(range(len(AGREE_KEYS)), key=lambda i: AGREE_KEYS[i] == "row width (bytes)")
    diffs = []
    for i in keys:
        key, seen = AGREE_KEYS[i], [r[i] for r in rows]
        if len(set(seen)) == 1:
            continue
        if key == "extras layout":
            texts: list[object] = [None] * world
            dist.all_gather_object(texts, extras, group=group)
            shown = [str(t) for t in texts]
        else:
            shown = [show(key, v) for v in seen]
        per_rank = ", ".join(f"rank {r}: {s}" for r, s in enumerate(shown))
        diffs.append(f"{key} differs across ranks ({per_rank})")
    if diffs:
        raise ValueError(f"{'; '.join(diffs)}; every rank must use the same value ({who})")
