source .devrun/prefix.sh
OLD=$PWD/.devrun/old
(lscpu | grep -E "Model name|^CPU\(s\)"; uptime) > $R/host.txt 2>&1
echo "start $(date +%T)"
for v in new old; do
  if [ $v = old ]; then P=$OLD:$PYTHONPATH; S=$OLD/scripts; else P=$PWD:$PYTHONPATH; S=scripts; fi
  PYTHONPATH=$P timeout 80 python $S/bench_decode_attention.py --heads 32:4:128,16:16:128 --batch 1,8,32 --keys 256,1024,4096 --valid-frac 0.75 --out $R/attn_$v.json > $R/attn_$v.log 2>&1; echo "attn $v rc=$? $(date +%T)"
done
timeout 60 python -m pytest -q -m gpu tests/test_decode_attention.py > $R/gpu_tests_attn.log 2>&1; echo "tests rc=$?"; tail -1 $R/gpu_tests_attn.log
for v in new old; do
  if [ $v = old ]; then P=$OLD:$PYTHONPATH; S=$OLD/scripts; else P=$PWD:$PYTHONPATH; S=scripts; fi
  PYTHONPATH=$P timeout 100 python $S/profile_decode_step.py --preset qwen3-30b-a3b --batch 1 --compile-decode --skip-variants --out $R/prof_qwen3_$v > $R/prof_qwen3_$v.log 2>&1
  echo "prof $v rc=$? $(date +%T)"; grep -o '"step_ms": [0-9.]*, "replay_ms": [0-9.]*' $R/prof_qwen3_$v.log | tail -1
done
timeout 270 python3 -m hf_moe_accel bench --preset qwen3-30b-a3b --batch 1 --new-tokens 128 --stock-passes 1 --compile-decode --json $R/qwen3_b1.json > $R/bench_qwen3.log 2>&1; echo "qwen3 bench rc=$? $(date +%T)"
grep "qwen3-30b-a3b | 1 " $R/bench_qwen3.log
for v in new old; do grep "^|" $R/attn_$v.log | tail -18 | cut -c1-150; done
cd $R && tar czf prof.tgz prof_* && rm -rf prof_*
