"""CUDA-graph decode inside `generate()`: a static KV cache pool, captured decode steps, fallbacks."""

from .generate import (
    check_compile_decode,
    disable_graph_decode,
    enable_graph_decode,
    graph_stats,
)

__all__ = ["check_compile_decode", "disable_graph_decode", "enable_graph_decode", "graph_stats"]
