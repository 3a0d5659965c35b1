"""Decode steps as replayed CUDA graphs over a pooled static cache.

`generate()` calls the runner in place of the model for every decode step. The first step of a
given shape (batch, cache, inputs) is captured: a warm-up run on a side stream (Triton compiles,
cuBLAS workspaces), the cache's write positions rolled back, then the capture. Later steps copy
their inputs into the captured input buffers and replay. Anything else (a prefill chunk, a cache
the pool doesn't own) runs the model eagerly.

With a compile backend (`compile_decode`), the step captured is the model under torch.compile
(`dynamic=False`, default mode: the graph is ours to capture, not inductor's "reduce-overhead"), so
the attention blocks' small elementwise kernels come fused; the MoE kernels stay opaque custom ops
(`kernels.ops`). The warm-up run compiles it; a compile that fails captures the model itself.

Faults. A capture that fails leaves nothing behind: the cache's write positions are rolled back, and
a graph memory pool no graph uses any more is let go (the allocator frees it with its last graph, so
its handle can't serve another capture). A step that fails to capture runs eagerly: for good, unless
it ran out of GPU memory, which may pass, so that step is tried again in the next generate() call.
A KeyboardInterrupt (or any exception that isn't an `Exception`) is re-raised after the same undoing.
Threads: the model's calls take turns (`generate.py`); captures take turns across the process, and
a capture lets other threads keep using CUDA meanwhile (`capture_cuda_graph`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

from .cache_pool import StaticCachePool

logger = logging.getLogger("hf_moe_accel")

# Captures a forward closure (which reads the captured input buffers) given a memory pool handle;
# returns (replay, the output the replays overwrite).
Capture = Callable[[Callable[[], object], object], tuple[Callable[[], None], object]]
# The names the cache is passed under, to generate() and by it to the model: `cache` from
# transformers 5.24 on, the older two before it (still accepted there, with a deprecation warning).
CACHE_ARGUMENTS = ("cache", "past_key_values", "cache_params")
# A torch.compile backend: a name ("inductor", "aot_eager") or a callable.
CompileBackend = str | Callable
# (batch size, cache positions) -> why a decode step of that shape must run eagerly, or None.
StepBlocker = Callable[[int, int], str | None]

# Decode-step shapes (batch size x cache bucket x input layout) compiled per process before
# compile_decode stops compiling new ones. Each is one dynamo cache entry of the model's forward that
# stays for the life of the process (a new cache of a shape already compiled reuses its code, with no
# recompile); at dynamo's own default (8) the ninth shape would silently run uncompiled.
RECOMPILE_LIMIT = 64


# One capture at a time in the process, across models and threads: torch.cuda.graph() empties the
# allocator's cache as it starts, which the allocator refuses while another capture is under way, and
# dynamo's compile state (compile_decode's warm-up) is process-wide.
_CAPTURE_LOCK = threading.RLock()


def capture_cuda_graph(forward: Callable[[], object], pool: object) -> tuple[Callable[[], None], object]:
    """Capture `forward` in a CUDA graph sharing memory pool `pool`; returns (replay, its output).

    "thread_local": only this thread's calls that a capture forbids (a sync, a host copy) fail it.
    Under the default ("global") any thread's would, so a server's other threads moving their inputs
    to the GPU or reading results while one of them captures would fail that capture or their own call."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        output = forward()
    return graph.replay, output


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is a CUDA out-of-memory error or was raised while handling one (a capture that
    runs out of memory ends with the capture's own error, the out-of-memory error as its context)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, torch.OutOfMemoryError):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


@dataclass
class GraphStats:
    captures: int = 0
    # Warm-up and capture; with compile_decode, the compiling warm-up runs are in compile_seconds instead.
    capture_seconds: float = 0.0
    compiled_captures: int = 0  # of `captures`, the steps captured through torch.compile (compile_decode)
    # The first (compiling) run of each compiled step: dynamo's trace, inductor's codegen, one step.
    compile_seconds: float = 0.0
    # torch.cuda.memory_reserved() growth over the captures: the graphs' private memory pool.
    graph_memory_bytes: int = 0
    replays: int = 0
    eager_steps: int = 0
    deferred_stop_checks: int = 0  # served generate() calls whose stop checks ran one step late (stop_check.py)
    failed_captures: dict[str, str] = field(default_factory=dict)
    blocked_steps: dict[str, int] = field(default_factory=dict)  # eager steps a placement's step check refused, by reason
    failed_compiles: dict[str, str] = field(default_factory=dict)
    # Prefill forwards replayed as graphs (prefill.py), apart from the decode steps counted above; their
    # failed captures are in failed_captures as "prefill: <reason>", their memory in graph_memory_bytes.
    prefill_captures: int = 0
    prefill_capture_seconds: float = 0.0  # their warm-ups and captures
    prefill_replays: int = 0
    eager_prefills: int = 0  # prefills of served generate() calls that ran eagerly (prefill.py logs why, at debug level)

    def count_deferred_stop_check(self) -> None:
        self.deferred_stop_checks += 1

    def snapshot(self) -> dict:
        """The counters as a dict, each container copied whole: graph_stats() may read them while another
        thread's generate() call adds to them (a dict's copy is one step under the GIL; iterating it is not)."""
        return {name: copy.copy(value) for name, value in vars(self).items()}


@dataclass
class _Step:
    replay: Callable[[], None]
    inputs: list  # captured input leaves: tensors are the buffers the graph reads
    output: object
    tensor_inputs: list[int] = field(init=False)  # where in `inputs` the buffers are
    buffers: list[torch.Tensor] = field(init=False)  # those buffers, in that order
    copied_fields: tuple[str, ...] | None = field(init=False)  # see hand_out

    def __post_init__(self) -> None:
        self.tensor_inputs = [i for i, leaf in enumerate(self.inputs) if isinstance(leaf, torch.Tensor)]
        self.buffers = [self.inputs[i] for i in self.tensor_inputs]
        self.copied_fields = _fields_to_copy(self.output)

    def copy_inputs(self, leaves: list) -> None:
        # One foreach call: on CUDA one launch for the step's ids and positions instead of one each.
        if self.buffers:
            torch._foreach_copy_(self.buffers, [leaves[i] for i in self.tensor_inputs])

    def hand_out(self) -> object:
        """The replay's output for generate(). It lives in graph memory that the next replay overwrites.
        The logits are handed out as they are: generate() copies them (to float32) before its next call,
        in every release we support (the return-dict tests hold the scores and logits it keeps to the
        eager path's). Any other tensor (hidden states, attentions: generate() keeps those) is a copy.
        With nothing to copy, the same output object serves every replay: no per-step rebuild."""
        if self.copied_fields is None:
            return tree_map(_copy_tensor, self.output)
        if not self.copied_fields:
            return self.output
        fields = dict(self.output)
        fields.update({name: tree_map(_copy_tensor, fields[name]) for name in self.copied_fields})
        return type(self.output)(**fields)


def _copy_tensor(leaf: object) -> object:
    return leaf.clone() if isinstance(leaf, torch.Tensor) else leaf


def _fields_to_copy(output: object) -> tuple[str, ...] | None:
    """The fields of a step's output (a ModelOutput) that `_Step.hand_out` copies: those holding
    tensors, but the logits. None: not a mapping, every tensor is copied."""
    if not isinstance(output, Mapping):
        return None
    return tuple(name for name, value in output.items()
                 if name != "logits" and any(isinstance(leaf, torch.Tensor) for leaf in tree_leaves(value)))


def _signature(leaf: object) -> object:
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device)
    return ("value", leaf)


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]


def _write_positions(cache) -> list[torch.Tensor]:
    return [layer.cumulative_length for layer in cache.layers]


class DecodeGraphs:
    """Callable standing in for `model(**inputs)` during decoding."""

    def __init__(self, model: nn.Module, pool: StaticCachePool, capture: Capture = capture_cuda_graph,
                 compile_backend: CompileBackend | None = None, compile_options: dict | None = None,
                 step_blocker: StepBlocker | None = None,
                 before_replay: Callable[[], None] | None = None,
                 rehearsal: Callable[[], AbstractContextManager] | None = None):
        self.model = model
        self.step_blocker = step_blocker  # asked before every replay: a placement's state may change between steps
        self.before_replay = before_replay  # a placement's host work between steps (eager steps run the model's hooks)
        # Entered around the runs of a step that its replay repeats (warm-up, capture): a placement's
        # bookkeeping counts the step once (generate.GRAPH_REHEARSAL_ATTR).
        self.rehearsal = rehearsal or contextlib.nullcontext
        self.pool = pool
        self.capture = capture
        self.compile_backend = compile_backend  # None: capture the model itself
        self.compile_options = compile_options  # torch.compile's backend options (inductor config)
        self.stats = GraphStats()
        self._compiled_model: Callable | None = None
        self._steps: dict[tuple, _Step] = {}
        self._failed: set[tuple] = set()  # steps that never capture: they run eagerly
        self._out_of_memory: set[tuple] = set()  # steps that ran out of memory capturing: eager until the next call
        self._memory_pool = None
        self._warm_up_stream: torch.cuda.Stream | None = None

    # What a deep copy of the model starts without: captured graphs replay the memory (weights, caches,
    # buffers) of the model they were captured on, and a compiled model is bound to that model too.
    _NOT_COPIED = {"_steps": dict, "_failed": set, "_out_of_memory": set, "_memory_pool": lambda: None,
                   "_compiled_model": lambda: None, "_warm_up_stream": lambda: None, "stats": GraphStats}

    def __deepcopy__(self, memo: dict) -> DecodeGraphs:
        """A runner for the copied model that captures its own graphs."""
        copied = object.__new__(DecodeGraphs)
        memo[id(self)] = copied
        for name, value in self.__dict__.items():
            fresh = self._NOT_COPIED.get(name)
            copied.__dict__[name] = fresh() if fresh is not None else copy.deepcopy(value, memo)
        return copied

    def __call__(self, **kwargs):
        cache_name = next((name for name in CACHE_ARGUMENTS if name in kwargs), "past_key_values")
        cache = kwargs.get(cache_name)
        input_ids = kwargs.get("input_ids")
        if input_ids is None or input_ids.shape[-1] != 1 or not self.pool.owns(cache) or self._blocked(input_ids, cache):
            self.stats.eager_steps += 1
            return self.model(**kwargs)
        inputs = {k: v for k, v in kwargs.items() if k != cache_name}
        leaves, spec = tree_flatten(inputs)
        key = (id(cache), cache_name, spec, tuple(_signature(leaf) for leaf in leaves))
        step = self._steps.get(key)
        if step is None and key not in self._failed and key not in self._out_of_memory:
            step = self._capture_step(key, cache_name, cache, leaves, spec)
        if step is None:
            self.stats.eager_steps += 1
            return self.model(**kwargs)
        if self.before_replay is not None:
            self.before_replay()
        step.copy_inputs(leaves)
        step.replay()
        self.stats.replays += 1
        return step.hand_out()

    def _blocked(self, input_ids: torch.Tensor, cache) -> bool:
        if self.step_blocker is None:
            return False
        reason = self.step_blocker(input_ids.shape[0], max(layer.max_cache_len for layer in cache.layers))
        if reason is not None and reason not in self.stats.blocked_steps:
            logger.warning("hf_moe_accel: decode steps run eagerly: %s", reason)
        if reason is not None:
            self.stats.blocked_steps[reason] = self.stats.blocked_steps.get(reason, 0) + 1
        return reason is not None

    def start_call(self) -> None:
        """A new generate() call: steps that ran out of memory capturing may try again (memory may be free now)."""
        self._out_of_memory.clear()

    def forget(self, cache) -> None:
        """Drop the graphs captured over `cache` (the pool evicted or released it)."""
        for key in [k for k in self._steps if k[0] == id(cache)]:
            del self._steps[key]
        self._failed = {k for k in self._failed if k[0] != id(cache)}
        self._out_of_memory = {k for k in self._out_of_memory if k[0] != id(cache)}
        self._drop_pool_if_unused()

    def clear(self) -> None:
        self._steps.clear()
        self._failed.clear()
        self._out_of_memory.clear()
        self._drop_pool_if_unused()

    def graphs_held(self) -> int:
        """Captured steps held now (each keeps its graph and its output buffers)."""
        return len(self._steps)

    def caches_with_graphs(self) -> set[int]:
        """The ids of the caches the held graphs were captured over (each one a cache the pool holds)."""
        return {key[0] for key in list(self._steps)}  # list(): one step under the GIL, against a concurrent reader

    def _drop_pool_if_unused(self) -> None:
        # With its last graph gone, the allocator releases the private pool: a capture into the old
        # handle then fails an internal assert (a one-cache pool reaches this): take a new one.
        if not self._steps:
            self._memory_pool = None

    def _capture_step(self, key: tuple, cache_name: str, cache, leaves: list, spec) -> _Step | None:
        buffers = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        cuda = torch.cuda.is_available() and any(isinstance(b, torch.Tensor) and b.is_cuda for b in buffers)
        positions = [p.clone() for p in _write_positions(cache)]

        def roll_back() -> None:
            # A run of the step writes this step's keys/values (the replay writes the same) and
            # advances the write positions: put those back so the replay starts where it should.
            for current, saved in zip(_write_positions(cache), positions):
                current.copy_(saved)

        step = None
        compiled = self._compiled()
        if compiled is not None:
            try:
                with self._undone_on_error(roll_back):
                    step = self._capture_with(compiled, True, {cache_name: cache}, buffers, spec, cuda, roll_back)
            except Exception as error:  # never a wrong answer: the model itself is captured instead
                if not is_out_of_memory(error):  # memory may come back; a compile that fails fails again
                    self._stop_compiling(error)
        if step is None:
            try:
                with self._undone_on_error(roll_back):
                    step = self._capture_with(self.model, False, {cache_name: cache}, buffers, spec, cuda, roll_back)
            except Exception as error:  # a model whose decode step can't be captured: eager, never wrong
                self._capture_failed(key, error)
                return None
        self._steps[key] = step
        return step

    @contextlib.contextmanager
    def _undone_on_error(self, roll_back: Callable[[], None]) -> Iterator[None]:
        """On any error (KeyboardInterrupt too): the write positions rolled back and an unused graph
        memory pool let go, before the error goes on."""
        try:
            yield
        except BaseException:
            roll_back()
            self._drop_pool_if_unused()
            raise

    def _capture_failed(self, key: tuple, error: Exception) -> None:
        reason = f"{type(error).__name__}: {error}"
        self.stats.failed_captures[reason] = reason
        if is_out_of_memory(error):
            self._out_of_memory.add(key)
            logger.warning("hf_moe_accel: decode step ran out of GPU memory capturing its CUDA graph; it runs eagerly "
                           "in this generate() call and is captured again in the next (%s)", reason)
            return
        self._failed.add(key)
        logger.warning("hf_moe_accel: decode step could not be captured in a CUDA graph, running eagerly (%s)", reason)

    def _capture_with(self, call: Callable, compiled: bool, cache_argument: dict, buffers: list, spec, cuda: bool,
                      roll_back: Callable[[], None]) -> _Step:
        """Warm `call` up, then capture it over the input buffers; raises when either fails."""

        def forward():
            return call(**cache_argument, **tree_unflatten(buffers, spec))

        with _CAPTURE_LOCK:
            return self._warm_up_and_capture(forward, compiled, buffers, cuda, roll_back)

    def _warm_up_and_capture(self, forward: Callable[[], object], compiled: bool, buffers: list, cuda: bool,
                             roll_back: Callable[[], None]) -> _Step:
        start = time.perf_counter()
        compile_seconds = 0.0
        if compiled:
            # Fail loudly rather than run uncompiled: past the limit (or with errors suppressed) dynamo
            # would fall back to eager silently.
            limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
            with torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True, suppress_errors=False):
                self._warm_up(forward, cuda)
            if cuda:
                torch.cuda.synchronize()
            compile_seconds = time.perf_counter() - start
            start = time.perf_counter()
        else:
            self._warm_up(forward, cuda)
        roll_back()
        # Measured around the capture alone: what the graphs' private pool takes. torch.cuda.graph()
        # empties the allocator's cache as it starts: emptied here first, so that release (the warm-up's
        # freed blocks) isn't counted against the graphs.
        memory_before = 0
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            memory_before = torch.cuda.memory_reserved()
        if cuda and self._memory_pool is None:  # the graphs share one pool; a failed capture may have let it go
            self._memory_pool = torch.cuda.graph_pool_handle()
        # The compiled code is in dynamo's cache now: a recompile here (inside a capture) is an error.
        with torch.compiler.set_stance("fail_on_recompile") if compiled else contextlib.nullcontext(), self.rehearsal():
            replay, output = self.capture(forward, self._memory_pool)
        roll_back()  # a CUDA capture runs nothing; a backend that runs the forward to capture it does
        if cuda:
            torch.cuda.synchronize()
            self.stats.graph_memory_bytes += torch.cuda.memory_reserved() - memory_before
        self.stats.captures += 1
        self.stats.capture_seconds += time.perf_counter() - start
        if compiled:
            self.stats.compiled_captures += 1
            self.stats.compile_seconds += compile_seconds
        return _Step(replay=replay, inputs=buffers, output=output)

    def _compiled(self) -> Callable | None:
        """The torch.compile'd model to capture, or None (not asked for, or a compile failed)."""
        if self.compile_backend is None or self.stats.failed_compiles:
            return None
        if self._compiled_model is None:
            self._compiled_model = torch.compile(self.model, backend=self.compile_backend, dynamic=False, fullgraph=False,
                                                 options=self.compile_options)
        return self._compiled_model

    def _stop_compiling(self, error: Exception) -> None:
        """After a failed compile, every later step captures the model itself (one log line, not one per shape)."""
        reason = _first_line(error)
        cause = error  # dynamo wraps the backend's error: say what it was too
        while (inner := getattr(cause, "inner_exception", None) or cause.__cause__) is not None:
            cause = inner
        if cause is not error:
            reason += f" ({_first_line(cause)})"
        self.stats.failed_compiles[reason] = reason
        logger.warning("hf_moe_accel: the torch.compile'd decode step failed; capturing the uncompiled step from now on (%s)", reason)

    def _warm_up(self, forward: Callable[[], object], cuda: bool) -> None:
        with self.rehearsal():  # the replay repeats this run: a placement's bookkeeping leaves it out
            if not cuda:
                forward()
                return
            # One side stream for every warm-up: cuBLAS keeps a workspace per stream for the life of
            # the process, so a new stream per capture would grow memory by that much each time.
            if self._warm_up_stream is None:
                self._warm_up_stream = torch.cuda.Stream()
            stream = self._warm_up_stream
            stream.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(stream):
                    forward()
            finally:  # a failed warm-up (a compile error) is rolled back on the current stream: order it after
                torch.cuda.current_stream().wait_stream(stream)
