"""The fp8 expert stage with 128x128 block-scaled weights against per-channel weights, per
wire format (``LocalExperts.forward``, bf16 output).

    PYTHONPATH=src python tools/block_stage_bench.py

DeepSeek-R1 dims, 64 local experts of 64, top-8, uniform random routing; both weight kinds
quantized from the same bf16 weights; event-timed medians of 20 calls. A measuring aid for
BENCHMARKS.md ("block-scaled fp8 GEMM"), not a test.
"""

from __future__ import annotations

import torch
from block_gemm_bench import event_us

import moewire as mw
from moewire.moe.experts import LocalExperts
from moewire.moe.weights import quantize_block_weight

H, I, E, K = 7168, 2048, 64, 8
#: (wire format, weights) per case: "block" 128x128 scales, "channel" per output channel.
CASES = [("fp8_block128", "block"), ("fp8", "block"), ("nvfp4", "block"), ("mxfp8", "block"),
         ("bf16", "block"), ("fp8", "channel"), ("nvfp4", "channel")]  # fmt: skip


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(E, 2 * I, H, device="cuda", generator=g, dtype=torch.bfloat16) * H**-0.5
    w2 = torch.randn(E, H, I, device="cuda", generator=g, dtype=torch.bfloat16) * I**-0.5
    (q13, s13), (q2, s2) = quantize_block_weight(w13), quantize_block_weight(w2)
    experts = {
        "block": LocalExperts(q13, q2, 0, fp8=True, w13_scale=s13, w2_scale=s2, num_experts=E),
        "channel": LocalExperts(w13, w2, 0, fp8=True, num_experts=E),
    }
    del w13, w2, q13, q2
    torch.cuda.empty_cache()
    for t in (1024, 8192):
        x = torch.randn(t, H, device="cuda", generator=g).to(torch.bfloat16)
        ids = torch.rand(t, E, device="cuda", generator=g).argsort(dim=1)[:, :K].to(torch.int32)
        wts = torch.rand(t, K, device="cuda", generator=g)
        gs = mw.nvfp4_global_scale(x.float().abs().amax())
        out = []
        for wire, kind in CASES:
            spec = mw.WireSpec(wire, H, global_scale=gs if wire == "nvfp4" else None)
            rows, ex = spec.pack(x), experts[kind]
            us = event_us(lambda ex=ex, spec=spec, rows=rows, wts=wts, ids=ids:
                          ex(spec, rows, ids, wts, "fp8", torch.bfloat16))  # fmt: skip
            flop = 2 * t * K * 3 * H * I
            out.append(f"{kind} weights, {wire} rows: {us:.1f} us ({flop / us / 1e6:.0f} TFLOP/s)")
        print(f"T={t}: " + "; ".join(out), flush=True)


if __name__ == "__main__":
    main()
