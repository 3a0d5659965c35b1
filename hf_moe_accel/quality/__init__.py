"""Fewer activated experts and what they cost: the `top_k` / `expert_threshold` options
(`selection`) and the quality measurements behind `hf-moe-accel eval`."""
