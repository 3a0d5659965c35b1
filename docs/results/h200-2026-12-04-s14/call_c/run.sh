source .devrun/prefix.sh
(lscpu | grep -E "Model name|^CPU\(s\)"; uptime) > $R/host.txt 2>&1; cat $R/host.txt
timeout 250 python3 -m hf_moe_accel bench --preset olmoe-1b-7b --batch 1,32 --new-tokens 128 --stock-passes 1 --compile-decode --json $R/olmoe_b1_32.json > $R/bench_olmoe.log 2>&1; echo "olmoe bench rc=$? $(date +%T)"
grep -E "olmoe-1b-7b \| (1|32) " $R/bench_olmoe.log
timeout 300 python3 -m hf_moe_accel bench --preset qwen3-30b-a3b --batch 1 --new-tokens 128 --stock-passes 1 --compile-decode --json $R/qwen3_b1.json > $R/bench_qwen3.log 2>&1; echo "qwen3 bench rc=$? $(date +%T)"
grep "qwen3-30b-a3b | 1 " $R/bench_qwen3.log
