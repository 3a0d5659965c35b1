"""Decode steps as replayed CUDA graphs over a pooled static cache.

`generate()` calls the runner in place of the model for every decode step. The first step of a
given shape (batch, cache, inputs) is captured: a warm-up run on a side stream (Triton compiles,
cuBLAS workspaces), the cache's write positions rolled back, then the capture. Later steps copy
their inputs into the captured input buffers and replay. Anything else (a prefill chunk, a cache
the pool doesn't own) runs the model eagerly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .cache_pool import StaticCachePool

logger = logging.getLogger("hf_moe_accel")

# Captures a forward closure (which reads the captured input buffers) given a memory pool handle;
# returns (replay, the output the replays overwrite).
Capture = Callable[[Callable[[], object], object], tuple[Callable[[], None], object]]


def capture_cuda_graph(forward: Callable[[], object], pool: object) -> tuple[Callable[[], None], object]:
    """Capture `forward` in a CUDA graph sharing memory pool `pool`; returns (replay, its output)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = forward()
    return graph.replay, output


@dataclass
class GraphStats:
    captures: int = 0
    capture_seconds: float = 0.0
    # torch.cuda.memory_reserved() growth over the captures: the graphs' private memory pool.
    graph_memory_bytes: int = 0
    replays: int = 0
    eager_steps: int = 0
    failed_captures: dict[str, str] = field(default_factory=dict)


@dataclass
class _Step:
    replay: Callable[[], None]
    inputs: list  # captured input leaves: tensors are the buffers the graph reads
    output: object


def _signature(leaf: object) -> object:
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device)
    return ("value", leaf)


def _write_positions(cache) -> list[torch.Tensor]:
    return [layer.cumulative_length for layer in cache.layers]


class DecodeGraphs:
    """Callable standing in for `model(**inputs)` during decoding."""

    def __init__(self, model: nn.Module, pool: StaticCachePool, capture: Capture = capture_cuda_graph):
        self.model = model
        self.pool = pool
        self.capture = capture
        self.stats = GraphStats()
        self._steps: dict[tuple, _Step] = {}
        self._failed: set[tuple] = set()
        self._memory_pool = None
        self._warm_up_stream: torch.cuda.Stream | None = None

    def __call__(self, **kwargs):
        cache = kwargs.get("past_key_values")
        input_ids = kwargs.get("input_ids")
        if input_ids is None or input_ids.shape[-1] != 1 or not self.pool.owns(cache):
            self.stats.eager_steps += 1
            return self.model(**kwargs)
        inputs = {k: v for k, v in kwargs.items() if k != "past_key_values"}
        leaves, spec = tree_flatten(inputs)
        key = (id(cache), spec, tuple(_signature(leaf) for leaf in leaves))
        step = self._steps.get(key)
        if step is None and key not in self._failed:
            step = self._capture_step(key, cache, leaves, spec)
        if step is None:
            self.stats.eager_steps += 1
            return self.model(**kwargs)
        for buffer, leaf in zip(step.inputs, leaves):
            if isinstance(buffer, torch.Tensor):
                buffer.copy_(leaf)
        step.replay()
        self.stats.replays += 1
        # Outputs live in graph memory that the next replay overwrites: hand out copies.
        return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, step.output)

    def forget(self, cache) -> None:
        """Drop the graphs captured over `cache` (the pool evicted or released it)."""
        for key in [k for k in self._steps if k[0] == id(cache)]:
            del self._steps[key]
        self._failed = {k for k in self._failed if k[0] != id(cache)}

    def clear(self) -> None:
        self._steps.clear()
        self._failed.clear()

    def _capture_step(self, key: tuple, cache, leaves: list, spec) -> _Step | None:
        buffers = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]

        def forward():
            return self.model(past_key_values=cache, **tree_unflatten(buffers, spec))

        cuda = torch.cuda.is_available() and any(isinstance(b, torch.Tensor) and b.is_cuda for b in buffers)
        if cuda and self._memory_pool is None:
            self._memory_pool = torch.cuda.graph_pool_handle()
        start = time.perf_counter()
        positions = [p.clone() for p in _write_positions(cache)]

        def roll_back() -> None:
            # A run of the step writes this step's keys/values (the replay writes the same) and
            # advances the write positions: put those back so the replay starts where it should.
            for current, saved in zip(_write_positions(cache), positions):
                current.copy_(saved)

        try:
            self._warm_up(forward, cuda)
            roll_back()
            # Measured around the capture alone: what the graphs' private pool takes.
            memory_before = torch.cuda.memory_reserved() if cuda else 0
            replay, output = self.capture(forward, self._memory_pool)
            roll_back()  # a CUDA capture runs nothing; a backend that runs the forward to capture it does
        except Exception as error:  # a model whose decode step can't be captured: eager, never wrong
            roll_back()
            reason = f"{type(error).__name__}: {error}"
            self._failed.add(key)
            self.stats.failed_captures[reason] = reason
            logger.warning("hf_moe_accel: decode step could not be captured in a CUDA graph, running eagerly (%s)", reason)
            return None
        if cuda:
            torch.cuda.synchronize()
            self.stats.graph_memory_bytes += torch.cuda.memory_reserved() - memory_before
        self.stats.captures += 1
        self.stats.capture_seconds += time.perf_counter() - start
        step = _Step(replay=replay, inputs=buffers, output=output)
        self._steps[key] = step
        return step

    def _warm_up(self, forward: Callable[[], object], cuda: bool) -> None:
        if not cuda:
            forward()
            return
        # One side stream for every warm-up: cuBLAS keeps a workspace per stream for the life of
        # the process, so a new stream per capture would grow memory by that much each time.
        if self._warm_up_stream is None:
            self._warm_up_stream = torch.cuda.Stream()
        stream = self._warm_up_stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward()
        torch.cuda.current_stream().wait_stream(stream)
