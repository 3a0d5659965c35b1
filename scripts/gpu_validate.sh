#!/bin/bash
# The GPU checks of a change, in one device call of at most ten minutes, results under $OUT.
#   bash scripts/gpu_validate.sh suite   # every -m gpu test, in three processes sharing the GPU
#   bash scripts/gpu_validate.sh soak    # scripts/soak_generate.py: both fixtures resident, qwen3 offloaded
#   bash scripts/gpu_validate.sh decode  # olmoe-1b-7b A/B: default options against compile_decode,
#                                        # prefill graphs on and off (TTFT at 128 and 2048 tokens)
# The three test processes split the files so that the large random presets (test_gpu.py,
# test_offload_gpu.py) run beside the small-fixture files; an 80 GB card holds one large preset at a
# time. Each stage stops itself before the device call's limit; a log per process says where.
set -u
source "$(dirname "$0")/gpu_env.sh"
OUT=${OUT:-/tmp/gpu_validate}
mkdir -p "$OUT"
stage=${1:-suite}

suite() {
  local pytest="timeout ${SUITE_SECONDS:-540} python -m pytest -v -m gpu -p no:cacheprovider --durations=15"
  $pytest tests/test_gpu.py tests/test_offload_gpu.py tests/test_placement.py tests/test_distributed.py \
    tests/test_shard_loading.py tests/test_routing_flips.py tests/test_examples.py tests/test_parallel_fp8.py \
    > "$OUT/suite_1.log" 2>&1 &
  $pytest tests/test_kernel_experts.py tests/test_kernel_fp8.py tests/test_fp8_experts.py tests/test_offload_fp8.py \
    tests/test_mxfp4_experts.py tests/test_decode_attention.py tests/test_decode_linear.py tests/test_pdl.py \
    tests/test_rmsnorm.py tests/test_topk.py > "$OUT/suite_2.log" 2>&1 &
  $pytest tests/test_graphs.py tests/test_prefill_graphs.py tests/test_concurrency_faults.py \
    tests/test_compile_decode.py tests/test_experts_by_address.py tests/test_offload_lossy.py \
    > "$OUT/suite_3.log" 2>&1 &
  wait
  for log in "$OUT"/suite_*.log; do echo "== $log"; tail -1 "$log"; grep -h "^FAILED\|^ERROR" "$log" | head -20; done
}

soak() {
  # The three soaks run side by side: each checks its own process's memory (torch.cuda.memory_allocated).
  local fixtures=${HF_MOE_ACCEL_FIXTURES:-../shared/fixtures} calls=${SOAK_CALLS:-500}
  local soak="timeout ${SOAK_SECONDS:-540} python scripts/soak_generate.py --calls $calls"
  $soak --model "$fixtures/tiny-qwen3-moe" --json "$OUT/soak_qwen3.json" > "$OUT/soak_qwen3.log" 2>&1 &
  $soak --model "$fixtures/tiny-mixtral" --json "$OUT/soak_mixtral.json" > "$OUT/soak_mixtral.log" 2>&1 &
  $soak --model "$fixtures/tiny-qwen3-moe" --gpu-memory 0.3 --json "$OUT/soak_offload.json" > "$OUT/soak_offload.log" 2>&1 &
  wait
  for log in "$OUT"/soak_*.log; do echo "== $log"; tail -3 "$log"; done
}

decode() {
  local bench="python -m hf_moe_accel bench --preset olmoe-1b-7b --batch 1,32 --prompt-len 128,2048 --new-tokens 64 --stock-passes 1"
  timeout 170 $bench --json "$OUT/olmoe_default.json" > "$OUT/olmoe_default.log" 2>&1; echo "default rc=$?"
  timeout 170 $bench --compile-decode --json "$OUT/olmoe_compile.json" > "$OUT/olmoe_compile.log" 2>&1; echo "compile rc=$?"
  HF_MOE_ACCEL_PREFILL_GRAPHS=0 timeout 150 $bench --stock default --json "$OUT/olmoe_no_prefill_graphs.json" \
    > "$OUT/olmoe_no_prefill_graphs.log" 2>&1; echo "no prefill graphs rc=$?"
  tail -15 "$OUT"/olmoe_*.log
}

case "$stage" in
  suite) suite ;;
  soak) soak ;;
  decode) decode ;;
  *) echo "usage: bash scripts/gpu_validate.sh suite|soak|decode" >&2; exit 2 ;;
esac
