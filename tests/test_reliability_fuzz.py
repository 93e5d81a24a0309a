"""Fuzzing the bitwise invariance ``dequantize(dispatch(pack(x))) == dequantize(pack(gather(x)))``.

- hypothesis, single process: for any split of the tokens into per-rank parts (empty parts
  included), ``cat(pack(part_r))`` equals ``pack(cat(part_r))`` byte for byte, also when each
  part is packed in place into its slot of one buffer (the allgather send path), and the
  dequantized values agree bitwise; values include NaN, Inf, subnormals and huge magnitudes.
  Only the documented errors may be raised (ValueError/TypeError for a bad ``hidden``).
- gloo, 3 ranks, a fixed set of random cases through every backend: the received rows
  equal the single-process pack of the concatenated tokens.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import moewire as mw
from moewire.comm import make_comm
from moewire.formats import format_class
from moewire.testing.spawn import run_distributed
from test_fuzz_formats import SPECIAL

values = st.one_of(
    st.sampled_from(SPECIAL),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.floats(-(2.0**-126), 2.0**-126, width=32),  # subnormals and tiny normals
    st.floats(-8, 8, width=32),
)


@st.composite
def split_cases(draw):
    fmt = draw(st.sampled_from(mw.FORMATS))
    block = max(format_class(fmt).block, 2)
    hidden = block * draw(st.integers(1, max(1, 256 // block)))
    counts = draw(st.lists(st.integers(0, 5), min_size=1, max_size=4))
    arr = draw(hnp.arrays(np.float32, (sum(counts), hidden), elements=values))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    g = draw(st.sampled_from([1.0, 448.0, 1e-3, 2.0**20]))
    with_ids = draw(st.booleans())
    return fmt, hidden, counts, arr, dtype, g, with_ids


def _spec(fmt: str, hidden: int, g: float, with_ids: bool) -> mw.WireSpec:
    extras = {"topk_ids": (torch.int32, 3)} if with_ids else None
    return mw.WireSpec(fmt, hidden, global_scale=g if fmt == "nvfp4" else None, extras=extras)


@settings(max_examples=120, deadline=None)
@given(case=split_cases())
def test_fuzz_split_invariance(case):
    fmt, hidden, counts, arr, dtype, g, with_ids = case
    spec = _spec(fmt, hidden, g, with_ids)
    x = torch.from_numpy(arr).to(dtype)
    ids = torch.arange(x.shape[0] * 3, dtype=torch.int32).reshape(-1, 3)
    kw = (lambda sl: {"topk_ids": ids[sl]}) if with_ids else (lambda sl: {})
    whole = spec.pack(x, **kw(slice(None)))
    starts = np.cumsum([0, *counts]).tolist()
    parts = [spec.pack(x[a:b], **kw(slice(a, b))) for a, b in itertools.pairwise(starts)]
    assert torch.equal(torch.cat(parts), whole)
    # in place into the slots of one padded buffer, as allgather's dispatch_buffer does
    m = max(counts)
    buf = torch.full((len(counts) * m, spec.row_bytes), 0xAB, dtype=torch.uint8)
    for r, (a, b) in enumerate(itertools.pairwise(starts)):
        spec.pack(x[a:b], out=buf[r * m : r * m + b - a], **kw(slice(a, b)))
    gathered = torch.cat([buf[r * m : r * m + c] for r, c in enumerate(counts)])
    assert torch.equal(gathered, whole)
    y = spec.dequantize(gathered, torch.float32)
    assert torch.equal(y.view(torch.int32), spec.dequantize(whole, torch.float32).view(torch.int32))
    # a non-finite input value never comes back finite
    assert not bool((~torch.isfinite(x.float()) & torch.isfinite(y)).any())


@settings(max_examples=60, deadline=None)
@given(
    fmt=st.sampled_from(mw.FORMATS),
    hidden=st.integers(-3, 300),
    g=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
)
def test_fuzz_spec_errors_are_documented(fmt, hidden, g):
    """Any hidden size and global scale: a WireSpec or ValueError/TypeError, nothing else."""
    try:
        spec = mw.WireSpec(fmt, hidden, global_scale=g if fmt == "nvfp4" else None)
    except (ValueError, TypeError) as err:
        assert str(hidden) in str(err) or "global_scale" in str(err), err
        return
    assert spec.row_bytes % 16 == 0 and hidden > 0 and hidden % format_class(fmt).block == 0


GLOO_CASES = 12


def _gloo_case(i: int, world: int):
    g = torch.Generator().manual_seed(1000 + i)
    fmt = mw.FORMATS[i % len(mw.FORMATS)]
    hidden = 128
    counts = torch.randint(0, 6, (world,), generator=g).tolist()
    x = (
        torch.randn(sum(counts), hidden, generator=g)
        * torch.logspace(-40, 38, sum(counts) or 1)[: sum(counts), None].float()
    )
    if x.numel():
        x.view(-1)[torch.randint(0, x.numel(), (3,), generator=g)] = torch.tensor(
            [float("nan"), float("inf"), -1e-42]
        )
    ids = torch.randint(0, 2 * world, (sum(counts), 2), generator=g)
    spec = mw.WireSpec(fmt, hidden, global_scale=448.0 if fmt == "nvfp4" else None)
    return spec, counts, x, ids


def _gloo_worker(world: int) -> dict:
    rank = dist.get_rank()
    out = {}
    for i in range(GLOO_CASES):
        spec, counts, x, ids = _gloo_case(i, world)
        lo = sum(counts[:rank])
        sl = slice(lo, lo + counts[rank])
        rows = spec.pack(x[sl])
        for name in ("allgather", "grouped", "alltoall"):
            comm = make_comm(name, None, spec=spec, num_experts=2 * world)
            recv, _ = comm.dispatch(rows, ids[sl])
            out[i, name] = recv
    return out


@pytest.mark.timeout(120)
def test_fuzz_gloo_rounds_bitwise():
    """Random formats, per-rank counts (0 included) and extreme values on 3 gloo ranks: the
    rows every backend delivers equal the single-process pack of the gathered tokens."""
    world = 3
    res = run_distributed(_gloo_worker, world, world, timeout=100)
    for i in range(GLOO_CASES):
        spec, counts, x, ids = _gloo_case(i, world)
        whole = spec.pack(x)
        starts = np.cumsum([0, *counts]).tolist()
        for rank in range(world):
            assert torch.equal(res[rank][i, "allgather"], whole), i
            assert torch.equal(res[rank][i, "grouped"], whole), i
            # alltoall: the tokens with an expert on this rank, by source rank, token order
            dest = ids // 2
            want = [
                whole[a + t]
                for a, b in itertools.pairwise(starts)
                for t in range(b - a)
                if bool((dest[a + t] == rank).any())
            ]
            got = res[rank][i, "alltoall"]
            assert got.shape[0] == len(want), i
            if want:
                assert torch.equal(got, torch.stack(want)), i
