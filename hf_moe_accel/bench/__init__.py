"""Measurements, the top layer beside cli/: A/B benchmarks against stock Transformers, offload benches,
calibration microbenchmarks, predicted-vs-measured plan checks and quality evaluation. May import api."""
