"""A/B benchmark of hf_moe_accel against stock Transformers (see docs/BENCHMARKS.md)."""
