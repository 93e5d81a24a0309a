"""The routing kernel (``moe/_kernels/routing.py``) against ``route``'s torch reference,
bitwise, on fresh random logits and on the edges (ties, NaN, infinities, padded widths),
for both routers: under ``TRITON_INTERPRET=1`` on CPU, on the GPU where there is one."""

from __future__ import annotations

import pytest
import torch

from moewire.moe import MoEConfig
from moewire.moe.routing import _kernel_fits, route
from triton_env import import_kernels

_CUDA = torch.cuda.is_available()
import_kernels("moewire.moe._kernels.routing")

DEV = torch.device("cuda" if _CUDA else "cpu")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

CONFIGS = {
    "softmax-64-8": dict(num_experts=64, top_k=8),
    "softmax-60-6-renorm": dict(num_experts=60, top_k=6, renormalize=True),
    "softmax-8-2": dict(num_experts=8, top_k=2, renormalize=True),
    "softmax-128-1": dict(num_experts=128, top_k=1),
    "dsv3-256-8": dict(
        num_experts=256, top_k=8, router="deepseek_v3", renormalize=True, n_group=8,
        topk_group=4, routed_scaling_factor=2.5,
    ),
    "dsv3-64-8-nogroups": dict(num_experts=64, top_k=8, router="deepseek_v3", renormalize=True),
    "dsv3-64-6-g16": dict(
        num_experts=64, top_k=6, router="deepseek_v3", n_group=16, topk_group=3,
    ),
    "dsv3-48-4-g4-all": dict(
        num_experts=48, top_k=4, router="deepseek_v3", n_group=4, topk_group=4,
        renormalize=True,
    ),
}  # fmt: skip


def _config(name: str) -> MoEConfig:
    return MoEConfig(hidden=64, intermediate=32, **CONFIGS[name])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == torch.int64:
        return torch.equal(a, b)
    an, bn = torch.isnan(a), torch.isnan(b)
    return torch.equal(an, bn) and torch.equal(a.view(torch.int32)[~an], b.view(torch.int32)[~bn])


def _check(cfg: MoEConfig, logits: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    ref = route(cfg, logits.cpu(), None if bias is None else bias.cpu(), backend="torch")
    got = route(cfg, logits, bias, backend="triton")
    assert _same(got[0].cpu(), ref[0]), (got[0], ref[0])
    assert _same(got[1].cpu(), ref[1]), (got[1], ref[1])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_random_logits_bitwise(name):
    cfg = _config(name)
    assert _kernel_fits(cfg)
    g = torch.Generator().manual_seed(hash(name) % 1000)
    e = cfg.num_experts
    logits = torch.randn(37, e, generator=g) * 3
    bias = torch.randn(e, generator=g) * 0.1 if cfg.router == "deepseek_v3" else None
    _check(cfg, logits.to(DEV), None if bias is None else bias.to(DEV))
    # a strided view (the layer reads logits out of the received rows)
    wide = torch.randn(37, e + 5, generator=g).to(DEV)
    _check(cfg, wide[:, 2 : 2 + e], None if bias is None else bias.to(DEV))


@pytest.mark.parametrize("name", ["softmax-64-8", "softmax-60-6-renorm", "dsv3-256-8"])
def test_ties_and_extremes_bitwise(name):
    cfg = _config(name)
    e = cfg.num_experts
    g = torch.Generator().manual_seed(5)
    rows = [
        torch.zeros(e),  # every expert tied
        torch.full((e,), 3.0),
        torch.randint(-2, 3, (e,), generator=g).float(),  # many ties
        torch.randn(e, generator=g) * 200,  # exp over- and underflow
        torch.where(torch.arange(e) % 7 == 0, float("-inf"), torch.randn(e, generator=g)),
        torch.where(torch.arange(e) == 3, float("inf"), torch.randn(e, generator=g)),
        torch.where(torch.arange(e) % 5 == 1, float("nan"), torch.randn(e, generator=g)),
        torch.full((e,), float("nan")),
        torch.full((e,), float("-inf")),
        torch.randn(e, generator=g) * 1e-30,
    ]
    bias = None
    if cfg.router == "deepseek_v3":
        bias = torch.randint(-1, 2, (e,), generator=g).float() * 0.25
    _check(cfg, torch.stack(rows).to(DEV), None if bias is None else bias.to(DEV))


def test_kernel_fits_and_fallback():
    # a group limit over a non-power-of-two width is left to the torch ops
    cfg = MoEConfig(64, 32, 96, 4, router="deepseek_v3", n_group=3, topk_group=2)
    assert not _kernel_fits(cfg)
    logits = torch.randn(5, 96).to(DEV)
    a = route(cfg, logits, backend="triton")
    b = route(cfg, logits.cpu(), backend="torch")
    assert _same(a[0].cpu(), b[0]) and _same(a[1].cpu(), b[1])
    assert not _kernel_fits(MoEConfig(64, 32, 2048, 8))
