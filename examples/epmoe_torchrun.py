"""The expert-parallel layer on several processes, against the unsharded layer.

    torchrun --nproc_per_node 2 examples/epmoe_torchrun.py

gloo on CPU, NCCL when every rank has a GPU. Each rank holds E/W experts and its own tokens
(a different number per rank); every wire format's output is compared with the one-process
layer (``comm="local"``, all experts, the same wire format) on the same tokens: only the
association of the fp32 sum over the top-k experts differs, so they agree to fp32 rounding
(usually bit for bit after the cast back to bf16).
"""

import os

import torch
import torch.distributed as dist

import moewire as mw


def main() -> None:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.device_count() > local_rank
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    cfg = mw.MoEConfig(
        hidden=512, intermediate=128, num_experts=16, top_k=4, router="softmax", renormalize=True
    )
    gen = torch.Generator().manual_seed(0)  # the same global weights on every rank
    w13 = (torch.randn(16, 2 * 128, 512, generator=gen) / 512**0.5).to(device)
    w2 = (torch.randn(16, 512, 128, generator=gen) / 128**0.5).to(device)
    gen.manual_seed(1 + rank)  # this rank's own tokens
    t = 5 + 3 * rank
    x = torch.randn(t, 512, generator=gen).to(device, torch.bfloat16)
    logits = torch.randn(t, 16, generator=gen).to(device)

    lines = []
    for wire in ("bf16", "fp8", "nvfp4"):
        g = mw.nvfp4_global_scale(8.0) if wire == "nvfp4" else None
        layer = mw.EPMoE(cfg, None, wire=wire, comm="allgather", global_scale=g)
        layer.load_experts(w13, w2)  # keeps this rank's 16/W experts
        ref = mw.EPMoE(cfg, wire=wire, comm="local", global_scale=g)
        ref.load_experts(w13, w2)  # all 16 experts in this process
        y, y_ref = layer(x, logits).float(), ref(x, logits).float()
        err = float((y - y_ref).abs().max() / y_ref.abs().max())
        lines.append(
            f"  wire={wire:<6} experts {layer.first_expert}-"
            f"{layer.first_expert + layer.num_local - 1}, output {tuple(y.shape)}, "
            f"max |sharded - unsharded| / max |unsharded| = {err:.1e}"
        )
        assert err < 1e-2, (wire, err)
    for r in range(world):  # print rank by rank
        if r == rank:
            print(f"rank {rank} of {world} ({device}, {t} tokens):", *lines, sep="\n", flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
