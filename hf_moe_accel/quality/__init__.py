"""Fewer activated experts at run time: the `top_k` and `expert_threshold` options of accelerate().
Their quality cost is measured by `hf-moe-accel eval` (bench/quality.py)."""
