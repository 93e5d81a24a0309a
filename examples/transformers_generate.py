"""A tiny transformers MoE model made expert-parallel, generating on every rank.

    torchrun --nproc_per_node 2 examples/transformers_generate.py

Builds a small Qwen3-MoE with random weights from transformers' config classes (nothing is
downloaded; the same seed gives every rank the same weights), swaps its MoE blocks for
``EPMoE`` layers with ``expert_parallel`` (each rank keeps half of the experts, nvfp4 rows
on the wire), and generates on every rank with a different prompt, batch and output
length. ``moewire.integrations.in_step.generate`` keeps the ranks in step: a rank that is
done early keeps stepping the MoE layers with zero tokens until every rank is done. The
vocabulary is the 95 printable ASCII characters, so token ids print as text (random
weights: the text is noise; the point is that every rank gets its own, of its own length).
"""

import os

import torch
import torch.distributed as dist
import transformers

from moewire.integrations.in_step import generate
from moewire.integrations.transformers import expert_parallel

VOCAB = 95  # token i is chr(32 + i)


def tiny_qwen3_moe() -> torch.nn.Module:
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        moe_intermediate_size=32,
        intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).eval()


def encode(text: str) -> torch.Tensor:
    return torch.tensor([[min(max(ord(c) - 32, 0), VOCAB - 1) for c in text]])


def decode(ids: torch.Tensor) -> str:
    return "".join(chr(32 + int(i)) for i in ids)


def main() -> None:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.device_count() > local_rank
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    model = tiny_qwen3_moe().to(device)
    names = expert_parallel(model, None, wire="nvfp4", comm="allgather", global_scale=2688 / 30)
    prompt = ["Expert parallel", "MoE"][rank % 2] + " rank " + str(rank)
    new_tokens = 6 + 10 * rank  # a different output length per rank
    ids = encode(prompt).to(device)
    with torch.no_grad():
        out = generate(
            model, ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    text = decode(out[0, ids.shape[1] :])
    for r in range(world):  # print rank by rank
        if r == rank:
            if rank == 0:
                print(f"{len(names)} MoE blocks made expert-parallel: {names}")
            print(
                f"rank {rank}: prompt {prompt!r} ({ids.shape[1]} tokens) -> "
                f"{out.shape[1] - ids.shape[1]} new tokens {text!r}",
                flush=True,
            )
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
