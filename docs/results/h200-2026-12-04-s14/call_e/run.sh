source .devrun/prefix.sh
timeout 112 python3 -m hf_moe_accel bench --preset olmoe-1b-7b --batch 1 --new-tokens 128 --stock-passes 1 --compile-decode --json $R/olmoe_b1.json > $R/bench_olmoe_b1.log 2>&1; echo "olmoe bench rc=$? $(date +%T)"
grep "olmoe-1b-7b | 1 " $R/bench_olmoe_b1.log
