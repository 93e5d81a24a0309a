#!/usr/bin/env bash
# GPU validation (CI has no GPU): what a change must pass on a GPU machine before a GPU
# result is claimed. Run from the repository root:
#
#   bash tools/gpu_check.sh tests OUTDIR    # gpu tests, moewire check, multigpu tests, NCCL soak
#   bash tools/gpu_check.sh bench OUTDIR    # dispatch/combine/layer benchmarks on all GPUs
#   bash tools/gpu_check.sh one OUTDIR      # one GPU: gpu and kernel tests, the layer at
#                                           # world size 1 with --graph, dispatch at 64
#                                           # tokens, the block-scaled fp8 aids (about 5 min)
#
# Each step writes OUTDIR/<step>.log and is bounded by a timeout; the summary line of every
# step (rc, seconds, last lines) goes to stdout.
set -u
what=${1:?usage: tools/gpu_check.sh tests|bench|one OUTDIR}
out=${2:-gpu-check}
files=${BENCH_FILES:-$out}  # where --json/--plot go
mkdir -p "$out" "$files"
# Leave NVLink multicast off (shared machines); harmless elsewhere.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=src PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
ngpu=$($py -c "import torch; print(torch.cuda.device_count())")

step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - start)) s"
  tail -n 4 "$out/$name.log"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'nccl', torch.cuda.nccl.version())"
  git rev-parse HEAD 2>/dev/null || true
  date -u
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

case $what in
tests)
  step gpu_tests 600 $py -m pytest -q -m gpu tests
  step check 120 $py -m moewire check
  if [ "$ngpu" -ge 2 ]; then
    step multigpu 150 torchrun --standalone --nproc_per_node="$ngpu" -m pytest -q -m multigpu \
      tests/test_comm_multigpu.py
    step soak 150 torchrun --standalone --nproc_per_node="$ngpu" tests/test_soak.py \
      --device cuda --iters 200
  fi
  ;;
bench)
  step bench_comm 330 $py -m moewire bench dispatch combine --tokens 64 1024 8192 \
    --formats nvfp4 fp8 mxfp4 --combine-wires fp8 nvfp4 --json "$files/bench_comm.json" \
    --plot "$files/bench_comm.png"
  step bench_layer 200 $py -m moewire bench layer --tokens 1024 8192 \
    --json "$files/bench_layer.json"
  ;;
one)
  step gpu_tests 330 $py -m pytest -q -m gpu tests
  step kernel_tests 300 $py -m pytest -q tests/test_triton_kernels.py \
    tests/test_combine_kernels.py tests/test_expert_stage.py tests/test_routing_kernel.py \
    tests/test_launch.py tests/test_graphs.py tests/test_block_fp8.py
  step bench_layer 400 $py -m moewire bench layer --world-size 1 --experts 64 \
    --tokens 1 64 256 1024 8192 --graph --json "$files/bench_layer.json"
  step bench_dispatch 150 $py -m moewire bench dispatch --world-size 1 --tokens 64 \
    --formats nvfp4 fp8 --json "$files/bench_dispatch.json"
  step block_gemm 150 $py tools/block_gemm_bench.py
  step block_stage 200 $py tools/block_stage_bench.py
  ;;
*)
  echo "unknown: $what" >&2
  exit 2
  ;;
esac
