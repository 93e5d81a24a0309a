"""Compile the expert stage's fp8 kernels for Hopper (sm_90) without a GPU.

    PYTHONPATH=src python tools/compile_sm90.py

Builds ``block_grouped_gemm_kernel`` for every tile of ``BLOCK_FP8_TILES`` (also with
BLOCK_N=256, block and rowwise scales), ``small_grouped_gemm_kernel`` for every tile of
``SMALL_M_TILES`` and the stage kernels' block modes at DeepSeek-R1's hidden size, through
``triton.compile`` for ``GPUTarget("cuda", 90, 32)``, with the 16-byte
divisibility the launcher's arguments get (without it Triton does not pipeline the loads).
Prints per build the MMA instruction in the PTX, whether the PTX names e4m3 (for the GEMM:
e4m3 multiplied natively) and the shared memory; exits 1 if any build fails.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import moewire as mw
from moewire.formats._triton import decoder
from moewire.moe._kernels import stage as sk
from moewire.moe._kernels.gemm import small_grouped_gemm_kernel
from moewire.moe._kernels.gemm_block import block_grouped_gemm_kernel
from moewire.moe.block_fp8 import BLOCK_FP8_TILES
from moewire.moe.stage import SMALL_M_TILES

TARGET = GPUTarget("cuda", 90, 32)
WIRES = ("bf16", "fp8", "fp8_block128", "mxfp8", "nvfp4", "mxfp4")


def _build(fn, sig: dict, consts: dict, aligned: range, **options) -> str:
    sig = {**sig, **{k: "constexpr" for k in consts}}
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    try:
        k = triton.compile(src, target=TARGET, options=options)
    except Exception as err:  # report every failing build
        return f"ERR {type(err).__name__}: {str(err)[:600]}"
    ptx = k.asm["ptx"]
    mma = "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "no mma")
    return f"OK  {mma}, e4m3 in PTX: {'e4m3' in ptx}, smem {k.metadata.shared} B"


def _gemm() -> list[str]:
    sig = {"a_ptr": "*fp8e4nv", "sa_ptr": "*fp32", "w_ptr": "*fp8e4nv", "sw_ptr": "*fp32",
           "offs_ptr": "*i32", "out_ptr": "*bf16", "N": "i32", "C": "i32", "L": "i32",
           "MT": "i32"}  # fmt: skip
    out = []
    for bm, (bn, group_m, warps, stages, swap) in BLOCK_FP8_TILES.items():
        for bn2 in sorted({bn, 256}):
            for rowwise in (False, True):
                consts = dict(BLOCK_M=bm, BLOCK_N=bn2, BLOCK_K=128, GROUP_M=group_m, LP=64,
                              ROWWISE=rowwise, SWAP=swap, HW=True)  # fmt: skip
                res = _build(block_grouped_gemm_kernel, sig, consts, range(8),
                             num_warps=warps, num_stages=stages)  # fmt: skip
                out.append(f"{res}  gemm BM={bm} BN={bn2} warps={warps} stages={stages} "
                           f"swap={swap} rowwise={rowwise}")  # fmt: skip
    return out


def _small_gemm() -> list[str]:
    out = []
    for (kind, bm), (bn, bk, warps, stages, swap) in SMALL_M_TILES.items():
        op, scale = ("*u8", "*fp32") if kind == "fp8" else ("*bf16", "*bf16")
        sig = {"a_ptr": op, "sa_ptr": scale, "w_ptr": op, "sw_ptr": scale, "offs_ptr": "*i32",
               "out_ptr": "*bf16", "N": "i32", "C": "i32"}  # fmt: skip
        consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, FP8=kind == "fp8", HW=True, SWAP=swap)
        res = _build(small_grouped_gemm_kernel, sig, consts, range(8),
                     num_warps=warps, num_stages=stages)  # fmt: skip
        out.append(f"{res}  small_grouped_gemm {kind} BM={bm} BN={bn} BK={bk} swap={swap}")
    return out


def _stage() -> list[str]:
    out = []
    sig = {"rows_ptr": "*u8", "srt": "i32", "row_P_ptr": "*i32", "count_ptr": "*i32",
           "q_ptr": "*u8", "s_ptr": "*fp32", "H": "i32", "NB": "i32", "scale_off": "i32",
           "inv_g": "fp32"}  # fmt: skip
    for wire in WIRES:
        g = mw.nvfp4_global_scale(8.0) if wire == "nvfp4" else None
        d = decoder(mw.WireSpec(wire, 7168, global_scale=g), "cuda")
        consts = dict(KIND=d.kind, NBLK=d.nblk, BLKP=d.blkp, FULL=d.full, HW=True)
        res = _build(sk.gather_fp8_block_kernel, sig, consts, range(7), num_warps=d.num_warps)
        out.append(f"{res}  gather_fp8_block_kernel {wire} H=7168")
    sig = {"h_ptr": "*bf16", "count_ptr": "*i32", "out_ptr": "*u8", "s_ptr": "*fp32", "I": "i32"}
    for i in (2048, 384):
        block_i = 1 << (i - 1).bit_length()
        consts = dict(BLOCK_I=block_i, FP8=True, BLOCKS=True, HW=True)
        res = _build(sk.swiglu_kernel, sig, consts, range(4), num_warps=min(16, block_i // 256))
        out.append(f"{res}  swiglu_kernel FP8 BLOCKS I={i}")
    sig = {"rows_ptr": "*u8", "stride_r": "i32", "row_ptr": "*i32", "count_ptr": "*i32",
           "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "W": "i32"}  # fmt: skip
    for ns, rep in ((1, 1), (56, 1), (1, 56)):
        consts = dict(PAY_OFF=0, SCALE_OFF=7168, NS=ns, REP=rep, BLOCK=1024)
        res = _build(sk.gather_fp8_rows_kernel, sig, consts, range(7), num_warps=4)
        out.append(f"{res}  gather_fp8_rows_kernel NS={ns} REP={rep}")
    return out


def main() -> int:
    lines = _gemm() + _small_gemm() + _stage()
    print("\n".join(lines))
    return int(any(line.startswith("ERR") for line in lines))


if __name__ == "__main__":
    sys.exit(main())
