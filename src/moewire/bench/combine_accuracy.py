"""Accuracy of the quantized combine (``combine_wire``): what the return trip costs.

    python -m moewire.bench.combine_accuracy [--tokens 64] [--world-size 4] [--skip-models]

(a) **DeepSeek-R1 MoE layer** (H=7168, I=2048, E=256, top-8, deepseek_v3 router: 8 groups,
top-4 groups, scaling 2.5) on ``W`` simulated ranks in one process (rank ``r`` hosts
experts ``[64r, 64r+64)``), ``--tokens`` per rank. Inputs: ``moewire.testing.data.heavy_tailed``,
a Student-t(3) body (fat tails: most values small, a few large) with ``H/256`` = 28 outlier
channels scaled 50-200x, the pattern reported for LLM hidden states (LLM.int8(),
SmoothQuant); router logits standard normal. Experts: SwiGLU with bf16 weights (std
``1/sqrt(H)`` and ``1/sqrt(I)``); every expert is a different function: expert ``e`` uses
one base weight set with its own independent random permutations of the gate rows, the
up rows and the down-projection columns (so 256 distinct experts without materializing
256 weight sets), and the down projection has 28 outlier output channels (10-50x), so the
partial outputs have outlier channels too, as real MoE outputs do. Expert math in fp32
from the dispatch format's dequantized bf16 inputs; each rank's partial row is the fp32
sum of its experts' weighted outputs in top-k order. The combine then quantizes each
rank's partial rows with the codec (:mod:`moewire.formats.combine`, the code the comms
run), dequantizes and adds in fp32 in rank order. Reported: SQNR of the layer output vs
the unquantized combine (fp32 partials, EPMoE's default; bf16 partials shown too), for
dispatch formats bf16, fp8 and nvfp4.

(b) **Tiny transformers models** (tests/test_transformers.py: Qwen3-MoE, Mixtral,
DeepSeek-V3; hidden 64, 2 MoE layers, 8 experts, top-2, random init) made expert-parallel
with :func:`moewire.integrations.transformers.expert_parallel` over a real gloo group of
``--model-world-size`` ranks (``comm="allgather"``, bf16 dispatch), each rank its own
prompts: logits SQNR and top-1 agreement of each ``combine_wire`` vs the unquantized one.

Shape legend: ``T`` tokens over all ranks, ``H`` hidden, ``I`` expert width, ``E`` experts,
``K`` top-k, ``W`` ranks.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.nn.functional as F

from moewire.formats import WireSpec, format_class, nvfp4_global_scale
from moewire.formats.combine import COMBINE_WIRES, combine_codec
from moewire.testing.data import heavy_tailed, sqnr_db
from moewire.testing.spawn import run_distributed

DISPATCH = ("bf16", "fp8", "nvfp4")
QUANTIZED = tuple(w for w in COMBINE_WIRES if w != "bf16")
#: Seconds for the tiny models' gloo run (spawn included) and for each of its collectives.
MODELS_TIMEOUT_S = 1800.0


def _deepseek_partials(tokens: int, world: int, dispatch: str, seed: int) -> torch.Tensor:
    """fp32 ``[W, T, H]``: each simulated rank's partial rows for every token."""
    from moewire.bench.presets import PRESETS
    from moewire.bench.routines.layer import layer_config
    from moewire.moe.routing import route

    shape = PRESETS["deepseek-r1"]
    cfg = layer_config(shape)
    h, i, e, k = shape.hidden, shape.intermediate, shape.num_experts, shape.top_k
    gen = torch.Generator().manual_seed(seed)
    t = tokens * world
    x_TH = heavy_tailed(t, h, generator=gen).to(torch.bfloat16)
    logits_TE = torch.randn(t, e, generator=gen)
    w13 = (torch.randn(2 * i, h, generator=gen) / h**0.5).to(torch.bfloat16).float()
    w2 = torch.randn(h, i, generator=gen) / i**0.5
    out_ch = torch.randperm(h, generator=gen)[: h // 256]
    w2[out_ch] *= torch.empty(len(out_ch)).uniform_(10, 50, generator=gen)[:, None]
    w2 = w2.to(torch.bfloat16).float()
    if dispatch == "bf16":
        xq_TH = x_TH.float()
    else:
        calibrate = format_class(dispatch).needs_global_scale
        g = nvfp4_global_scale(x_TH.float()) if calibrate else None
        spec = WireSpec(dispatch, h, global_scale=g)
        xq_TH = spec.dequantize(spec.pack(x_TH), torch.bfloat16).float()
    ids_TK, wts_TK = route(cfg, logits_TE, torch.zeros(e))
    gate_TI, up_TI = (xq_TH @ w13.T).split(i, dim=1)
    perms = torch.stack([torch.randperm(i, generator=gen) for _ in range(3 * e)]).view(e, 3, i)
    h_TKI = torch.empty(t, k, i)
    for kk in range(k):
        p = perms[ids_TK[:, kk].long()]  # [T, 3, I]
        g_ = torch.gather(gate_TI, 1, p[:, 0])
        u_ = torch.gather(up_TI, 1, p[:, 1])
        act = (F.silu(g_) * u_).to(torch.bfloat16).float()
        h_TKI[:, kk] = torch.empty_like(act).scatter_(1, p[:, 2], act)  # down-proj column perm
    y_TKH = (h_TKI.reshape(t * k, i) @ w2.T).reshape(t, k, h) * wts_TK[:, :, None]
    owner_TK = ids_TK.long() // (e // world)
    partial_WTH = torch.zeros(world, t, h)
    for kk in range(k):  # top-k order, as the layer sums
        for r in range(world):
            m = (owner_TK[:, kk] == r)[:, None]
            partial_WTH[r] = partial_WTH[r] + torch.where(m, y_TKH[:, kk], 0.0)
    return partial_WTH


def _combine(partial_WTH: torch.Tensor, wire: str, dtype: torch.dtype) -> torch.Tensor:
    """What every owner gets back, for all tokens at once (row-local: the same as per rank)."""
    w, t, h = partial_WTH.shape
    p = partial_WTH.to(dtype)
    if wire == "bf16":
        out = torch.zeros(t, h)
        for r in range(w):
            out = out + p[r].float()
        return out
    codec = combine_codec(wire, h)
    rows = codec.encode(p.reshape(w * t, h))
    index_TW = torch.arange(w)[None, :] * t + torch.arange(t)[:, None]
    return codec.decode_sum(rows, index_TW, torch.float32)


def deepseek_table(tokens: int, world: int, seed: int) -> list[dict]:
    rows = []
    all_bf16 = None
    for dispatch in DISPATCH:
        partial = _deepseek_partials(tokens, world, dispatch, seed)
        ref = _combine(partial, "bf16", torch.float32)
        all_bf16 = ref if all_bf16 is None else all_bf16
        rows.append(
            {
                "dispatch": dispatch,
                "dispatch alone": sqnr_db(all_bf16, ref),
                "bf16 partials": sqnr_db(ref, _combine(partial, "bf16", torch.bfloat16)),
                **{w: sqnr_db(ref, _combine(partial, w, torch.float32)) for w in QUANTIZED},
            }
        )
    return rows


def _model_worker() -> dict:
    import copy
    import sys

    tests = os.path.join(os.path.dirname(__file__), "..", "..", "..", "tests")
    sys.path.insert(0, os.path.abspath(tests))
    from moewire.integrations.transformers import expert_parallel
    from test_transformers import ARCHS, VOCAB, tiny_model

    gen = torch.Generator().manual_seed(500 + torch.distributed.get_rank())
    ids_BS = torch.randint(0, VOCAB, (4, 32), generator=gen)
    out = {}
    with torch.no_grad():
        for arch in ARCHS:
            base = tiny_model(arch)
            logits = {}
            for wire in COMBINE_WIRES:
                m = copy.deepcopy(base)
                expert_parallel(m, None, wire="bf16", comm="allgather", combine_wire=wire)
                logits[wire] = m(ids_BS).logits.float()
            out[arch] = logits
    return out


def models_table(world: int) -> list[dict]:
    per_rank = run_distributed(_model_worker, world, timeout=MODELS_TIMEOUT_S)
    rows = []
    for arch in per_rank[0]:
        ref = torch.cat(
            [pr[arch]["bf16"].reshape(-1, pr[arch]["bf16"].shape[-1]) for pr in per_rank]
        )
        row = {"model": arch}
        for wire in QUANTIZED:
            y = torch.cat([pr[arch][wire].reshape(-1, ref.shape[-1]) for pr in per_rank])
            agree = (y.argmax(-1) == ref.argmax(-1)).float().mean().item()
            row[wire] = (sqnr_db(ref, y), 100 * agree, ref.shape[0])
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=64, help="tokens per rank, DeepSeek layer")
    p.add_argument("--world-size", type=int, default=4, help="simulated ranks, DeepSeek layer")
    p.add_argument("--model-world-size", type=int, default=2, help="gloo ranks, tiny models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-models", action="store_true", help="only the DeepSeek layer")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    print(
        f"combine accuracy, {datetime.date.today()}, CPU, torch {torch.__version__}; "
        "SQNR in dB vs the unquantized combine (fp32 partials summed in fp32)"
    )
    print(
        f"\n(a) DeepSeek-R1 MoE layer, W={args.world_size} simulated ranks x "
        f"{args.tokens} tokens, heavy-tailed inputs"
    )
    print(
        "| dispatch | dispatch alone vs all-bf16 | bf16 partials | "
        + " | ".join(f"{w} combine" for w in QUANTIZED)
        + " |"
    )
    print("|---|---|---|" + "---|" * len(QUANTIZED))
    for r in deepseek_table(args.tokens, args.world_size, args.seed):
        vals = [f"{r['dispatch alone']:.1f}", f"{r['bf16 partials']:.1f}"] + [
            f"{r[w]:.1f}" for w in QUANTIZED
        ]
        print(f"| {r['dispatch']} | " + " | ".join(vals) + " |")
    if args.skip_models:
        return
    w = args.model_world_size
    print(
        f"\n(b) tiny transformers models, {w} gloo ranks (allgather, bf16 dispatch), "
        "logits SQNR dB / top-1 agreement % vs the bf16 combine"
    )
    print("| model | tokens | " + " | ".join(f"{w} combine" for w in QUANTIZED) + " |")
    print("|---|---|" + "---|" * len(QUANTIZED))
    for r in models_table(w):
        n = r[QUANTIZED[0]][2]
        cells = [f"{r[q][0]:.1f} / {r[q][1]:.1f}" for q in QUANTIZED]
        print(f"| {r['model']} | {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
