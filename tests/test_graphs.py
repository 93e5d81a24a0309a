"""Padded batches and CUDA-graph capture of the layer (``moewire.graphs``).

CPU: padding rows (``valid_counts``) reach no expert and come back as zeros; the real rows
are the unpadded layer's. GPU (``gpu``): the captured layer replays bitwise equal to the
eager layer on the same padded batch, for bf16 and fp8 experts, ``comm="local"`` and a
1-rank NCCL group, for several real token counts, including 0.

Shape legend: ``T`` real tokens, ``M`` capacity, ``H`` hidden, ``E`` experts.
"""

from __future__ import annotations

import pytest
import torch

import moewire as mw
from test_moe import make_config, make_inputs, make_weights

M = 12


def _layer(device, **kw):
    cfg = make_config()
    w13, w2, _ = make_weights()
    layer = mw.EPMoE(cfg, comm="local", **kw)
    layer.load_experts(w13.to(device), w2.to(device))
    return layer


@pytest.mark.parametrize("routing", ["logits", "topk"])
def test_padding_rows_reach_no_expert(routing):
    layer = _layer("cpu", wire="mxfp8", routing=routing)
    x, logits = make_inputs(M, seed=3)
    t = 5
    valid = torch.tensor([t], dtype=torch.int32)
    y = layer(x, logits, counts=[M], valid_counts=valid)
    assert torch.equal(y[t:], torch.zeros_like(y[t:]))
    ref = layer(x[:t], logits[:t])
    assert torch.allclose(y[:t].float(), ref.float(), rtol=2**-7, atol=0)


def test_padding_errors():
    layer = _layer("cpu")
    x, logits = make_inputs(4)
    v = torch.tensor([2], dtype=torch.int32)
    with pytest.raises(ValueError, match="valid_counts needs counts"):
        layer(x, logits, valid_counts=v)
    with pytest.raises(ValueError, match=r"valid_counts must be an int tensor \[W=1\]"):
        layer(x, logits, counts=[4], valid_counts=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="contradicts this rank"):
        layer(x, logits, counts=[3])


def test_graphed_moe_needs_cuda_and_a_calibrated_layer():
    from moewire.graphs import GraphedMoE

    with pytest.raises(ValueError, match="needs the layer on CUDA"):
        GraphedMoE(_layer("cpu"), 8)
    with pytest.raises(ValueError, match="global scale is not calibrated yet"):
        GraphedMoE(_layer("cpu", wire="nvfp4"), 8)


def _check_replay(layer, max_tokens: int) -> None:
    from moewire.graphs import GraphedMoE

    g = GraphedMoE(layer, max_tokens)
    for t in (max_tokens, 5, 1, 0):
        x, logits = make_inputs(t, seed=10 + t)
        x, logits = x.cuda(), logits.cuda()
        y = g(x, logits, [t] * layer.world_size).clone()
        assert torch.equal(g.x_MH[:t].view(torch.int16), x.view(torch.int16))
        assert torch.equal(g.logits_ME[:t], logits)
        xp, lp = g.x_MH.clone(), g.logits_ME.clone()  # the padded batch the graph ran on
        ref = layer(xp, lp, counts=g.counts, valid_counts=g.valid_W.clone())[:t]
        assert torch.equal(y.view(torch.int16), ref.view(torch.int16)), t
        if t:  # the engine's path: tokens written into the buffers, nothing copied
            g.x_MH[:t].copy_(x)
            g.logits_ME[:t].copy_(logits)
            y2 = g(g.x_MH[:t], g.logits_ME[:t], [t] * layer.world_size)
            assert torch.equal(y2.view(torch.int16), y.view(torch.int16)), t
            eager = layer(x, logits)
            assert torch.allclose(y.float(), eager.float(), rtol=2**-6, atol=2**-10), t


@pytest.mark.gpu
@pytest.mark.parametrize("experts", ["grouped", "fp8"])
def test_graph_replay_bitwise_local(experts):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the grouped GEMMs need sm90+")
    _check_replay(_layer("cuda", wire="fp8", experts=experts), M)


@pytest.mark.gpu
def test_graph_steps_back_to_back_with_fresh_inputs():
    """Steps whose inputs live at new addresses every time, called without a sync between
    them: the graph's copy node reads each step's own sources (the table is rewritten only
    after the replay that read it), through the fallbacks too (strided x, bf16 logits,
    the buffers themselves). Every step is bitwise the eager layer on its zero-padded
    batch (padding rows reach no expert, so their content does not matter)."""
    from moewire.graphs import GraphedMoE

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the grouped GEMMs need sm90+")
    layer = _layer("cuda", wire="fp8", experts="fp8")
    g = GraphedMoE(layer, M)
    steps, outs = [], []
    for i, t in enumerate((M, 3, 7, 1, 7, 0, 5, 5)):
        x, logits = make_inputs(t, seed=40 + i)
        x, logits = x.cuda(), logits.cuda()
        if i == 4:  # strided activations: copied before the replay instead
            x = torch.cat([x, x], dim=1)[:, : x.shape[1]]
        if i == 6:  # bf16 logits: converted on the way in
            logits = logits.bfloat16()
        if i == 7:  # the buffers themselves
            g.x_MH[:t].copy_(x)
            g.logits_ME[:t].copy_(logits)
            x, logits = g.x_MH[:t], g.logits_ME[:t]
        steps.append((x.clone(), logits.float().clone()))
        outs.append(g(x, logits, [t]).clone())
        if i == 1:
            assert g._table_now == (x.data_ptr(), logits.data_ptr(), x.numel() // 2, logits.numel())
    torch.cuda.synchronize()
    for (x, logits), y in zip(steps, outs, strict=True):
        t = x.shape[0]
        xp = torch.zeros_like(g.x_MH)
        lp = torch.zeros_like(g.logits_ME)
        xp[:t], lp[:t] = x, logits
        valid = torch.tensor([t], dtype=torch.int32, device="cuda")
        ref = layer(xp, lp, counts=[M], valid_counts=valid)[:t]
        assert torch.equal(y.view(torch.int16), ref.view(torch.int16)), t


@pytest.mark.gpu
@pytest.mark.parametrize("routing", ["logits", "topk"])
def test_graph_replay_bitwise_nccl_one_rank(routing, tmp_path):
    import torch.distributed as dist

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the grouped GEMMs need sm90+")
    dist.init_process_group(
        "nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1,
        device_id=torch.device("cuda", 0),
    )  # fmt: skip
    try:
        cfg = make_config()
        w13, w2, _ = make_weights()
        g = mw.nvfp4_global_scale(8.0)
        layer = mw.EPMoE(cfg, None, wire="nvfp4", routing=routing, comm="allgather", global_scale=g)
        layer.load_experts(w13.cuda(), w2.cuda())
        _check_replay(layer, M)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("t", "h", "e", "off"), [(1, 8, 4, 0), (5, 2048, 64, 0), (3, 6, 3, 0),
                                                  (5, 2048, 64, 2)])  # fmt: skip
def test_copy_table_kernel(t, h, e, off):
    """The graph's copy node copies the words its table names (sources read at run time),
    striding over them with few programs, and leaves the rest of the buffers alone: 16-byte
    sources 16 bytes at a time, others (``off``: 4-byte aligned only; odd word counts) a
    word at a time."""
    from triton_env import CUDA, import_kernels

    import_kernels("moewire.moe._kernels.copy")
    from moewire.moe._kernels.copy import copy_table_kernel

    dev = "cuda" if CUDA else "cpu"
    g = torch.Generator().manual_seed(t * h + 1)
    big = torch.randn(t * h + off, generator=g).to(torch.bfloat16).to(dev)
    x = big[off:].view(t, h)
    lg = torch.randn(t, e, generator=g).to(dev)
    bx = torch.full((t + 2, h), 7.0, dtype=torch.bfloat16, device=dev)
    bl = torch.full((t + 2, e), -3.0, device=dev)
    ptrs = [x.data_ptr(), lg.data_ptr(), t * h // 2, t * e, bx.data_ptr(), bl.data_ptr()]
    table = torch.tensor(ptrs, dtype=torch.int64)
    if CUDA:
        table = table.pin_memory()  # as the graph's: read by the GPU in place
    copy_table_kernel[(2, 2)](table, bx, bl, BLOCK=16)
    assert torch.equal(bx[:t].view(torch.int16), x.view(torch.int16))
    assert torch.equal(bl[:t].view(torch.int32), lg.view(torch.int32))
    assert bool((bx[t:] == 7.0).all()) and bool((bl[t:] == -3.0).all())
