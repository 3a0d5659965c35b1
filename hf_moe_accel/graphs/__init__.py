"""CUDA-graph decode inside `generate()`: a static KV cache pool, captured decode steps, fallbacks."""

from .generate import disable_graph_decode, enable_graph_decode, graph_stats

__all__ = ["disable_graph_decode", "enable_graph_decode", "graph_stats"]
