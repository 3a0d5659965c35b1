source .devrun/prefix.sh
OLD=$PWD/.devrun/old
for v in new old; do
  if [ $v = old ]; then P=$OLD:$PYTHONPATH; S=$OLD/scripts; else P=$PWD:$PYTHONPATH; S=scripts; fi
  PYTHONPATH=$P timeout 110 python $S/profile_decode_step.py --preset olmoe-1b-7b --batch 1 --compile-decode --skip-variants --out $R/prof_olmoe_$v > $R/prof_olmoe_$v.log 2>&1
  echo "$v $(date +%T)"; grep -o '"step_ms": [0-9.]*, "replay_ms": [0-9.]*, "loop_overhead_ms": [0-9.-]*, "host_step_ms_replays_skipped": [0-9.]*' $R/prof_olmoe_$v.log | tail -1
done
rm -rf $R/prof_olmoe_new $R/prof_olmoe_old
