"""Profile the expert stage on one GPU against its bare grouped GEMMs, step by step.

    PYTHONPATH=src python tools/stage_profile.py --tokens 1 64 256 1024 8192 [--json F]

DeepSeek-R1 dims (H=7168, I=2048, top-8), 64 local experts with distinct random weights,
random top-8 routing. For each token count: the bare references (the two grouped GEMMs on
pre-sorted contiguous operands, and the bare FFN = GEMMs + torch SwiGLU), the stage per
path and wire format, each step of the stage, CUDA-graph replay of the stage, and the
time to read the hit experts' weights at the copy bandwidth measured in the same run.
Medians of CUDA-event timings after warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

import moewire as mw
from moewire.moe import stage
from moewire.moe.experts import LocalExperts

H, I, L, K = 7168, 2048, 64, 8


def timed(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn`` over ``iters`` CUDA-event timed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def graphed(fn):
    """``fn`` captured in a CUDA graph (after a warm-up on a side stream); returns replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed(lambda: dst.copy_(src), 10, 2)


def run(tokens: int, ex16: LocalExperts, ex8: LocalExperts, bw: float) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, H, device="cuda", generator=gen).bfloat16()
    ids = torch.rand(tokens, L, device="cuda", generator=gen).argsort(dim=1)[:, :K].int()
    w = torch.rand(tokens, K, device="cuda", generator=gen)
    g = mw.nvfp4_global_scale(float(x.float().abs().amax()))
    rows = {f: mw.WireSpec(f, H, global_scale=g if f == "nvfp4" else None) for f in
            ("bf16", "fp8", "nvfp4", "mxfp8")}  # fmt: skip
    packed = {f: (s, s.pack(x)) for f, s in rows.items()}
    plan = stage.plan_device(ids, 0, L)
    hit = int((torch.bincount(ids.flatten().long(), minlength=L) > 0).sum())
    rec = {"tokens": tokens, "pairs": tokens * K, "experts_hit": hit}
    rec["weights_read_bf16_us"] = hit * 3 * H * I * 2 / bw * 1e6
    rec["weights_read_fp8_us"] = hit * 3 * H * I / bw * 1e6
    flops = 2 * tokens * K * 3 * H * I

    # bare references: pre-sorted contiguous operands
    a16 = stage.gather_bf16(*packed["bf16"], plan)
    offs = plan.offsets_L
    w13t, w2t = ex16.w13_L2IH.transpose(-2, -1), ex16.w2_LHI.transpose(-2, -1)

    a2_16, _ = stage.swiglu(torch._grouped_mm(a16, w13t, offs=offs), plan, fp8=False)

    def gemms16():
        torch._grouped_mm(a16, w13t, offs=offs)
        return torch._grouped_mm(a2_16, w2t, offs=offs)

    def ffn16():
        h = torch._grouped_mm(a16, w13t, offs=offs)
        gate, up = h.chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, w2t, offs=offs)

    q8, s8 = stage.gather_fp8(*packed["fp8"], plan)
    w13t8, w2t8 = ex8.w13_fp8.transpose(-2, -1), ex8.w2_fp8.transpose(-2, -1)

    def gemm8(a, sa, wt, sw):
        return torch._scaled_grouped_mm(a, wt, sa, sw, offs=offs, out_dtype=torch.bfloat16)

    h8 = gemm8(q8, s8, w13t8, ex8.w13_scale)
    a28, s28 = stage.swiglu(h8, plan, fp8=True)

    def gemms8():
        gemm8(q8, s8, w13t8, ex8.w13_scale)
        return gemm8(a28, s28, w2t8, ex8.w2_scale)

    rec["bare_gemms_bf16_us"] = timed(gemms16) * 1e6
    rec["bare_ffn_bf16_us"] = timed(ffn16) * 1e6
    rec["bare_gemms_fp8_us"] = timed(gemms8) * 1e6
    rec["bare_ffn_bf16_tflops"] = flops / rec["bare_ffn_bf16_us"] / 1e6
    rec["bare_gemms_fp8_tflops"] = flops / rec["bare_gemms_fp8_us"] / 1e6
    # the stage, per path and wire format
    for f, (spec, r) in packed.items():
        for name, ex, impl in (("bf16", ex16, "grouped"), ("fp8", ex8, "fp8")):

            def fn(spec=spec, r=r, ex=ex, impl=impl):
                return ex(spec, r, ids, w, impl, torch.bfloat16)

            t = timed(fn)
            rec[f"stage_{name}_{f}_rows_us"] = t * 1e6
            rec[f"stage_{name}_{f}_rows_tflops"] = flops / t / 1e12
            if f == "bf16" or (f == "fp8" and name == "fp8"):
                rec[f"stage_{name}_{f}_rows_graph_us"] = timed(graphed(fn)) * 1e6
    # steps of the bf16 and fp8 stages
    spec16, r16 = packed["bf16"]
    h16 = torch._grouped_mm(a16, w13t, offs=offs)
    a2, _ = stage.swiglu(h16, plan, fp8=False)
    y = torch._grouped_mm(a2, w2t, offs=offs)
    steps = {
        "plan": lambda: stage.plan_device(ids, 0, L),
        "gather_bf16": lambda: stage.gather_bf16(spec16, r16, plan),
        "gather_fp8_from_fp8": lambda: stage.gather_fp8(*packed["fp8"], plan),
        "gather_fp8_from_nvfp4": lambda: stage.gather_fp8(*packed["nvfp4"], plan),
        "gemm1_bf16": lambda: torch._grouped_mm(a16, w13t, offs=offs),
        "swiglu_bf16": lambda: stage.swiglu(h16, plan, fp8=False),
        "swiglu_fp8": lambda: stage.swiglu(h8, plan, fp8=True),
        "gemm2_bf16": lambda: torch._grouped_mm(a2, w2t, offs=offs),
        "gemm1_fp8": lambda: gemm8(q8, s8, w13t8, ex8.w13_scale),
        "gemm2_fp8": lambda: gemm8(a28, s28, w2t8, ex8.w2_scale),
        "unpermute_bf16": lambda: stage.unpermute(y, plan, w, torch.bfloat16),
    }
    for name, fn in steps.items():
        rec[f"step_{name}_us"] = timed(fn) * 1e6
    return rec


def sweep_small(ex16: LocalExperts, ex8: LocalExperts, bw: float, tokens: list[int]) -> None:
    """Time the small-M kernel's tiles on both GEMMs of both paths against torch's (each
    captured in a CUDA graph and replayed: the GPU's time, not the host's launches)."""
    tiles = [  # (BLOCK_N, BLOCK_K, warps, stages, SWAP)
        (64, 256, 4, 3, False),
        (128, 128, 4, 3, False),
        (64, 128, 4, 4, True),
        (64, 128, 4, 6, True),
        (64, 256, 4, 3, True),
        (64, 256, 4, 4, True),
        (64, 256, 8, 4, True),
        (128, 128, 4, 3, True),
        (128, 128, 4, 4, True),
        (128, 128, 8, 4, True),
        (128, 64, 4, 6, True),
        (128, 256, 4, 3, True),
        (128, 256, 8, 3, True),
        (128, 128, 4, 5, True),
        (128, 128, 8, 5, True),
        (64, 512, 4, 3, True),
        (256, 64, 8, 4, True),
        (256, 128, 8, 3, True),
    ]
    for t in tokens:
        ids = torch.rand(t, L, device="cuda").argsort(dim=1)[:, :K].int()
        plan = stage.plan_device(ids, 0, L)
        hit = int((torch.bincount(ids.flatten().long(), minlength=L) > 0).sum())
        p = plan.num_pairs
        a16 = torch.randn(p, H, device="cuda").bfloat16()
        b16 = torch.randn(p, I, device="cuda").bfloat16()
        q = mw.WireSpec("fp8", H)
        a8, sa = q.quantize(a16.float())
        b8, sb = mw.WireSpec("fp8", I).quantize(b16.float())
        cases = {
            "bf16": [(a16, ex16.w13_L2IH, None, None), (b16, ex16.w2_LHI, None, None)],
            "fp8": [(a8, ex8.w13_fp8, sa.reshape(-1), ex8.w13_scale),
                    (b8, ex8.w2_fp8, sb.reshape(-1), ex8.w2_scale)],
        }  # fmt: skip
        for name, gemms in cases.items():
            read = hit * 3 * H * I * (2 if name == "bf16" else 1) / bw * 1e6

            def run_all(small, gemms=gemms, plan=plan):
                for a, w, s1, s2 in gemms:
                    stage.grouped_gemm(a, w, plan, s1, s2, small=small)

            saved = dict(stage.SMALL_M_TILES)
            key = (name, stage.small_m_block(plan.rows_per_expert))
            # replayed from a CUDA graph: GPU time, without the host's launches
            best = (timed(graphed(lambda: run_all(False))) * 1e6, "torch")
            print(f"T={t} {name} weights read {read:.0f} us, torch {best[0]:.0f} us", flush=True)
            for tile in tiles:
                stage.SMALL_M_TILES[key] = tile
                try:
                    us = timed(graphed(lambda: run_all(True))) * 1e6
                except Exception as err:  # a tile that does not fit shared memory
                    print(f"  {tile}: {type(err).__name__}", flush=True)
                    continue
                print(f"  {tile}: {us:.0f} us ({us / read:.2f}x read)", flush=True)
                best = min(best, (us, str(tile)))
            print(f"T={t} {name} BLOCK_M={key[1]} best {best[1]} {best[0]:.0f} us "
                  f"({best[0] / read:.2f}x read)",
                  flush=True)  # fmt: skip
            stage.SMALL_M_TILES.update(saved)


def profile_plan(tokens: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    ids = torch.rand(tokens, L, device="cuda").argsort(dim=1)[:, :K].int()
    for _ in range(3):
        stage.plan_device(ids, 0, L)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            stage.plan_device(ids, 0, L)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="*", default=[1, 64, 256, 1024, 8192])
    p.add_argument("--json", default=None)
    p.add_argument("--sweep", type=int, nargs="*", default=None, help="small-M tile sweep at T")
    p.add_argument("--profile-plan", type=int, default=None, help="profile the plan at T")
    args = p.parse_args()
    torch.manual_seed(0)
    w13 = torch.randn(L, 2 * I, H, device="cuda", dtype=torch.bfloat16) * H**-0.5
    w2 = torch.randn(L, H, I, device="cuda", dtype=torch.bfloat16) * I**-0.5
    ex16 = LocalExperts(w13, w2, 0, fp8=False)
    ex8 = LocalExperts(w13, w2, 0, fp8=True)
    del w13, w2
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    if args.profile_plan:
        profile_plan(args.profile_plan)
    if args.sweep:
        sweep_small(ex16, ex8, bw, args.sweep)
    out = []
    for t in args.tokens:
        rec = run(t, ex16, ex8, bw)
        out.append(rec)
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in rec.items()}),
              flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "bw": bw, "records": out}, f)


if __name__ == "__main__":
    main()
