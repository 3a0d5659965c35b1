source .devrun/prefix.sh
echo "start $(date +%T)"
python3 .devrun/old/scripts/bench_decode_attention.py --heads 32:4:128,16:16:128 --batch 1 --keys 256,1024 --valid-frac 0.75 --out $R/attn_old.json > $R/attn_old.log 2>&1; echo "old rc=$? $(date +%T)"
timeout 330 python3 scripts/bench_decode_attention.py --sweep --heads 32:4:128,16:16:128 --batch 1 --keys 256,1024 --valid-frac 0.75 --out $R/attn_sweep.json > $R/attn_sweep.log 2>&1; echo "sweep rc=$? $(date +%T)"
timeout 120 python3 -m pytest -q -m gpu tests/test_decode_attention.py > $R/gpu_tests_attn.log 2>&1; echo "tests rc=$? $(date +%T)"; tail -2 $R/gpu_tests_attn.log
grep -v "^{" $R/attn_sweep.log | tail -12; tail -8 $R/attn_old.log
