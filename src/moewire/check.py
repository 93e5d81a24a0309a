"""``moewire check``: the correctness self-test on this machine.

Runs the library's contracts on fresh random data, on whatever this machine has:

- ``formats``: row locality (``pack(cat(a, b)) == cat(pack(a), pack(b))``, bitwise) and
  non-finite inputs staying non-finite, for every format, on heavy-tailed data.
- ``kernels`` (CUDA + Triton only): the Triton pack/dequantize bytes equal the torch
  reference's, for every format, bf16 and fp32 input.
- ``invariance``: a group of 2 processes (gloo on CPU) dispatches packed rows with every
  backend; ``dequantize(dispatch(pack(x))) == dequantize(pack(allgather(x)))`` bitwise.
- ``layer``: the 2-rank sharded layer equals the unsharded one, and ``quantize="before"``
  equals ``"after"`` bitwise.

Each check prints PASS or FAIL with what differed; the exit code is 1 if any failed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from moewire.formats import FORMATS, WireSpec, format_class, nvfp4_global_scale
from moewire.testing.data import heavy_tailed
from moewire.testing.spawn import run_distributed

HIDDEN = 512
EXPERTS = 16
TOP_K = 4


def _spec(fmt: str, extras=None) -> WireSpec:
    g = nvfp4_global_scale(64.0) if format_class(fmt).needs_global_scale else None
    return WireSpec(fmt, HIDDEN, global_scale=g, extras=extras)


def check_formats() -> str:
    for fmt in FORMATS:
        spec = _spec(fmt, {"router_logits": (torch.float32, EXPERTS)})
        a, b = heavy_tailed(37, HIDDEN) * 3, heavy_tailed(5, HIDDEN)
        la, lb = torch.randn(37, EXPERTS), torch.randn(5, EXPERTS)
        whole = spec.pack(torch.cat([a, b]), router_logits=torch.cat([la, lb]))
        parts = torch.cat([spec.pack(a, router_logits=la), spec.pack(b, router_logits=lb)])
        if not torch.equal(whole, parts):
            raise AssertionError(f"{fmt}: pack is not row-local")
        x = heavy_tailed(4, HIDDEN)
        x[1, 7], x[2, 300], x[3, 0] = math.nan, math.inf, -math.inf
        y = _spec(fmt).dequantize(_spec(fmt).pack(x), torch.float32)
        for r, c in ((1, 7), (2, 300), (3, 0)):
            if math.isfinite(y[r, c].item()):
                raise AssertionError(f"{fmt}: non-finite input became {y[r, c].item()}")
    return f"{len(FORMATS)} formats row-local and non-finite-preserving"


def check_kernels() -> str:
    if not torch.cuda.is_available():
        return "SKIP: no CUDA GPU"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "SKIP: triton not installed"
    n = 0
    for fmt in FORMATS:
        spec = _spec(fmt, {"ids": (torch.int32, TOP_K)})
        for dtype in (torch.bfloat16, torch.float32):
            x = (heavy_tailed(129, HIDDEN) * 4).to(dtype).cuda()
            ids = torch.randint(0, EXPERTS, (129, TOP_K), dtype=torch.int32, device="cuda")
            ref = spec.pack(x, backend="torch", ids=ids)
            got = spec.pack(x, backend="triton", ids=ids)
            if not torch.equal(ref, got):
                bad = (ref != got).any(dim=1).nonzero().flatten().tolist()[:5]
                raise AssertionError(f"{fmt} {dtype}: triton rows differ at rows {bad}")
            if spec.wire_format.swizzles_scales:
                sw_ref = spec.swizzled_scales(ref, backend="torch").view(torch.uint8)
                if not torch.equal(
                    spec.swizzled_scales(ref, backend="triton").view(torch.uint8), sw_ref
                ):
                    raise AssertionError(f"{fmt} {dtype}: triton swizzled scales differ")
            for out in (torch.bfloat16, torch.float32):
                d_ref = spec.dequantize(ref, out, backend="torch")
                d_got = spec.dequantize(ref, out, backend="triton")
                same = (d_ref == d_got) | (torch.isnan(d_ref) & torch.isnan(d_got))
                if not bool(same.all()):
                    raise AssertionError(f"{fmt}: triton dequantize differs ({out})")
            n += 1
    return f"{n} format x dtype cases bit-exact (triton vs torch)"


def _run_2ranks(what: str) -> str:
    from moewire.check_dist import run_dist_check

    return run_distributed(run_dist_check, 2, what, timeout=300)[0]


CHECKS: dict[str, Callable[[], str]] = {
    "formats": check_formats,
    "kernels": check_kernels,
    "invariance": lambda: _run_2ranks("invariance"),
    "layer": lambda: _run_2ranks("layer"),
}


def run_checks(names: list[str] | None = None) -> int:
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    for name in names or list(CHECKS):
        try:
            msg = CHECKS[name]()
            status = "SKIP" if msg.startswith("SKIP") else "PASS"
            msg = msg.removeprefix("SKIP: ")
        except Exception as e:  # report every check, then fail
            status, msg = "FAIL", str(e)
        counts[status] += 1
        print(f"{status}  {name}: {msg}", flush=True)
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return 1 if counts["FAIL"] else 0
