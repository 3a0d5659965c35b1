source .devrun/prefix.sh
OLD=$PWD/.devrun/old
python -m pytest -q -m gpu tests/test_kernel_experts.py tests/test_experts_by_address.py tests/test_pdl.py > $R/gpu_tests.log 2>&1; tail -2 $R/gpu_tests.log
mkdir -p $R/cfg && cp hf_moe_accel/kernels/configs/NVIDIA_H200.json $R/cfg/
for shape in qwen3-30b-a3b olmoe-1b-7b; do
  timeout 150 python scripts/tune_moe_configs.py --shape $shape --tokens 1 --decode-only --out $R/cfg > $R/tune_$shape.log 2>&1
  tail -4 $R/tune_$shape.log
done
cp $R/cfg/NVIDIA_H200.json hf_moe_accel/kernels/configs/NVIDIA_H200.json
python -c "
import json; d=json.load(open('hf_moe_accel/kernels/configs/NVIDIA_H200.json'))
for k in ('E=128,N=768,K=2048,topk=8,dtype=bfloat16','E=64,N=1024,K=2048,topk=8,dtype=bfloat16'): print(k, d[k]['decode'])"
for v in new old; do
  if [ $v = old ]; then P=$OLD:$PYTHONPATH; S=$OLD/scripts; else P=$PWD:$PYTHONPATH; S=scripts; fi
  PYTHONPATH=$P python $S/bench_moe_layer.py --shapes qwen3-30b-a3b,olmoe-1b-7b --tokens 1 --json $R/layer_$v.json > $R/layer_$v.log 2>&1
  echo "layer $v"; grep -E "^\| (qwen3|olmoe)" $R/layer_$v.log | cut -c1-200
done
for v in new old; do
  if [ $v = old ]; then P=$OLD:$PYTHONPATH; S=$OLD/scripts; else P=$PWD:$PYTHONPATH; S=scripts; fi
  for preset in qwen3-30b-a3b olmoe-1b-7b; do
    PYTHONPATH=$P python $S/profile_decode_step.py --preset $preset --batch 1 --compile-decode --skip-variants --kernels --out $R/prof_${preset}_$v > $R/prof_${preset}_$v.log 2>&1
    echo "$v $preset"; grep -o '"step_ms": [0-9.]*, "replay_ms": [0-9.]*' $R/prof_${preset}_$v.log | tail -1; grep "_decode_down_kernel <-" $R/prof_${preset}_$v.log | head -1
  done
done
cd $R && tar czf prof.tgz prof_* layer_* tune_* && rm -rf prof_* layer_* tune_*
