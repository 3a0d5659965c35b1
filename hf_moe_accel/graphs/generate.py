"""generate() integration: decode steps replay CUDA graphs, everything else stays Transformers'.

Transformers' own decode loop (logits processors, sampling, stopping criteria, streamers,
`pipeline`) is kept whole. The model's class is swapped for a subclass that, when a call can
be served by graphs,
- asks for a static cache and takes it from our pool (`_prepare_static_cache`), so the cache's
  tensors, and the graphs captured over them, survive from one call to the next;
- hands `generate()` our graph runner where it would use a `torch.compile`d forward for decode
  steps (`_valid_auto_compile_criteria`, `get_compiled_call`), and a graph of the prefill where
  `prefill.py` can serve it (`_prefill`; else it runs eagerly);
- for those decode steps, hands the model its 2D attention mask, padded to the cache's length, in
  place of the 4D mask generate() would build on the host each step (`create_masks_for_generate`):
  the model's forward builds the 4D mask itself, inside the captured graph, so the host does less
  between steps (once the stop checks are deferred, `stop_check.py`, the host sets the pace of a
  small model's decode at batch 1);
- swaps the two logits processors that keep EOS off below a minimum length, each of which rebuilds an
  EOS mask over the vocabulary every step, for stand-ins that compute the same scores with the mask
  made once per call (`_get_logits_processor`, `processors.py`).
A call graphs can't serve runs Transformers' generate() unchanged, with one log line saying why.

A captured graph replays the kernels of the attention and experts implementations its capture ran.
The configs name those (`set_attn_implementation`, `set_experts_implementation`: a user may switch
either between calls), so each call compares them with the names the graphs were captured under and
drops every graph on a change; the steps are captured again under the new ones.

Threads and faults. The pooled caches, the graphs' input and output buffers, the served flag and a
placement's per-step state belong to the model, not to a call: generate() calls on one model take
turns (a lock per model, held for the whole call, served or not). The lock is re-entrant: a call
made from inside a served one, in its thread (by its streamer or a stopping criterion), runs stock
generate() with a cache of its own, leaving the served call's cache and graphs alone. A call that
ends in an error leaves the lock free and the pool as a finished call would (its cache stays pooled
and is reset when next handed out); one that runs out of GPU memory empties the pool and drops every
graph, so that the memory can come back.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from torch import nn
from transformers import GenerationConfig, LogitsProcessorList, masking_utils
from transformers.generation.configuration_utils import GenerationMode

from ..costmodel.memory import length_bucket
from ..kernels.pdl import inductor_compile_options
from ..patches.attention import DECODE_ATTENTION
from ..patches.implementations import implementations, model_configs
from ..patches.swap import is_swapped, restore, swap_methods
from ..state import drop_state_if_empty, ensure_state, state_of
from .cache_pool import StaticCachePool, static_cache_blocker
from .hooks import NO_HOOKS, DecodeHooks
from .prefill import PrefillGraphs
from .processors import with_stand_ins
from .runner import (
    CACHE_ARGUMENTS,
    Capture,
    CompileBackend,
    DecodeGraphs,
    capture_cuda_graph,
    is_out_of_memory,
)
from .stop_check import deferred_stop_checks, stock_stop_checks

logger = logging.getLogger("hf_moe_accel")

_SERVED_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)
# Attention implementations whose masks are plain tensors the model builds from a 2D mask with tensor ops
# (capturable); flash attention's and flex attention's masks keep generate()'s own path. Before 5.21,
# Transformers' eager mask makes its zero with torch.tensor(0.0, device=...), a host-to-device copy that
# CUDA graph capture refuses: there the eager mask stays on the host.
_EAGER_MASK_CAPTURABLE = Version(transformers.__version__) >= Version("5.21")
_MASK_IN_GRAPH_ATTENTION = ("sdpa", DECODE_ATTENTION, *(("eager",) if _EAGER_MASK_CAPTURABLE else ()))
@dataclass(frozen=True)
class GraphBackend:
    """Where decode graphs run: CUDA graphs on CUDA models (tests swap in a CPU stand-in)."""

    device_type: str
    capture: Capture
    compile_backend: CompileBackend = "inductor"  # torch.compile's backend, for compile_decode


CUDA_GRAPHS = GraphBackend("cuda", capture_cuda_graph)
# Static caches (and their graphs) kept across generate() calls, by (batch size, length bucket).
DEFAULT_POOLED_CACHES = 3


@dataclass
class GraphDecodeState:
    original_class: type
    backend: GraphBackend
    pool: StaticCachePool
    runner: DecodeGraphs
    cache_blocker: str | None
    hooks: DecodeHooks
    configs: list  # the configs whose implementation names the graphs depend on
    implementations: tuple  # those names when the graphs were captured (patches.implementations)
    serving: bool = False  # True inside a generate() call that graphs serve
    defer_stop_checks: bool = True  # stop checks read one step late in served calls (stop_check.py)
    mask_in_graph: bool = True  # decode steps get the padded 2D mask; the captured forward builds the 4D one
    logged_reasons: set[str] = field(default_factory=set)
    all_ones_masks: dict[tuple, torch.Tensor] = field(default_factory=dict)  # by (batch, cache length, device)
    prefill: PrefillGraphs | None = None  # served calls' prefill forwards as graph replays (prefill.py)
    # Held around each generate() call: one call at a time uses the pool, the graphs and the served flag.
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __deepcopy__(self, memo: dict) -> GraphDecodeState:
        """A copy with a lock of its own (a lock can't be copied; the copy's calls don't touch this model's
        pool or graphs, so they need not wait for this model's)."""
        copied = object.__new__(type(self))
        memo[id(self)] = copied
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            setattr(copied, item.name, threading.RLock() if item.name == "lock" else copy.deepcopy(value, memo))
        return copied


def check_compile_decode(compile_decode: bool, cuda_graphs: bool) -> None:
    """Reject `accelerate()`'s compile_decode values that can't work (TypeError/ValueError)."""
    if not isinstance(compile_decode, bool):
        raise TypeError(f"compile_decode must be True or False, got {compile_decode!r}")
    if compile_decode and not cuda_graphs:
        raise ValueError("compile_decode=True compiles the decode step captured in CUDA graphs: it needs cuda_graphs=True")


def _compile_options(model: nn.Module, backend: GraphBackend) -> dict | None:
    """Inductor's options for the compiled step (its kernels with PDL where opted in: kernels/pdl.py)."""
    if backend.compile_backend != "inductor":
        return None
    return inductor_compile_options(next(model.parameters()).device) or None


def enable_graph_decode(model: nn.Module, backend: GraphBackend = CUDA_GRAPHS, compile_decode: bool = False,
                        hooks: DecodeHooks = NO_HOOKS) -> None:
    """Make `model.generate()` decode through captured graphs whenever it can (in place); with
    `compile_decode`, each graph captures the step compiled by torch.compile (`backend.compile_backend`).
    `hooks`: what the weights' placement needs of decode steps (`apply_offload` returns them)."""
    if not hasattr(model, "generate") or not hasattr(model, "_prepare_static_cache") or is_swapped(model):
        logger.info("hf_moe_accel: %s has no generate() to serve with graphs", type(model).__name__)
        return
    config = model.config.get_text_config(decoder=True)
    pool = StaticCachePool(config, max_entries=hooks.max_pooled_caches or DEFAULT_POOLED_CACHES)
    runner = DecodeGraphs(model, pool, backend.capture, backend.compile_backend if compile_decode else None,
                          compile_options=_compile_options(model, backend) if compile_decode else None,
                          step_blocker=hooks.step_blocker, before_replay=hooks.before_replay, rehearsal=hooks.rehearsal)
    pool.on_evict = runner.forget  # graphs captured over an evicted cache go with it
    configs = model_configs(model)
    ensure_state(model).decode = GraphDecodeState(type(model), backend, pool, runner, static_cache_blocker(config), hooks,
                                                  configs, implementations(configs),
                                                  prefill=PrefillGraphs(runner, hooks, _MASK_IN_GRAPH_ATTENTION))
    swap_methods(model, _METHODS)


def disable_graph_decode(model: nn.Module) -> None:
    """Undo `enable_graph_decode`: free the pooled caches and graphs, restore the class. Waits for a
    generate() call in flight in another thread to end."""
    state = decode_state(model)
    if state is None:
        return
    with state.lock:
        _drop_pool_and_graphs(state)
        restore(model)
        state_of(model).decode = None
        drop_state_if_empty(model)


def _drop_pool_and_graphs(state: GraphDecodeState) -> None:
    state.runner.clear()
    state.pool.clear()
    state.all_ones_masks.clear()


def graph_stats(model: nn.Module) -> dict | None:
    """Captures, capture time, graph memory, replays, eager steps, generate() calls with deferred stop
    checks, prefill graphs' captures and replays and the eager prefills of served calls, pooled caches
    (and their bound) with their KV-cache bytes, the graphs held now and the caches they belong to
    and, with compile_decode, compiled captures, compile time and failed compiles; None without graph
    decode. It doesn't wait for a call in flight: read while one runs, the counters are that
    moment's."""
    state = decode_state(model)
    if state is None:
        return None
    return {**state.runner.stats.snapshot(), "pooled_caches": len(state.pool), "max_pooled_caches": state.pool.max_entries,
            "pooled_kv_cache_bytes": state.pool.kv_cache_bytes(), "graphs_held": state.runner.graphs_held(),
            "caches_with_graphs": len(state.runner.caches_with_graphs())}


def decode_state(model: nn.Module) -> GraphDecodeState | None:
    """The graph decode state of a model `enable_graph_decode` served, or None."""
    state = state_of(model)
    return None if state is None else state.decode


def _served_state(model: nn.Module) -> GraphDecodeState:
    return state_of(model).decode  # the swapped class's methods run only while the decode state is set


def _resolved_generation_config(model: nn.Module, kwargs: dict) -> GenerationConfig:
    config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    config.update(**{k: v for k, v in kwargs.items() if k != "generation_config"})
    return config


def _eager_reason(model: nn.Module, state: GraphDecodeState, kwargs: dict) -> str | None:
    """Why this generate() call can't decode through graphs, or None when it can."""
    if model.device.type != state.backend.device_type:
        return f"the model is on {model.device.type}; decode graphs need {state.backend.device_type}"
    if state.hooks.blocked_reason:
        return state.hooks.blocked_reason
    devices = set(getattr(model, "hf_device_map", {}).values())
    # A zero-copy offload's map has its experts on the CPU, where its kernels read them: its step check decides.
    if len(devices) > 1 and state.hooks.step_blocker is None:
        return f"the model is spread over several devices ({', '.join(sorted(map(str, devices)))})"
    if model.training:
        return "the model is in train() mode"
    if state.cache_blocker is not None:
        return state.cache_blocker
    for name in CACHE_ARGUMENTS:
        if kwargs.get(name) is not None:
            return f"a cache was passed in ({name})"
    for name in ("assistant_model", "prompt_lookup_num_tokens", "custom_generate", "synced_gpus"):
        if kwargs.get(name):
            return f"{name} was given"
    config = _resolved_generation_config(model, kwargs)
    batch = _batch_size(kwargs, config)
    if batch is not None and (reason := _step_blocker(state, batch, 0)) is not None:
        return reason  # the cache-length part of the check waits for _prepare_static_cache
    mode = config.get_generation_mode(kwargs.get("assistant_model"))
    if mode not in _SERVED_MODES:
        return f"{mode.value.replace('_', ' ')} is not served by graphs (greedy and sampling are)"
    if config.cache_implementation not in (None, "static"):
        return f"cache_implementation={config.cache_implementation!r} was asked for"
    if config.use_cache is False:
        return "use_cache=False"
    return None


def _batch_size(kwargs: dict, config: GenerationConfig) -> int | None:
    """The sequences a generate() call decodes (prompts x num_return_sequences), or None if not given as a tensor."""
    inputs = next((kwargs[name] for name in ("inputs", "input_ids", "inputs_embeds") if kwargs.get(name) is not None), None)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        return None
    return inputs.shape[0] * (config.num_return_sequences or 1)


def _generate(self, *args, **kwargs):
    state = _served_state(self)
    # One call at a time per model (module docstring), eager fallbacks too: a fallback runs the same
    # placement hooks and model-wide switches, and its check may drop graphs another call replays.
    with state.lock:
        if state.serving:  # made from inside this thread's served call
            return _generate_inside_served_call(self, state, args, kwargs)
        try:
            return _generate_alone(self, state, args, kwargs)
        except BaseException as error:
            if is_out_of_memory(error):
                _drop_pool_and_graphs(state)  # the memory comes back once the caller lets the error go
            raise


def _generate_alone(model: nn.Module, state: GraphDecodeState, args: tuple, kwargs: dict):
    """generate() for the one call holding the model's lock."""
    _drop_graphs_of_other_implementations(state)
    original = super(type(model), model).generate
    # generate(inputs, generation_config, ...) positionally
    named = {**dict(zip(("inputs", "generation_config"), args)), **kwargs}
    reason = _eager_reason(model, state, named)
    if reason is not None:
        # without CUDA at all, accelerate() has already said once that decode runs eagerly
        no_cuda = state.backend.device_type == "cuda" and model.device.type != "cuda" and not torch.cuda.is_available()
        _log_eager_once(state, reason, expected=no_cuda)
        return original(*args, **kwargs)
    kwargs["cache_implementation"] = "static"
    state.runner.start_call()
    state.serving = True
    try:
        with deferred_stop_checks(state.runner.stats.count_deferred_stop_check) if state.defer_stop_checks else contextlib.nullcontext():
            output = original(*args, **kwargs)
    finally:
        state.serving = False
    cache = getattr(output, _returned_cache_field(output), None)
    if cache is not None and state.pool.owns(cache):
        state.pool.release(cache)  # returned to the user (return_dict_in_generate): theirs now, never reset by us
    return output


def _generate_inside_served_call(model: nn.Module, state: GraphDecodeState, args: tuple, kwargs: dict):
    """Stock generate() for a call made from inside a served one (its streamer, a stopping criterion): the
    pool would hand it the served call's cache if their shapes matched, so it gets none of ours, nor graphs."""
    _log_eager_once(state, "a generate() call made from inside another on the same model")
    state.serving = False
    try:
        with stock_stop_checks():
            return super(type(model), model).generate(*args, **kwargs)
    finally:
        state.serving = True


def _drop_graphs_of_other_implementations(state: GraphDecodeState) -> None:
    """Once per call: a graph must never replay kernels of an implementation the configs no longer name."""
    now = implementations(state.configs)
    if now != state.implementations:
        state.runner.clear()
        state.implementations = now
        logger.info("hf_moe_accel: attention/experts implementations changed; decode graphs will be captured again")


def _returned_cache_field(output: object) -> str:
    """Where generate()'s output holds the cache: `cache` from transformers 5.24 on, else `past_key_values`."""
    return "cache" if "cache" in getattr(output, "__dataclass_fields__", {}) else "past_key_values"


def _prepare_static_cache(self, cache_implementation: str, batch_size: int, max_cache_len: int, *args, **kwargs):
    state = _served_state(self)
    reason = _step_blocker(state, batch_size, length_bucket(max_cache_len)) if state.serving else None
    if reason is not None:  # a cache of the call's own, outside the pool: the runner runs its steps eagerly
        _log_eager_once(state, reason)
    if not state.serving or reason is not None:
        return super(type(self), self)._prepare_static_cache(cache_implementation, batch_size, max_cache_len, *args, **kwargs)
    return state.pool.get(batch_size, max_cache_len)


def _step_blocker(state: GraphDecodeState, batch_size: int, cache_tokens: int) -> str | None:
    check = state.hooks.step_blocker
    return None if check is None else check(batch_size, cache_tokens)


def _log_eager_once(state: GraphDecodeState, reason: str, *, expected: bool = False) -> None:
    """Once per reason: a warning, or a debug line when `expected` (accelerate() already said it)."""
    if reason not in state.logged_reasons:
        state.logged_reasons.add(reason)
        logger.log(logging.DEBUG if expected else logging.WARNING, "hf_moe_accel: generate() decodes eagerly: %s", reason)


def _valid_auto_compile_criteria(self, model_kwargs: dict, generation_config: GenerationConfig) -> bool:
    state = _served_state(self)
    if state.serving:
        return True
    return super(type(self), self)._valid_auto_compile_criteria(model_kwargs, generation_config)


def _get_compiled_call(self, compile_config) -> Callable:
    state = _served_state(self)
    if state.serving:
        return state.runner
    return super(type(self), self).get_compiled_call(compile_config)


def _get_logits_processor(self, *args, **kwargs) -> LogitsProcessorList:
    state = _served_state(self)
    processors = super(type(self), self)._get_logits_processor(*args, **kwargs)
    return with_stand_ins(processors) if state.serving else processors


def _prefill(self, input_ids: torch.Tensor, generation_config: GenerationConfig, model_kwargs: dict, *args, **kwargs):
    state = _served_state(self)
    if state.serving and state.prefill is not None:  # a served call's prefill may replay a graph (prefill.py)
        masks_in_graph = state.mask_in_graph and getattr(state.original_class, "create_masks_for_generate", None) is None
        outputs = state.prefill.serve(self, input_ids, generation_config, model_kwargs, args, kwargs,
                                      masks_in_graph=masks_in_graph)
        if outputs is not None:
            return outputs
    return super(type(self), self)._prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)


def _create_masks_for_generate(self, *args, **kwargs):
    state = _served_state(self)
    if getattr(state.original_class, "create_masks_for_generate", None) is not None:  # a model's own masks: left to it
        return super(type(self), self).create_masks_for_generate(*args, **kwargs)
    if not args and state.prefill is not None and state.prefill.preparing:  # a prefill graph's forward builds the 4D mask
        return kwargs.get("attention_mask")
    if not args and state.serving and state.mask_in_graph:
        padded = _graph_decode_mask(state, kwargs)
        if padded is not None:
            return padded
    return masking_utils.create_masks_for_generate(*args, **kwargs)


def _graph_decode_mask(state: GraphDecodeState, kwargs: dict) -> torch.Tensor | None:
    """For a one-token step over a pooled cache with a 2D mask or none: that mask padded to the
    cache's length, or ones of that length (a fixed shape for the graph; the positions past the
    current one are masked as future tokens by the model's causal mask whatever they hold); else None."""
    mask, embeds, config = kwargs.get("attention_mask"), kwargs.get("inputs_embeds"), kwargs.get("config")
    cache = next((kwargs[name] for name in CACHE_ARGUMENTS if kwargs.get(name) is not None), None)
    if (mask is not None and mask.ndim != 2) or embeds is None or embeds.shape[1] != 1 or not state.pool.owns(cache):
        return None
    if getattr(config, "_attn_implementation", None) not in _MASK_IN_GRAPH_ATTENTION:
        return None
    length = max(layer.max_cache_len for layer in cache.layers)
    if mask is None:  # generate() drops a mask of all ones (transformers >= 5.18): no padding anywhere
        return _all_ones_mask(state, embeds.shape[0], length, embeds.device)
    if mask.shape[1] > length:
        return None
    return F.pad(mask, (0, length - mask.shape[1]))


def _all_ones_mask(state: GraphDecodeState, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """A 2D mask of ones, made once per shape: read-only for everyone (the runner copies it into the graph's buffer)."""
    key = (batch, length, device)
    if key not in state.all_ones_masks:
        state.all_ones_masks[key] = torch.ones(batch, length, dtype=torch.long, device=device)
    return state.all_ones_masks[key]


_METHODS = {
    "generate": _generate,
    "_prepare_static_cache": _prepare_static_cache,
    "_valid_auto_compile_criteria": _valid_auto_compile_criteria,
    "get_compiled_call": _get_compiled_call,
    "create_masks_for_generate": _create_masks_for_generate,
    "_get_logits_processor": _get_logits_processor,
    "_prefill": _prefill,
}
