source .devrun/prefix.sh
(lscpu | grep -E "Model name|^CPU\(s\)"; uptime) > $R/host.txt 2>&1
echo "start $(date +%T)"
timeout 130 python3 -m hf_moe_accel bench --preset olmoe-1b-7b --batch 1 --new-tokens 128 --stock-passes 1 --compile-decode --json $R/olmoe_b1.json > $R/bench_olmoe.log 2>&1; echo "olmoe bench rc=$? $(date +%T)"
grep "olmoe-1b-7b | 1 " $R/bench_olmoe.log
timeout 260 python3 -m hf_moe_accel bench --preset qwen3-30b-a3b --batch 1 --new-tokens 128 --stock-passes 1 --compile-decode --json $R/qwen3_b1.json > $R/bench_qwen3.log 2>&1; echo "qwen3 bench rc=$? $(date +%T)"
grep "qwen3-30b-a3b | 1 " $R/bench_qwen3.log
timeout 150 python -m pytest -q -m gpu tests/test_graphs.py tests/test_processors.py > $R/gpu_tests.log 2>&1; echo "tests rc=$? $(date +%T)"; tail -2 $R/gpu_tests.log
kill %1 2>/dev/null; cd $R && tar czf all.tgz *.json smi.csv && rm -f *.json smi.csv
