"""Property tests (hypothesis) over formats, shapes, values and extras: pack / unpack /
dequantize never raise anything but the documented errors, never turn a non-finite value
finite, keep extras verbatim, and stay row-local (bitwise)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import moewire as mw
from moewire.formats import format_class

SPECIAL = [
    0.0,
    -0.0,
    np.nan,
    np.inf,
    -np.inf,
    1e-45,
    -1e-45,
    1e-40,
    3.4e38,
    -3.4e38,
    448.0,
    449.0,
    6.0,
    5.0,
    0.25,
    0.75,
    2.5,
    2.0**-127,
]
values = st.one_of(
    st.sampled_from(SPECIAL),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.floats(-8, 8, width=32),
)
EXTRA_DTYPES = [torch.float32, torch.int32, torch.int64, torch.bfloat16, torch.uint8, torch.bool]


@st.composite
def cases(draw):
    fmt = draw(st.sampled_from(mw.FORMATS))
    block = max(format_class(fmt).block, 2)
    hidden = block * draw(st.integers(1, max(1, 256 // block)))
    t = draw(st.integers(0, 6))
    arr = draw(hnp.arrays(np.float32, (t, hidden), elements=values))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    n_extras = draw(st.integers(0, 3))
    extras = {}
    for i in range(n_extras):
        extras[f"e{i}"] = (draw(st.sampled_from(EXTRA_DTYPES)), draw(st.integers(1, 9)))
    g = draw(st.sampled_from([1.0, 2688.0 / 6.0, 1e-3, 1e4, 2.0**20]))
    return fmt, hidden, arr, dtype, extras, g


def _extra_tensor(dtype: torch.dtype, t: int, w: int, gen: torch.Generator) -> torch.Tensor:
    raw = torch.randint(0, 256, (t, w * dtype.itemsize), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        return (raw & 1).bool()
    return raw.view(dtype)


@settings(max_examples=150, deadline=None)
@given(case=cases(), seed=st.integers(0, 2**31 - 1))
def test_fuzz_pack_unpack_dequantize(case, seed):
    fmt, hidden, arr, dtype, decl, g = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(arr).to(dtype)
    spec = mw.WireSpec(fmt, hidden, global_scale=g if fmt == "nvfp4" else None, extras=decl)
    extras = {n: _extra_tensor(d, x.shape[0], w, gen) for n, (d, w) in decl.items()}
    rows = spec.pack(x, **extras)
    assert rows.dtype == torch.uint8 and rows.shape == (x.shape[0], spec.row_bytes)
    view = spec.unpack(rows)
    for n, v in extras.items():
        assert torch.equal(view.extras[n].view(torch.uint8), v.view(torch.uint8))
    y = spec.dequantize(rows, torch.float32)
    xf = x.float()
    # a non-finite input value never comes back finite
    assert not bool((~torch.isfinite(xf) & torch.isfinite(y)).any())
    # row locality: packing any split of the tokens gives the same bytes
    cut = x.shape[0] // 2
    parts = torch.cat(
        [
            spec.pack(x[:cut], **{n: v[:cut] for n, v in extras.items()}),
            spec.pack(x[cut:], **{n: v[cut:] for n, v in extras.items()}),
        ]
    )
    assert torch.equal(rows, parts)
