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

import moewire as mw
from moewire.moe import block_fp8, stage
from moewire.moe.stage import DevicePlan
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
#: fp32's unit roundoff.
U32 = 2.0**-24
#: bf16's unit roundoff (8 significant bits): one rounding moves a value by at most this
#: fraction of it (bf16 has fp32's exponent range, so no subnormal step applies here).
U16 = 2.0**-8


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
    of at most ``2**-8`` of its fp32 value."""
    c = a.shape[1]
    n_ops = (c + 2) if rowwise else (128 + 2 + c // 128)
    gamma = n_ops * U32 / (1 - n_ops * U32)
    ref = torch.zeros(a.shape[0], w.shape[1], dtype=torch.float64)
    mag = torch.zeros_like(ref)
    for e, (lo, hi) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        if hi > lo:
            ref[lo:hi] = block_fp8.scaled_mm(a[lo:hi], sa[lo:hi], w[e], sw[e]).double().cpu()
            abs_a = a[lo:hi].float().abs().to(torch.float8_e4m3fn)
            abs_w = w[e].float().abs().to(torch.float8_e4m3fn)
            mag[lo:hi] = block_fp8.scaled_mm(abs_a, sa[lo:hi], abs_w, sw[e]).double().cpu()
    err = 2 * gamma * mag / (1 - gamma)  # ``mag`` is an fp32 sum too: S <= mag / (1 - gamma)
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
    rows as they are, every other format decoded and quantized per 128 values."""
    n, k, l = 9, 3, 6
    spec, rows = _rows(wire, n, h, seed=h + len(wire))
    plan = stage.plan_device(_ids(n, k, 8, seed=h).to(DEV), first_expert=0, num_local=l)
    count = int(plan.count_1)
    q_ref, s_ref = stage.gather_fp8(spec, rows, plan, backend="torch", block=True)
    q, s = stage.gather_fp8(spec, rows, plan, backend="triton", block=True)
    assert q_ref.shape == q.shape == (n * k, h) and s_ref.shape == s.shape == (n * k, h // 128)
    assert _same_bits(q[:count], q_ref[:count]) and _same_bits(s[:count], s_ref[:count])
    x = spec.dequantize(rows, torch.float32, backend="torch")[plan.row_P.long()]
    if wire == "fp8_block128":  # payload and scales gathered, never requantized
        view = spec.unpack(rows)
        idx = plan.row_P.long()
        assert _same_bits(q_ref, view.payload[idx]) and _same_bits(s_ref, view.scales[idx])
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
