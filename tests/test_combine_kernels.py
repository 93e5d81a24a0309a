"""Tier a/c: the combine codec's Triton kernels vs its torch reference, bytes and values.

Without a GPU the kernels run on CPU under Triton's interpreter (``TRITON_INTERPRET=1`` is
set before Triton is imported), on small shapes; the ``gpu`` test runs DeepSeek-R1 rows
(H=7168) on CUDA. Both compare with ``rtol=0, atol=0`` (NaN positions, not payloads).

Shape legend: ``T`` rows, ``H`` hidden, ``W`` sources.
"""

from __future__ import annotations

import pytest
import torch

from triton_env import import_kernels

_CUDA = torch.cuda.is_available()
# Triton picks interpreter or compiler when the kernel modules are imported: set the
# variable for those imports only (as tests/test_triton_kernels.py does), so it does not
# leak into other tests.
import_kernels("moewire.formats._combine_triton")

from moewire.formats.combine import COMBINE_WIRES, combine_codec  # noqa: E402
from moewire.testing.data import heavy_tailed  # noqa: E402

WIRES = tuple(w for w in COMBINE_WIRES if w != "bf16")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = torch.where(t.isnan(), torch.nan, t)
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def _partials(t: int, h: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    x = heavy_tailed(t, h, generator=torch.Generator().manual_seed(seed))
    x = x * torch.logspace(-7, 3, t)[:, None]
    x[0] = 0.0
    x[1, 3] = float("nan")
    x[2, h - 1] = float("-inf")
    x[3, :16] = -0.0
    return x.to(dtype)


def _check(wire: str, h: int, t: int, device: str, seed: int) -> None:
    codec = combine_codec(wire, h)
    for dtype in (torch.float32, torch.bfloat16):
        x = _partials(t, h, dtype, seed)
        ref = codec.encode(x, backend="torch")
        xd = x.to(device)
        got = codec.encode(xd, backend="triton")
        assert torch.equal(got.cpu(), ref), (wire, dtype, (got.cpu() != ref).nonzero()[:4])
        # into a strided slot of a larger send buffer
        buf = torch.full((t + 2, codec.row_bytes), 0xA5, dtype=torch.uint8, device=device)
        codec.encode(xd, out=buf[1 : t + 1], backend="triton")
        assert torch.equal(buf[1 : t + 1].cpu(), ref)
        gen = torch.Generator().manual_seed(seed)
        index = torch.randint(-1, t, (t, 3), generator=gen)
        for out_dtype in (torch.float32, torch.bfloat16):
            want = codec.decode_sum(ref, index, out_dtype, backend="torch")
            have = codec.decode_sum(ref.to(device), index.to(device), out_dtype, backend="triton")
            assert torch.equal(_bits(have.cpu()), _bits(want)), (wire, dtype, out_dtype)


@pytest.mark.parametrize("wire", WIRES)
def test_kernels_small(wire):
    device = "cuda" if _CUDA else "cpu"
    for h, t in ((64, 6), (96, 5)):
        _check(wire, h, t, device, seed=h)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("wire", WIRES)
def test_kernels_deepseek_gpu(wire):
    _check(wire, 7168, 300, "cuda", seed=7)
