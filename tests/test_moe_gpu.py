"""Tier c: the GPU expert paths against the reference loop (marked ``gpu``).

- ``grouped`` (``torch._grouped_mm``, CUTLASS) vs ``loop`` (one cuBLAS mm pair per expert)
  and both vs the float64 per-token oracle of ``test_moe``: the GEMMs accumulate in fp32 in
  different orders and round to bf16, so values differ by bf16 ulps of their terms; bound
  ``|y - ref| <= 2^-6 * mag`` as on CPU.
- ``fp8`` (``torch._scaled_grouped_mm`` on e4m3 wire rows) vs ``fp8_loop`` (the same math
  in fp32): equal up to fp32 accumulation order, then bf16 rounding; a 1-ulp change of the
  SwiGLU output can move one re-quantized e4m3 code (2^-4 relative), so the bound is
  ``|d| <= 2^-4 * mag`` and SQNR >= 35 dB; against the bf16 loop SQNR >= 22 dB (fp8 noise).
- nvfp4/mxfp4 rows: dequantized by the Triton kernel, then the bf16 path; equal to the CPU
  layer up to GEMM accumulation order.
- a single-rank NCCL group with each comm backend equals ``comm="local"`` bitwise.

Shapes include an expert that receives no token (an empty group in the grouped GEMMs).
Shape legend: ``T`` tokens, ``H`` hidden, ``I`` intermediate, ``E`` experts, ``K`` top-k.
"""

from __future__ import annotations

import pytest
import torch

import moewire as mw
from moewire.testing.data import sqnr_db
from test_moe import oracle

pytestmark = pytest.mark.gpu

H, I, E, K, T = 512, 256, 16, 4, 600
G_NVFP4 = 2688.0 / 6.0
UNUSED_EXPERT = 5


def _is_hopper_or_newer() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(torch.bfloat16)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    logits = torch.randn(T, E, generator=g)
    logits[:, UNUSED_EXPERT] = -float("inf")
    cfg = mw.MoEConfig(H, I, E, K)
    return cfg, w13, w2, x, logits


def run(cfg, w13, w2, x, logits, device, wire="bf16", **kw):
    layer = mw.EPMoE(
        cfg,
        wire=wire,
        comm=kw.pop("comm", "local"),
        global_scale=G_NVFP4 if wire == "nvfp4" else None,
        **kw,
    )
    layer.load_experts(w13.to(device), w2.to(device))
    return layer(x.to(device), logits.to(device)).cpu(), layer


@pytest.mark.skipif(not _is_hopper_or_newer(), reason="torch._grouped_mm needs sm90+")
@pytest.mark.parametrize("wire", ["bf16", "nvfp4", "mxfp4", "fp8"])
def test_grouped_vs_loop_vs_oracle(wire):
    cfg, w13, w2, x, logits = setup()
    y_loop, layer = run(cfg, w13, w2, x, logits, "cuda", wire, experts="loop")
    y_grouped, _ = run(cfg, w13, w2, x, logits, "cuda", wire, experts="grouped")
    y_cpu, _ = run(cfg, w13, w2, x, logits, "cpu", wire, experts="loop")
    ref, mag = oracle(cfg, layer.spec, x, logits, w13, w2)
    for name, y in (("loop", y_loop), ("grouped", y_grouped), ("cpu", y_cpu)):
        err = (y.double() - ref).abs()
        assert (err <= 2**-6 * mag).all(), (name, (err / mag).max().item())
        assert sqnr_db(ref, y) > 45, name
    print(f"{wire}: SQNR grouped vs loop {sqnr_db(y_loop, y_grouped):.1f} dB")


@pytest.mark.skipif(not _is_hopper_or_newer(), reason="torch._scaled_grouped_mm needs sm90+")
def test_fp8_vs_fp8_loop_and_bf16():
    cfg, w13, w2, x, logits = setup()
    y_fp8, layer = run(cfg, w13, w2, x, logits, "cuda", "fp8", experts="fp8")
    y_emul, _ = run(cfg, w13, w2, x, logits, "cuda", "fp8", experts="fp8_loop")
    y_emul_cpu, _ = run(cfg, w13, w2, x, logits, "cpu", "fp8", experts="fp8_loop")
    y_bf16, _ = run(cfg, w13, w2, x, logits, "cuda", "fp8", experts="loop")
    _, mag = oracle(cfg, layer.spec, x, logits, w13, w2)
    for name, y in (("fp8_loop cuda", y_emul), ("fp8_loop cpu", y_emul_cpu)):
        err = (y_fp8.double() - y.double()).abs()
        assert (err <= 2**-4 * mag).all(), (name, (err / mag).max().item())
        assert sqnr_db(y, y_fp8) >= 35, name
    s = sqnr_db(y_bf16, y_fp8)
    print(
        f"fp8: SQNR vs fp8_loop {sqnr_db(y_emul, y_fp8):.1f} dB, vs fp8_loop(cpu) "
        f"{sqnr_db(y_emul_cpu, y_fp8):.1f} dB, vs bf16 loop {s:.1f} dB"
    )
    assert s >= 22


@pytest.mark.skipif(not _is_hopper_or_newer(), reason="grouped GEMMs need sm90+")
def test_auto_picks_grouped_and_before_after_bitwise():
    cfg, w13, w2, x, logits = setup(1)
    for wire in ("fp8", "nvfp4", "mxfp4"):
        outs = [
            run(cfg, w13, w2, x, logits, "cuda", wire, quantize=q, routing=r)[0]
            for q in ("before", "after")
            for r in ("logits", "topk")
        ]
        for o in outs[1:]:
            assert torch.equal(o, outs[0]), wire
    _, layer = run(cfg, w13, w2, x[:1], logits[:1], "cuda")
    from moewire.moe.experts import resolve_impl

    assert resolve_impl(layer.experts_impl, torch.device("cuda")) == "grouped"


def test_single_rank_nccl_group_equals_local(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    if not hasattr(pytest.importorskip("moewire.comm"), "make_comm"):
        pytest.skip("moewire.comm (issue 4) not present")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        torch.cuda.set_device(0)
        cfg, w13, w2, x, logits = setup(2)
        for wire in ("fp8", "nvfp4"):
            y_local, _ = run(cfg, w13, w2, x, logits, "cuda", wire, experts="grouped")
            for comm in ("allgather", "alltoall", "grouped"):
                for routing in ("logits", "topk"):
                    y, _ = run(
                        cfg,
                        w13,
                        w2,
                        x,
                        logits,
                        "cuda",
                        wire,
                        comm=comm,
                        group=None,
                        routing=routing,
                        experts="grouped",
                    )
                    assert torch.equal(y, y_local), (wire, comm, routing)
    finally:
        dist.destroy_process_group()
