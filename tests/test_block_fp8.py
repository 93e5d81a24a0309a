"""Block-scaled fp8 experts (DeepSeek-V3's recipe): the grouped GEMM kernel against the fp32
oracle within the fp32 reassociation bound, the 1x128 activation quantization steps bit for
bit against the ``fp8_block128`` format's torch reference, and the expert stage ``fp8``
against ``fp8_loop`` with 128x128 block-scaled weights.

Tiers: the Triton kernels under ``TRITON_INTERPRET=1`` on CPU (on the GPU where there is
one); ``gpu``: the stage on CUDA, also under ``torch.cuda.set_sync_debug_mode("error")``.

Shape legend: ``P`` rows (sorted pairs), ``C`` input channels, ``N`` output channels,
``L`` local experts, ``H`` hidden, ``I`` intermediate, ``K`` top-k.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import moewire as mw
from moewire.moe import block_fp8, stage
from moewire.moe.experts import LocalExperts, quantize_fp8_weight
from moewire.moe.stage import DevicePlan
from moewire.moe.weights import quantize_block_weight
from moewire.testing.data import sqnr_db
from moewire.testing.spawn import run_distributed
from triton_env import import_kernels

_CUDA = torch.cuda.is_available()
import_kernels(
    "moewire.formats._triton",
    "moewire.moe._kernels.gemm",
    "moewire.moe._kernels.gemm_block",
    "moewire.moe._kernels.routing",
    "moewire.moe._kernels.stage",
)

DEV = torch.device("cuda" if _CUDA else "cpu")
# silu's exp(-g) overflows to inf for g < -88 under the interpreter (numpy warns): the
# kernel's result, -0, is the IEEE one
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
#: fp32's unit roundoff.
U32 = 2.0**-24
#: bf16's unit roundoff (8 significant bits): one rounding moves a value by at most this
#: fraction of it (bf16 has fp32's exponent range, so no subnormal step applies here).
U16 = 2.0**-8
#: The unit roundoff assumed for the tensor cores' fp8 block sums on the GPU (see
#: ``_oracle_and_bound``).
U_TC = 2.0**-13


def _plan(counts: list[int], extra: int, rows_per_expert: float) -> DevicePlan:
    """A plan with these local pairs per expert, then ``extra`` non-local pairs."""
    ends = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(DEV)
    p = sum(counts) + extra
    z = torch.zeros(p, dtype=torch.int32, device=DEV)
    return DevicePlan(z, ends, ends[-1:], z.view(p, 1), rows_per_expert)


def _e4m3(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random e4m3 codes over the whole finite range (subnormals, both signs, +-448)."""
    b = torch.randint(0, 256, shape, generator=g, dtype=torch.int32)
    b = torch.where((b & 0x7F) == 0x7F, 0, b)  # no NaN
    return b.to(torch.uint8).view(torch.float8_e4m3fn)


def _scales(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Positive fp32 scales over a few binades (as a / 448 of real data)."""
    return (torch.rand(shape, generator=g) + 0.5) * 2.0 ** torch.randint(
        -12, -4, shape, generator=g
    )


def _operands(p: int, c: int, l: int, n: int, rowwise: bool, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    a, w = _e4m3((p, c), g), _e4m3((l, n, c), g)
    if rowwise:
        sa, sw = _scales((p,), g), _scales((l, n), g)
    else:
        sa, sw = _scales((p, c // 128), g), _scales((l, -(-n // 128), c // 128), g)
    return tuple(t.to(DEV) for t in (a, sa, w, sw))


def _oracle_and_bound(a, sa, w, sw, ends: list[int], rowwise: bool) -> tuple:
    """The fp32 oracle per expert and the bound on any fp32 evaluation of the same sum.

    Both the kernel and the oracle compute ``y = sum_kb ((sum_i a_i w_i) * sa) * sw``:
    e4m3 products are exact in fp32, each K block's sum of 128 of them (all ``C`` of them
    with ``rowwise``) is rounded in some order, then two scale products and the ``C/128``
    block additions are rounded. By the standard bound each evaluation is within
    ``gamma_n * S`` of the exact sum, ``gamma_n = n*u / (1 - n*u)``, ``u = 2**-24``,
    ``n = 128 + 2 + C/128`` (``C + 2`` with ``rowwise``) and ``S`` the same sum over
    ``|a_i w_i|``, so the kernel and the oracle differ by at most ``2 * gamma_n * S``
    (FMA contraction only removes roundings). The kernel's bf16 output adds one rounding
    of at most ``2**-8`` of its fp32 value.

    On the GPU the tensor cores sum each K block of 128 e4m3 products with less than fp32
    precision (DeepSeek-V3 report, section 3.3.2: about 14 bits kept, hence DeepGEMM's and
    this kernel's fp32 promotion every 128 channels, also in ``ROWWISE`` mode), so there
    the kernel's in-block sum is bounded with ``u = 2**-13`` instead."""
    c = a.shape[1]
    n_ops = (c + 2) if rowwise else (128 + 2 + c // 128)
    gamma = n_ops * U32 / (1 - n_ops * U32)
    # the kernel's in-block sums on the GPU: 128 hardware additions (on top of the above)
    tc = 128 * U_TC / (1 - 128 * U_TC) if a.is_cuda else 0.0
    ref = torch.zeros(a.shape[0], w.shape[1], dtype=torch.float64)
    mag = torch.zeros_like(ref)
    for e, (lo, hi) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        if hi > lo:
            ref[lo:hi] = block_fp8.scaled_mm(a[lo:hi], sa[lo:hi], w[e], sw[e]).double().cpu()
            abs_a = a[lo:hi].float().abs().to(torch.float8_e4m3fn)
            abs_w = w[e].float().abs().to(torch.float8_e4m3fn)
            mag[lo:hi] = block_fp8.scaled_mm(abs_a, sa[lo:hi], abs_w, sw[e]).double().cpu()
    err = (2 * gamma + tc) * mag / (1 - gamma)  # ``mag``, an fp32 sum: S <= mag / (1 - gamma)
    return ref, U16 * (ref.abs() + err) + err


_COUNTS = [
    ([0, 37, 5, 130], 7),  # an empty expert first, one group larger than BLOCK_M
    ([0, 0, 200, 0], 0),  # every pair in one expert
    ([3, 3, 0, 3], 5),  # few rows per expert, non-local pairs after them
    ([0, 0, 0, 0], 9),  # no local pair: nothing is written
]


@pytest.mark.parametrize(("block_m", "n"), [(16, 256), (64, 200), (128, 384)])
@pytest.mark.parametrize("rowwise", [False, True])
@pytest.mark.parametrize(("counts", "extra"), _COUNTS)
def test_block_gemm_kernel(counts, extra, rowwise, block_m, n):
    """Both scale modes, the small-M (transposed) and prefill tiles, column tiles past N
    and partial weight-scale blocks (N=200), against the oracle within the bound of
    :func:`_oracle_and_bound`; rows past the local pairs keep their bytes."""
    l, c = len(counts), 256
    p = sum(counts) + extra
    plan = _plan(counts, extra, rows_per_expert=max(1.0, p / l))
    a, sa, w, sw = _operands(p, c, l, n, rowwise, seed=sum(counts) + n + block_m)
    sentinel = torch.full((p, n), float("nan"), dtype=torch.bfloat16, device=DEV)
    out = sentinel.clone()
    y = block_fp8.block_gemm(a, sa, w, sw, plan, rowwise=rowwise, block_m=block_m, out=out,
                             backend="triton")  # fmt: skip
    assert y is out
    local = sum(counts)
    assert torch.equal(y[local:].view(torch.int16), sentinel[local:].view(torch.int16))
    ref, tol = _oracle_and_bound(a, sa, w, sw, plan.offsets_L.tolist(), rowwise)
    diff = (y[:local].double().cpu() - ref[:local]).abs()
    assert (diff <= tol[:local]).all(), float((diff - tol[:local]).max())
    again = block_fp8.block_gemm(a, sa, w, sw, plan, rowwise=rowwise, block_m=block_m,
                                 backend="triton")  # fmt: skip
    assert torch.equal(again[:local].view(torch.int16), y[:local].view(torch.int16))


def test_block_gemm_wide_column_tile(monkeypatch):
    """BLOCK_N=256: two weight-scale blocks per tile, loaded per column."""
    monkeypatch.setitem(block_fp8.BLOCK_FP8_TILES, 128, (256, 2, 8, 3, False))
    counts, extra, n, c = [40, 0, 150], 3, 384, 384
    plan = _plan(counts, extra, rows_per_expert=64.0)
    a, sa, w, sw = _operands(sum(counts) + extra, c, 3, n, False, seed=5)
    y = block_fp8.block_gemm(a, sa, w, sw, plan, block_m=128, backend="triton")
    ref, tol = _oracle_and_bound(a, sa, w, sw, plan.offsets_L.tolist(), False)
    local = sum(counts)
    assert ((y[:local].double().cpu() - ref[:local]).abs() <= tol[:local]).all()


def test_block_gemm_picks_tiles_by_rows_per_expert():
    assert [block_fp8.block_m_for(r) for r in (0.5, 8, 16, 32, 33, 4096)] == [
        16, 16, 32, 64, 128, 128,
    ]  # fmt: skip
    assert set(block_fp8.BLOCK_FP8_TILES) == {16, 32, 64, 128}


def test_block_gemm_checks_its_operands():
    a, sa, w, sw = _operands(8, 256, 2, 128, False, seed=1)
    plan = _plan([4, 4], 0, 4.0)
    with pytest.raises(ValueError, match=r"scales must be \[8, 2\]"):
        block_fp8.block_gemm(a, sa[:, :1], w, sw, plan)
    with pytest.raises(ValueError, match="multiple of 128"):
        block_fp8.block_gemm(a[:, :200], sa, w[:, :, :200], sw, plan)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        block_fp8.block_gemm(a.float(), sa, w, sw, plan)
    with pytest.raises(TypeError, match=r"sa must be contiguous torch\.float32"):
        block_fp8.block_gemm(a, sa.t().contiguous().t(), w, sw, plan)


def test_block_gemm_torch_backend_writes_local_rows_only():
    a, sa, w, sw = _operands(10, 128, 2, 128, False, seed=2)
    plan = _plan([3, 4], 3, 4.0)
    out = torch.full((10, 128), float("nan"), dtype=torch.bfloat16, device=DEV)
    block_fp8.block_gemm(a, sa, w, sw, plan, out=out, backend="torch")
    assert torch.isnan(out[7:]).all() and not torch.isnan(out[:7]).any()
    ref, _ = _oracle_and_bound(a, sa, w, sw, [3, 7], False)
    assert torch.equal(out[:7].cpu(), ref[:7].float().bfloat16())


WIRES = ("bf16", "fp8", "fp8_block128", "mxfp8", "nvfp4", "mxfp4")


def _ids(n: int, k: int, e: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)]).to(torch.int32)


def _rows(wire: str, n: int, h: int, seed: int) -> tuple[mw.WireSpec, torch.Tensor]:
    """Wire rows of fresh random tokens (a NaN in row 1, row 2 all zeros)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, h, generator=g) * torch.rand(n, 1, generator=g) * 4).bfloat16()
    x[:, :128] *= 64  # blocks of one row far apart in magnitude
    x[1, 5] = float("nan")
    x[2] = 0.0
    spec = mw.WireSpec(
        wire, h, global_scale=mw.nvfp4_global_scale(300.0) if wire == "nvfp4" else None
    )
    return spec, spec.pack(x.to(DEV))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = {1: torch.uint8, 4: torch.int32}[a.element_size()]
    return a.shape == b.shape and torch.equal(a.view(bits), b.view(bits))


@pytest.mark.parametrize("h", [256, 384])
@pytest.mark.parametrize("wire", WIRES)
def test_gather_fp8_block_bitwise(wire, h):
    """The block gather (kernel) against its torch reference, bit for bit: ``fp8_block128``
    rows as they are, ``fp8`` rows as they are with the row's scale for each 128-value
    block, every other format decoded and quantized per 128 values."""
    n, k, l = 9, 3, 6
    spec, rows = _rows(wire, n, h, seed=h + len(wire))
    plan = stage.plan_device(_ids(n, k, 8, seed=h).to(DEV), first_expert=0, num_local=l)
    count = int(plan.count_1)
    q_ref, s_ref = stage.gather_fp8(spec, rows, plan, backend="torch", block=True)
    q, s = stage.gather_fp8(spec, rows, plan, backend="triton", block=True)
    assert q_ref.shape == q.shape == (n * k, h) and s_ref.shape == s.shape == (n * k, h // 128)
    assert _same_bits(q[:count], q_ref[:count]) and _same_bits(s[:count], s_ref[:count])
    x = spec.dequantize(rows, torch.float32, backend="torch")[plan.row_P.long()]
    if wire in ("fp8_block128", "fp8"):  # payload and scales gathered, never requantized
        view = spec.unpack(rows)
        idx = plan.row_P.long()
        s_rows = view.scales[idx].expand(-1, h // 128)  # fp8: one scale per row, repeated
        assert _same_bits(q_ref, view.payload[idx]) and _same_bits(s_ref, s_rows.contiguous())
        deq = q_ref.float() * s_ref.repeat_interleave(128, 1)  # the rows' own values
        assert torch.equal(deq.nan_to_num(nan=7.0), x.nan_to_num(nan=7.0))
    else:  # the fp8_block128 recipe of the decoded values
        q2, s2 = mw.WireSpec("fp8_block128", h).quantize(x)
        assert _same_bits(q_ref, q2) and _same_bits(s_ref, s2)
    nan_pairs = (plan.row_P[:count] == 1).cpu()
    assert torch.isnan(s[:count].cpu()[nan_pairs, 0]).all()


@pytest.mark.parametrize("i", [128, 384])
def test_swiglu_block_quantization_bitwise(i):
    """SwiGLU + 1x128 quantization in one kernel: the ``fp8_block128`` recipe of the
    kernel's own bf16 SwiGLU values, bit for bit (silu's exp is the kernel's, within one
    bf16 ulp of torch's: ``test_expert_stage.test_swiglu_kernel``)."""
    g = torch.Generator().manual_seed(i)
    plan = stage.plan_device(_ids(5, 3, 8, seed=i).to(DEV), first_expert=0, num_local=8)
    h = (torch.randn(plan.num_pairs, 2 * i, generator=g) * 3).bfloat16()
    h[:, i + 128 : i + 256] *= 100  # up values: blocks of one row far apart in magnitude
    h[0, 3] = float("nan")
    h = h.to(DEV)
    y16, _ = stage.swiglu(h, plan, fp8=False, backend="triton")
    q, s = stage.swiglu(h, plan, fp8=True, block=True, backend="triton")
    q_ref, s_ref = mw.WireSpec("fp8_block128", i).quantize(y16.float())
    assert _same_bits(q, q_ref) and _same_bits(s, s_ref)
    q_t, s_t = stage.swiglu(h, plan, fp8=True, block=True, backend="torch")
    assert q_t.shape == q.shape and s_t.shape == s.shape == (plan.num_pairs, i // 128)


def _expert_weights(l: int, h: int, i: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(l, 2 * i, h, generator=g) * h**-0.5
    w2 = torch.randn(l, h, i, generator=g) * i**-0.5
    w13[:, :, :128] *= 8  # weight blocks of different scales
    return w13, w2


def _close(y: torch.Tensor, ref: torch.Tensor, what: object) -> None:
    """The stage against its oracle with other GEMM kernels (the criteria of
    ``test_expert_stage.test_stage_on_gpu_without_host_sync``): fp32 accumulation-order
    differences, a bf16 rounding of each GEMM output and an e4m3 code of the SwiGLU output
    that may flip with it; non-finite rows exactly where the oracle's are."""
    good = torch.isfinite(ref).all(dim=1)
    assert torch.equal(torch.isfinite(y).all(dim=1), good), what
    err = (y - ref)[good].abs().max()
    scale = ref[good].abs().max()
    assert err <= 2**-4 * scale, (what, float(err), float(scale))
    assert sqnr_db(ref[good], y[good]) >= 35, what


H, I, NE = 256, 128, 8


def _block_experts(seed: int, first: int = 2, local: int = 6) -> LocalExperts:
    w13, w2 = _expert_weights(local, H, I, seed)
    (q13, s13), (q2, s2) = quantize_block_weight(w13), quantize_block_weight(w2)
    ex = LocalExperts(q13.to(DEV), q2.to(DEV), first, fp8=True, w13_scale=s13.to(DEV),
                      w2_scale=s2.to(DEV), num_experts=NE)  # fmt: skip
    # kept as given: no bf16 copy, no requantization
    assert not hasattr(ex, "w13_L2IH") and not hasattr(ex, "w2_LHI")
    for got, given in ((ex.w13_fp8, q13), (ex.w2_fp8, q2), (ex.w13_scale, s13), (ex.w2_scale, s2)):
        assert _same_bits(got.cpu(), given)
    return ex


@pytest.mark.parametrize(
    ("wire", "n"), [("fp8_block128", 12), ("bf16", 12), ("nvfp4", 12), ("fp8", 12), ("fp8", 96)]
)
def test_block_experts_fp8_equals_fp8_loop(wire, n):
    """``experts="fp8"`` with 128x128 block-scaled weights (gather, block GEMM, SwiGLU +
    1x128 quantization, block GEMM, unpermute) against the ``fp8_loop`` oracle: the Triton
    kernels (small-M and prefill tiles), bitwise the same twice; the torch fallback
    (oracle math per expert) bitwise the oracle."""
    ex = _block_experts(seed=n)
    spec, rows = _rows(wire, n, H, seed=n + 1)
    ids = _ids(n, 3, NE, seed=n + 2).to(DEV)
    w = torch.rand(n, 3, generator=torch.Generator().manual_seed(n)).to(DEV)
    ref = ex(spec, rows, ids, w, "fp8_loop")
    y = ex(spec, rows, ids, w, "fp8", backend="triton")
    _close(y, ref, (wire, n))
    assert _same_bits(ex(spec, rows, ids, w, "fp8", backend="triton"), y)  # deterministic
    if not _CUDA:
        y_torch = ex(spec, rows, ids, w, "fp8", backend="torch")
        nan = torch.isnan(ref)
        assert torch.equal(torch.isnan(y_torch), nan) and torch.equal(y_torch[~nan], ref[~nan])


@pytest.mark.parametrize("blocked", ["w13", "w2"])
def test_mixed_scale_kinds(blocked):
    """One weight block-scaled, the other per output channel: each GEMM (and the
    quantization of its A operand) follows its weight's scales."""
    w13, w2 = _expert_weights(4, H, I, seed=3)
    q13, s13 = quantize_block_weight(w13) if blocked == "w13" else quantize_fp8_weight(w13)
    q2, s2 = quantize_block_weight(w2) if blocked == "w2" else quantize_fp8_weight(w2)
    ex = LocalExperts(*(t.to(DEV) for t in (q13, q2)), 0, fp8=True, w13_scale=s13.to(DEV),
                      w2_scale=s2.to(DEV), num_experts=NE)  # fmt: skip
    spec, rows = _rows("fp8_block128", 10, H, seed=4)
    ids = _ids(10, 3, NE, seed=5).to(DEV)
    w = torch.rand(10, 3, generator=torch.Generator().manual_seed(6)).to(DEV)
    ref = ex(spec, rows, ids, w, "fp8_loop")
    _close(ex(spec, rows, ids, w, "fp8", backend="triton"), ref, blocked)


def test_block_experts_need_multiples_of_128():
    w13, w2 = _expert_weights(2, 192, 128, seed=0)
    (q13, s13), (q2, s2) = quantize_block_weight(w13), quantize_block_weight(w2)
    with pytest.raises(ValueError, match=r"multiples of 128, got hidden=192, intermediate=128"):
        LocalExperts(q13, q2, 0, fp8=True, w13_scale=s13, w2_scale=s2)
    # the bf16 experts dequantize them at load, any hidden
    ex = LocalExperts(q13, q2, 0, fp8=False, w13_scale=s13, w2_scale=s2)
    assert ex.w13_L2IH.dtype == torch.bfloat16


def _layer(cfg: mw.MoEConfig, **kw) -> mw.EPMoE:
    return mw.EPMoE(cfg, comm="local", wire="fp8_block128", combine_dtype=torch.float32, **kw)


def test_load_experts_block_weights_on_fp8_experts():
    """``EPMoE.load_experts`` keeps block-scaled e4m3 weights as they are for fp8 experts;
    the layer's output is within fp8 activation noise of the bf16 experts that dequantize
    the same weights at load (so the scales are applied to the right blocks)."""
    cfg = mw.MoEConfig(hidden=H, intermediate=I, num_experts=NE, top_k=2)
    w13, w2 = _expert_weights(NE, H, I, seed=8)
    (q13, s13), (q2, s2) = quantize_block_weight(w13), quantize_block_weight(w2)
    fp8 = _layer(cfg, experts="fp8_loop")
    fp8.load_experts(q13, q2, w13_scale=s13, w2_scale=s2)
    ex = fp8.local_experts
    assert _same_bits(ex.w13_fp8, q13) and _same_bits(ex.w2_scale, s2)
    bf16 = _layer(cfg, experts="loop")
    bf16.load_experts(q13, q2, w13_scale=s13, w2_scale=s2)
    g = torch.Generator().manual_seed(9)
    x, logits = torch.randn(16, H, generator=g), torch.randn(16, NE, generator=g)
    assert sqnr_db(bf16(x, logits), fp8(x, logits)) >= 25
    bad = mw.MoEConfig(hidden=384, intermediate=64, num_experts=NE, top_k=2)
    w13, w2 = _expert_weights(NE, 384, 64, seed=1)
    (q13, s13), (q2, s2) = quantize_block_weight(w13), quantize_block_weight(w2)
    with pytest.raises(ValueError, match="intermediate=64"):
        _layer(bad, experts="fp8_loop").load_experts(q13, q2, w13_scale=s13, w2_scale=s2)


def _sharded_worker() -> dict:
    """Rank r of 2: block-scaled weights loaded whole and as this rank's shard."""
    rank = dist.get_rank()
    cfg = mw.MoEConfig(hidden=H, intermediate=I, num_experts=NE, top_k=1)
    w13, w2 = _expert_weights(NE, H, I, seed=8)
    (q13, s13), (q2, s2) = quantize_block_weight(w13), quantize_block_weight(w2)
    g = torch.Generator().manual_seed(10 + rank)
    x, logits = torch.randn(5 + rank, H, generator=g), torch.randn(5 + rank, NE, generator=g)
    out = {}
    for how in ("full", "shard"):
        layer = mw.EPMoE(cfg, None, comm="allgather", wire="fp8_block128", experts="fp8_loop",
                         combine_dtype=torch.float32)  # fmt: skip
        if how == "full":
            layer.load_experts(q13, q2, w13_scale=s13, w2_scale=s2)
        else:
            sl = slice(rank * 4, rank * 4 + 4)
            layer.load_local_experts(q13[sl], q2[sl], w13_scale=s13[sl], w2_scale=s2[sl])
        ex = layer.local_experts
        out[how, "kept"] = all(
            _same_bits(a, b[rank * 4 : rank * 4 + 4])
            for a, b in ((ex.w13_fp8, q13), (ex.w2_fp8, q2), (ex.w13_scale, s13), (ex.w2_scale, s2))
        )
        out[how] = layer(x, logits)
    return out


def test_load_experts_block_weights_sharded():
    """Two gloo ranks: the whole checkpoint and each rank's shard keep the same blocks and
    give the same bits; with one expert per token (the combine adds exact zeros) they equal
    the single-process layer bitwise."""
    results = run_distributed(_sharded_worker, 2, timeout=120)
    cfg = mw.MoEConfig(hidden=H, intermediate=I, num_experts=NE, top_k=1)
    w13, w2 = _expert_weights(NE, H, I, seed=8)
    (q13, s13), (q2, s2) = quantize_block_weight(w13), quantize_block_weight(w2)
    ref = _layer(cfg, experts="fp8_loop")
    ref.load_experts(q13, q2, w13_scale=s13, w2_scale=s2)
    for rank, res in enumerate(results):
        assert res["full", "kept"] and res["shard", "kept"]
        assert torch.equal(res["full"], res["shard"])
        g = torch.Generator().manual_seed(10 + rank)
        x, logits = torch.randn(5 + rank, H, generator=g), torch.randn(5 + rank, NE, generator=g)
        assert torch.equal(res["full"], ref(x, logits))


@pytest.mark.gpu
@pytest.mark.parametrize("wire", WIRES)
def test_block_stage_on_gpu_without_host_sync(wire):
    """The block-scaled stage on CUDA (both row tiles): ``fp8`` vs ``fp8_loop``, and the
    stage itself never syncs."""
    for n in (16, 512):
        ex = _block_experts(seed=n)
        spec, rows = _rows(wire, n, H, seed=n + 1)
        ids = _ids(n, 3, NE, seed=n + 2).cuda()
        w = torch.rand(n, 3, generator=torch.Generator().manual_seed(n)).cuda()
        ref = ex(spec, rows, ids, w, "fp8_loop")
        ex(spec, rows, ids, w, "fp8")  # compile outside the sync check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = ex(spec, rows, ids, w, "fp8")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        _close(y, ref, (wire, n))
        assert _same_bits(ex(spec, rows, ids, w, "fp8"), y)  # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("rows_per_expert", [4.0, 256.0])
def test_block_gemm_rowwise_matches_scaled_grouped_mm(rows_per_expert):
    """``ROWWISE`` mode against ``torch._scaled_grouped_mm`` on the same operands (the
    comparison the tuning will time): each within the GPU bound of
    :func:`_oracle_and_bound` of the fp32 oracle (torch's kernel promoting at least as
    often as every 128 channels), so within twice it of each other, bf16 roundings aside."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("torch._scaled_grouped_mm needs sm90+")
    counts = [0, 37, 5, 130] if rows_per_expert > 32 else [3, 0, 4, 2]
    a, sa, w, sw = _operands(sum(counts) + 16, 512, 4, 256, True, seed=3)
    a[sum(counts) :] = 0  # torch's GEMM may write the rows past the groups
    plan = _plan(counts, 16, rows_per_expert)
    y = block_fp8.block_gemm(a, sa, w, sw, plan, rowwise=True)
    y_t = torch._scaled_grouped_mm(a, w.transpose(-2, -1), sa, sw, offs=plan.offsets_L,
                                   out_dtype=torch.bfloat16)  # fmt: skip
    ref, tol = _oracle_and_bound(a, sa, w, sw, plan.offsets_L.tolist(), True)
    local = sum(counts)
    for got in (y, y_t):
        assert ((got[:local].double().cpu() - ref[:local]).abs() <= tol[:local]).all()
