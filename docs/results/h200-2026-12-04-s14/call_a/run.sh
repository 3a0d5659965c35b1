source .devrun/prefix.sh
python -m pytest -q -m gpu tests/test_prefetch.py tests/test_kernel_experts.py tests/test_experts_by_address.py tests/test_pdl.py > $R/gpu_tests.log 2>&1; tail -2 $R/gpu_tests.log
for sw in on off; do
  HF_MOE_ACCEL_L2_PREFETCH=$sw python scripts/bench_moe_layer.py --shapes qwen3-30b-a3b,olmoe-1b-7b --tokens 1 --json $R/layer_$sw.json > $R/layer_$sw.log 2>&1
  echo "layer prefetch=$sw"; tail -12 $R/layer_$sw.log | cut -c1-220
done
for sw in on off on; do
  for preset in qwen3-30b-a3b olmoe-1b-7b; do
    HF_MOE_ACCEL_L2_PREFETCH=$sw python scripts/profile_decode_step.py --preset $preset --batch 1 --compile-decode --skip-variants --kernels --out $R/prof_${preset}_$sw > $R/prof_${preset}_$sw.log 2>&1
    echo "$sw $preset"; grep -o '"step_ms": [0-9.]*, "replay_ms": [0-9.]*' $R/prof_${preset}_$sw.log | tail -1
  done
done
cd $R && tar czf prof.tgz prof_* layer_*.json && rm -rf prof_*
