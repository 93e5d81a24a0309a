"""One pack call per format (bf16 x [T, 7168]) for a profiler to capture, e.g.

    ncu --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy \\
        -k regex:pack_kernel python tools/ncu_pack.py --tokens 8192
"""

from __future__ import annotations

import argparse

import torch

from moewire.formats import FORMATS, WireSpec, nvfp4_global_scale
from moewire.testing.data import heavy_tailed

p = argparse.ArgumentParser()
p.add_argument("--tokens", type=int, default=8192)
p.add_argument("--hidden", type=int, default=7168)
p.add_argument("--formats", nargs="+", default=list(FORMATS))
a = p.parse_args()
x = (heavy_tailed(a.tokens, a.hidden) * 3).to("cuda", torch.bfloat16)
g = nvfp4_global_scale(x.float().abs().amax())
for fmt in a.formats:
    spec = WireSpec(fmt, a.hidden, global_scale=g if fmt == "nvfp4" else None)
    rows = spec.pack(x, backend="triton")
    spec.pack(x, out=rows, backend="triton")
torch.cuda.synchronize()
