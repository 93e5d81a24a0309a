"""The host-sync-free expert stage (``moe/stage.py``): the device plan, the fused kernels
against their torch functions (bitwise where the step is exact), the stage against the
``loop`` oracles.

Tiers: CPU torch; the Triton kernels under ``TRITON_INTERPRET=1`` on CPU (on the GPU where
there is one); ``gpu``: the whole stage on CUDA, including under
``torch.cuda.set_sync_debug_mode("error")``.

Shape legend: ``N`` received rows, ``K`` top-k, ``P = N*K`` pairs, ``L`` local experts,
``H`` hidden, ``I`` intermediate.
"""

from __future__ import annotations

import pytest
import torch

import moewire as mw
from moewire.moe import stage
from moewire.moe.experts import LocalExperts
from moewire.testing.data import sqnr_db
from triton_env import import_kernels

_CUDA = torch.cuda.is_available()
import_kernels(
    "moewire.formats._triton",
    "moewire.moe._kernels.gemm",
    "moewire.moe._kernels.routing",
    "moewire.moe._kernels.stage",
)

DEV = torch.device("cuda" if _CUDA else "cpu")
H, I, E, K = 256, 64, 8, 3
WIRES = ("bf16", "fp8", "fp8_block128", "mxfp8", "nvfp4", "mxfp4")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical where not NaN (so +0 != -0), NaN exactly where the other is NaN (the
    payload of a dequantized NaN is not part of any format's contract)."""
    an, bn = torch.isnan(a), torch.isnan(b)
    bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(an, bn) and torch.equal(a.view(bits)[~an], b.view(bits)[~bn])


def _spec(wire: str, h: int = H) -> mw.WireSpec:
    g = mw.nvfp4_global_scale(8.0) if wire == "nvfp4" else None
    return mw.WireSpec(wire, h, global_scale=g)


def _ids(n: int, k: int, e: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)]).to(torch.int32)


def _rows(wire: str, n: int, seed: int, h: int = H) -> tuple[mw.WireSpec, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, h, generator=g) * torch.rand(n, 1, generator=g) * 4).bfloat16()
    if n > 2:
        x[1, 5] = float("nan")  # a non-finite row decodes to NaN on every path
        x[2] = 0.0
    spec = _spec(wire, h)
    return spec, spec.pack(x.to(DEV))


def test_plan_device_matches_a_python_sort():
    ids = _ids(7, K, E, 0)
    ids[3, 1] = -5  # invalid ids select nothing
    ids[4, 0] = 99
    plan = stage.plan_device(ids, first_expert=2, num_local=4)
    pairs = [(int(ids[n, k]) - 2, n, k) for n in range(7) for k in range(K)]
    local = sorted(((e, n * K + k) for e, n, k in pairs if 0 <= e < 4), key=lambda t: t[0])
    assert plan.num_pairs == 7 * K
    assert plan.row_P[: len(local)].tolist() == [p // K for _, p in local]
    ends = [sum(1 for e, _ in local if e <= j) for j in range(4)]
    assert plan.offsets_L.tolist() == ends and plan.count_1.tolist() == [len(local)]
    inv = {p: i for i, (_, p) in enumerate(local)}
    assert plan.inv_NK.reshape(-1).tolist() == [inv.get(p, -1) for p in range(7 * K)]


@pytest.mark.parametrize(
    ("n", "k", "e", "first", "local"),
    [
        (7, 3, 8, 2, 4),
        (1, 8, 64, 0, 64),
        (300, 8, 64, 16, 16),
        (520, 8, 32, 0, 32),  # over _PLAN_SMALL_P pairs: 64 pairs per program
        (50, 2, 256, 0, 256),
        (3, 1, 4, 3, 1),
    ],
)
def test_plan_kernel_bitwise(n, k, e, first, local):
    """``plan_kernel`` against ``plan_device``'s torch ops, every field, on random ids with
    other ranks' experts, invalid ids (-1 padding, out of range, huge int64) and int32 or
    int64 ids."""
    g = torch.Generator().manual_seed(n * 31 + k)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    ids[0, 0] = -1
    if n > 2:
        ids[1, -1] = e + 7
        ids[2, 0] = (1 << 40) + first  # truncated to int32 as the torch ops do
    # padded batches: rows n per rank (3 ranks where n divides), some ranks partly padding
    w = 3 if n % 3 == 0 else 1
    valid_W = torch.tensor([n // w, n // (2 * w), 0][:w], dtype=torch.int32)
    for dtype in (torch.int64, torch.int32):
        if dtype == torch.int32 and n > 2:
            ids[2, 0] = first
        for valid in (None, (valid_W, n // w)):
            ref = stage.plan_device(ids.to(dtype), first, local, e, backend="torch", valid=valid)
            dev_valid = None if valid is None else (valid_W.to(DEV), n // w)
            got = stage.plan_device(
                ids.to(dtype).to(DEV), first, local, e, backend="triton", valid=dev_valid
            )
            for name in ("row_P", "offsets_L", "count_1", "inv_NK"):
                a, b = getattr(got, name).cpu(), getattr(ref, name)
                assert a.dtype == b.dtype and torch.equal(a, b), (name, valid, a, b)
            assert got.rows_per_expert == ref.rows_per_expert


def test_unpermute_torch_is_the_k_order_sum():
    n, p = 6, 6 * K
    g = torch.Generator().manual_seed(3)
    ids = _ids(n, K, E, 1)
    plan = stage.plan_device(ids, first_expert=0, num_local=5)
    y = torch.randn(p, H, generator=g).bfloat16()
    w = torch.rand(n, K, generator=g)
    out = stage.unpermute_torch(y, plan, w, torch.float32)
    for r in range(n):
        acc = torch.zeros(H)
        for k in range(K):
            if int(plan.inv_NK[r, k]) >= 0:
                acc = acc + y[int(plan.inv_NK[r, k])].float() * w[r, k]
        assert torch.equal(out[r], acc)


@pytest.mark.parametrize("wire", WIRES)
def test_gather_kernels_bitwise(wire):
    spec, rows = _rows(wire, 9, seed=11)
    plan = stage.plan_device(_ids(9, K, E, 2).to(DEV), first_expert=0, num_local=6)
    count = int(plan.count_1)
    a_ref = stage.gather_bf16(spec, rows, plan, backend="torch")
    a = stage.gather_bf16(spec, rows, plan, backend="triton")
    assert _same(a[:count], a_ref[:count])
    q_ref, s_ref = stage.gather_fp8(spec, rows, plan, backend="torch")
    q, s = stage.gather_fp8(spec, rows, plan, backend="triton")
    assert torch.equal(q[:count].view(torch.uint8), q_ref[:count].view(torch.uint8))
    assert torch.equal(s[:count].view(torch.int32), s_ref[:count].view(torch.int32))


@pytest.mark.parametrize("fp8", [False, True])
def test_swiglu_kernel(fp8):
    g = torch.Generator().manual_seed(5)
    plan = stage.plan_device(_ids(4, K, E, 3).to(DEV), first_expert=0, num_local=E)
    h = (torch.randn(plan.num_pairs, 2 * I, generator=g) * 3).bfloat16().to(DEV)
    y16, _ = stage.swiglu(h, plan, fp8=False, backend="triton")
    ref = stage.swiglu_torch(h)
    # silu's exp is the kernel's own: within one bf16 ulp of torch's, no more
    ulp = (ref.float().abs() * 2**-7).clamp(min=2**-126)
    assert ((y16.float() - ref.float()).abs() <= ulp).all()
    if fp8:  # the per-row quantization is the fp8 recipe, bit for bit
        q, s = stage.swiglu(h, plan, fp8=True, backend="triton")
        q_ref, s_ref = mw.WireSpec("fp8", I).quantize(y16.float())
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
        assert torch.equal(s.view(torch.int32), s_ref.reshape(-1).view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpermute_kernel_bitwise(dtype):
    g = torch.Generator().manual_seed(9)
    n = 7
    plan = stage.plan_device(_ids(n, K, E, 4).to(DEV), first_expert=0, num_local=5)
    y = torch.randn(plan.num_pairs, H, generator=g).bfloat16().to(DEV)
    w = torch.rand(n, K, generator=g).to(DEV)
    ref = stage.unpermute_torch(y, plan, w, dtype)
    out = stage.unpermute(y, plan, w, dtype, backend="triton")
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_small_grouped_gemm(fp8, swap, monkeypatch):
    """The small-M kernel (both tile orientations) against per-expert fp32 matmuls of the
    same (exact) operands."""
    g = torch.Generator().manual_seed(12)
    n_rows, l, c, n = 6, 5, 96, 80
    ids = _ids(n_rows, K, E, 7).to(DEV)
    plan = stage.plan_device(ids, first_expert=1, num_local=l)
    key = ("fp8" if fp8 else "bf16", stage.small_m_block(plan.rows_per_expert))
    monkeypatch.setitem(stage.SMALL_M_TILES, key, (*stage.SMALL_M_TILES[key][:4], swap))
    a = torch.randn(plan.num_pairs, c, generator=g).bfloat16().to(DEV)
    w = (torch.randn(l, n, c, generator=g) * c**-0.5).bfloat16().to(DEV)
    sa = sw = None
    if fp8:
        q = mw.WireSpec("fp8", c)
        a, sa = q.quantize(a.float())
        wq, sw = q.quantize(w.reshape(l * n, c).float())
        w, sa, sw = wq.reshape(l, n, c), sa.reshape(-1), sw.reshape(l, n)
    y = stage.grouped_gemm(a, w, plan, sa, sw, small=True)
    ends = plan.offsets_L.tolist()
    for e, (lo, hi) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        ref = a[lo:hi].float() @ w[e].float().t()
        if fp8:
            ref = (ref * sa[lo:hi, None]) * sw[e][None, :]
        # fp32 sums in another order, then one bf16 rounding (truncation in the interpreter)
        tol = 2**-7 * ref.abs() + 2**-12 * ref.abs().max()
        assert ((y[lo:hi].float() - ref).abs() <= tol).all(), e


def _weights(l: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(l, 2 * I, H, generator=g) * H**-0.5,
        torch.randn(l, H, I, generator=g) * I**-0.5,
    )


@pytest.mark.parametrize("wire", ["bf16", "nvfp4", "fp8"])
def test_stage_grouped_equals_loop_on_cpu(wire):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch has no _grouped_mm")
    spec, rows = _rows(wire, 10, seed=21)
    rows = rows.cpu()
    ids = _ids(10, K, E, 5)
    w = torch.rand(10, K)
    w13, w2 = _weights(4, 1)
    ex = LocalExperts(w13, w2, first_expert=4, fp8=False)
    loop = ex(spec, rows, ids, w, "loop")
    try:
        grouped = ex(spec, rows, ids, w, "grouped")
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"torch._grouped_mm does not run on this CPU build: {err}")
    assert _same(grouped, loop)
    ex8 = LocalExperts(w13, w2, first_expert=4, fp8=True)
    assert not hasattr(ex8, "w13_L2IH")  # fp8 experts keep no bf16 copy
    y8 = ex8(spec, rows, ids, w, "fp8_loop", torch.bfloat16)
    assert y8.dtype == torch.bfloat16 and y8.shape == (10, H)


@pytest.mark.gpu
@pytest.mark.parametrize("wire", WIRES)
def test_stage_on_gpu_without_host_sync(wire):
    """grouped vs loop and fp8 vs fp8_loop on CUDA; the stage itself never syncs."""
    spec, rows = _rows(wire, 64, seed=31)
    ids = _ids(64, K, E, 6).cuda()
    w = torch.rand(64, K).cuda()
    w13, w2 = _weights(E, 2)
    for fp8, fast, oracle in ((False, "grouped", "loop"), (True, "fp8", "fp8_loop")):
        ex = LocalExperts(w13.cuda(), w2.cuda(), first_expert=0, fp8=fp8)
        ref = ex(spec, rows, ids, w, oracle)
        ex(spec, rows, ids, w, fast)  # compile outside the sync check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = ex(spec, rows, ids, w, fast)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        good = torch.isfinite(ref).all(dim=1)
        err = (y - ref)[good].abs().max()
        scale = ref[good].abs().max()
        # the same operands, other GEMM kernels: fp32 accumulation-order differences, then
        # a bf16 rounding of each GEMM output (and for fp8 an e4m3 code of the SwiGLU output
        # that may flip with it): the bounds of test_moe_gpu
        bound, min_sqnr = (2**-6, 45) if fast == "grouped" else (2**-4, 35)
        assert err <= bound * scale, (wire, fast, float(err), float(scale))
        assert sqnr_db(ref[good], y[good]) >= min_sqnr, (wire, fast)
        assert torch.equal(torch.isfinite(y).all(dim=1), good)
        y2 = ex(spec, rows, ids, w, fast)
        assert _same(y, y2)  # deterministic
