#!/usr/bin/env bash
# Train the GPU-size model and run `moewire eval` on it, in one call of under 10 minutes on
# one H200 (the issue 17 table: 6 dispatch formats x 3 combine wires, >= 200k held-out tokens).
# Run from the repository root:
#
#   bash tools/gpu_eval.sh OUT          # GPU: NCCL, one rank under torchrun
#   bash tools/gpu_eval.sh OUT --cpu    # the same steps on CPU (gloo), small and short
#
# Writes OUT/env.txt, OUT/train.log, OUT/train_log.json (perplexity curve), OUT/eval.log,
# OUT/eval.json, OUT/eval.csv (and OUT/eval_dispatch.* if the full table failed and there
# was time left to rerun it with an unquantized combine). Installs transformers from .whl/ if that folder is there
# (the GPU machine has another transformers; moewire is tested with 5.24.0).
# Training stops at TRAIN_LIMIT seconds (default 300) even if its steps are not done (the log
# says so), so that the eval still fits the call.
set -u
out=${1:?usage: tools/gpu_eval.sh OUT [--cpu]}
mode=${2:-gpu}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
site=${SITE_DIR:-/tmp/moewire-site}
if ls .whl/*.whl >/dev/null 2>&1; then
  # one wheel at a time: a wheel built for another Python (cp312 on a 3.11 test box) is
  # skipped, and the import check below says whether what was needed is there
  for w in .whl/*.whl; do
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "$w" 2>/dev/null || echo "skipped $w (not installable for this Python)"
  done
  export PYTHONPATH="$PWD/src:$site"
else
  export PYTHONPATH="$PWD/src"
fi
model=${MODEL_DIR:-/tmp/moewire-eval-model}
rm -rf "$model"

if [ "$mode" = "--cpu" ]; then
  size=cpu device=cpu steps=${STEPS:-6} limit=${TRAIN_LIMIT:-120}
  eval_args=(--device cpu --tokens "${TOKENS:-2048}" --seq-len 128 --batch 8)
else
  size=gpu device=cuda steps=${STEPS:-} limit=${TRAIN_LIMIT:-300}
  eval_args=(--device cuda --tokens "${TOKENS:-262144}" --seq-len 256 --batch 64)
fi

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  $py -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
  git rev-parse HEAD 2>/dev/null || echo "commit: (no .git here)"
  date -u
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

echo "== train ($size, limit ${limit} s)"
start=$SECONDS
$py tools/train_moe.py --size "$size" --out "$model" --device "$device" \
  ${steps:+--steps "$steps"} --time-limit "$limit" >"$out/train.log" 2>&1
rc=$?
echo "== train: rc=$rc in $((SECONDS - start)) s"
grep -v "Writing model" "$out/train.log" | tail -n 25
cp "$model/train_log.json" "$out/" 2>/dev/null
[ $rc -eq 0 ] || exit $rc

run_eval() {  # run_eval NAME LIMIT_S COMBINE
  echo "== $1 (combine $3, limit $2 s)"
  local start=$SECONDS
  timeout "$2" $py -m torch.distributed.run --standalone --nproc_per_node 1 -m moewire eval \
    --model "$model" "${eval_args[@]}" --formats bf16,fp8,fp8_block128,mxfp8,nvfp4,mxfp4 \
    --combine "$3" --json "$out/$1.json" --csv "$out/$1.csv" >"$out/$1.log" 2>&1
  local rc=$?
  echo "== $1: rc=$rc in $((SECONDS - start)) s"
  grep -v "^\[eval\] batch" "$out/$1.log" | tail -n 40
  return $rc
}
# the whole call must end within 600 s: leave what is left, minus a margin, to the eval
left=$((${BUDGET_S:-585} - SECONDS))
run_eval eval "$left" bf16,fp8,nvfp4
rc=$?
left=$((${BUDGET_S:-585} - SECONDS))
if [ $rc -ne 0 ] && [ "$left" -gt 60 ]; then
  echo "== the full table failed; salvaging the dispatch formats with an unquantized combine"
  run_eval eval_dispatch "$left" bf16
fi
exit $rc
