"""Expert offload to one GPU's memory budget: expert slots on the GPU, every expert in pinned host
memory, misses read in place (zero-copy), fetched or computed on the CPU, eviction, prefetch, stats."""
