"""Prefill forwards as replayed CUDA graphs over prompt-length buckets.

At small batch a prefill is host-bound: an eager forward launches every layer's kernels from Python,
and each Triton launch costs host time of its own. In a generate() call that graphs serve
(`generate.py`), the prefill writes into a pooled static cache that is empty when the call starts
(the pool resets it as it hands it out; a cache passed in is never served). There the prefill replays
a graph captured for a bucket of prompt lengths instead:

- Bucket: the prompt length L rounded up to a power of two from MIN_PREFILL_BUCKET (`prefill_bucket`).
  The input ids, the 2D attention mask and the position ids are right-padded to that length Lb. A pad
  comes after every real token, so the causal mask keeps every pad out of every real token's
  attention; inside the graph the mask is zeroed at the pads too. A pad's id and position are whatever
  the graph's buffer holds (valid ids and positions of an earlier prompt, or zeros).
- Cache: the forward writes Lb positions of keys and values and advances each layer's write position
  by Lb; the graph then sets every write position to L, so that decode overwrites the pad slots from L
  on. A pad slot past the current position is masked as a future token until it is overwritten.
- Logits: generate() asks for the last position's only (logits_to_keep=1), and with left padding every
  row's last real token sits at L - 1, so the graph keeps index L - 1: a 1-D index, computed on the
  device from the real length that is copied in with the inputs.
- Masks: the graph gets the 2D mask and builds the 4D one itself, as decode steps do, so the host's
  work per prefill is one copy of the inputs and the replay.
- Positions: as generate() computed them for the real tokens; without them the model numbers the
  padded sequence 0..Lb-1, so the real tokens get 0..L-1 either way.

Eager (Transformers' own prefill) instead: HF_MOE_ACCEL_PREFILL_GRAPHS=0; batch x Lb above
PREFILL_TOKEN_CAP; a placement with host work in its forwards (its DecodeHooks); chunked prefill or a
prefill that isn't a call's first (assisted decoding); embeddings passed in; per-position attentions
or hidden states asked for (generate() keeps them); a model input this module doesn't know how to pad;
an attention implementation whose masks a captured forward can't build; a capture that failed.

The graphs live in the decode runner's tables, keyed by their cache first as its own steps are: whatever
drops a cache's decode graphs (the pool evicting or releasing the cache, an implementation switch,
running out of memory, unpatch) drops its prefill graphs too. They share the decode graphs' memory
pool (one forward replays at a time), and at most MAX_PREFILL_GRAPHS are kept, least recently used out.
A prefill graph captures the model itself, never the compiled decode step (compile_decode).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig

from ..kernels.pdl import switch_off_reason
from .hooks import DecodeHooks
from .runner import (
    _CAPTURE_LOCK,
    CACHE_ARGUMENTS,
    DecodeGraphs,
    _Step,
    _write_positions,
    is_out_of_memory,
)

logger = logging.getLogger("hf_moe_accel")

ENV_SWITCH = "HF_MOE_ACCEL_PREFILL_GRAPHS"
# The largest batch x bucket a prefill graph serves. Above it the GPU, not the host, sets the pace of a
# prefill (graphs save nothing), while a graph's activation memory grows with it. Re-derive it from the
# time to first token of ours against stock, with and without HF_MOE_ACCEL_PREFILL_GRAPHS=0, at prompt
# lengths around the cap; the cap is the largest batch x bucket where the graphs still win:
#   python -m hf_moe_accel bench --preset qwen3-30b-a3b --batch 1 --prompt-len 512,1024,2048,4096 --new-tokens 2
PREFILL_TOKEN_CAP = 2048
# The shortest bucket. Not costmodel.memory.length_bucket (a cache's length, 256 at least): a prompt of
# a few tokens would replay a forward over 256.
MIN_PREFILL_BUCKET = 16
# Prefill graphs kept at once. Each holds its input buffers, its logits and the graph itself; their
# activations share one memory pool. One batch size's buckets up to the cap are 8.
MAX_PREFILL_GRAPHS = 16
# A prefill graph's key: (id(cache), _PREFILL, ...). A decode step's key holds a cache argument name in
# that place, so the two never meet in the runner's tables.
_PREFILL = "prefill"
# The model inputs a prefill graph pads along the sequence, and those it sets itself.
_PADDED = ("input_ids", "attention_mask", "position_ids")
_SET_BY_GRAPH = ("logits_to_keep", *CACHE_ARGUMENTS)


def prefill_bucket(length: int) -> int:
    """The length a prefill of `length` tokens is padded to: a power of two, MIN_PREFILL_BUCKET at least."""
    bucket = MIN_PREFILL_BUCKET
    while bucket < length:
        bucket *= 2
    return bucket


def placement_blocker(hooks: DecodeHooks) -> str | None:
    """Why a placement's prefill must run eagerly, or None. Its hooks describe decode steps only: a
    placement with any host work in its forwards keeps its prefill eager (expert offload fills its
    expert slots from the host during a prefill, however short)."""
    if hooks.blocked_reason is not None:
        return hooks.blocked_reason
    if hooks.step_blocker is not None or hooks.before_replay is not None or hooks.rehearsal is not None:
        return "the placement does host work in its forwards (expert offload)"
    return None


@dataclass
class _Inputs:
    """One prefill's real inputs, before padding: (batch, length) each, mask and positions optional."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    cache_name: str
    cache: object
    flags: tuple[tuple[str, Hashable], ...]  # the other (non-tensor) model inputs, passed through as they are

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


class PrefillGraphs:
    """Serves the prefill of a generate() call that graphs serve from a graph replay, when it can."""

    def __init__(self, runner: DecodeGraphs, hooks: DecodeHooks, mask_attention: tuple[str, ...]):
        self.runner = runner
        self.placement_reason = placement_blocker(hooks)
        self.mask_attention = mask_attention  # attention implementations whose 4D mask a captured forward builds
        # True while generate()'s inputs for a prefill graph are prepared: the mask stays 2D
        # (generate._create_masks_for_generate), the graph builds the 4D one.
        self.preparing = False
        self._lengths: dict[torch.device, torch.Tensor] = {}  # arange(cap + 1) per device: a real length is a view of it
        self._logged: set[str] = set()

    def serve(self, model: nn.Module, input_ids: torch.Tensor, generation_config: GenerationConfig, model_kwargs: dict,
              args: tuple, kwargs: dict, *, masks_in_graph: bool) -> object | None:
        """The prefill's output (what `model(**inputs, return_dict=True)` returns) from a graph replay, or from
        the model where the graph can't serve inputs already prepared; None: run Transformers' `_prefill`
        (`args`, `kwargs`: its arguments after `model_kwargs`). `masks_in_graph`: the decode steps' masks are
        built inside their graphs, so a prefill's may be too."""
        reason = self._reason_before_inputs(model, input_ids, generation_config, model_kwargs, args, kwargs, masks_in_graph)
        if reason is not None:
            self._run_eagerly(reason)
            return None
        prepared = self._prepare(model, input_ids, model_kwargs)
        inputs, reason = _real_inputs(prepared)
        step = None
        if reason is None:
            step = self._step(model, inputs)
        if step is None:  # the inputs are Transformers' with a 2D mask: the model builds the 4D one itself
            self._run_eagerly(reason or "its graph could not be captured")
            return model(**prepared, return_dict=True)
        self._replay(step, inputs)
        return step.hand_out()

    def _reason_before_inputs(self, model: nn.Module, input_ids: torch.Tensor, generation_config: GenerationConfig,
                              model_kwargs: dict, args: tuple, kwargs: dict, masks_in_graph: bool) -> str | None:
        """Why this prefill runs eagerly, from what `_prefill` was given; None: prepare its inputs."""
        off = switch_off_reason(ENV_SWITCH)
        if off is not None:
            return off
        if self.placement_reason is not None:
            return self.placement_reason
        if args or set(kwargs) - {"is_first_iteration"}:
            return "Transformers passed _prefill arguments this version of hf_moe_accel doesn't know"
        if not kwargs.get("is_first_iteration", True):
            return "not the first forward over these inputs (assisted decoding)"
        if getattr(generation_config, "prefill_chunk_size", None) is not None:
            return "chunked prefill (prefill_chunk_size)"
        cache = next((model_kwargs[name] for name in CACHE_ARGUMENTS if model_kwargs.get(name) is not None), None)
        if not self.runner.pool.owns(cache):
            return "its cache is not a pooled one"
        if model_kwargs.get("inputs_embeds") is not None or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            return "its inputs are embeddings, not a (batch, length) tensor of ids"
        if model_kwargs.get("output_attentions") or model_kwargs.get("output_hidden_states"):
            return "generate() keeps its attentions or hidden states, one per position"
        if model_kwargs.get("logits_to_keep") != 1:
            return "the model computes the logits of every position (no logits_to_keep)"
        attention = getattr(model.config, "_attn_implementation", None)
        if not masks_in_graph or attention not in self.mask_attention:
            return f"a captured forward doesn't build the masks of attention implementation {attention!r}"
        return _shape_reason(input_ids, cache)

    def _prepare(self, model: nn.Module, input_ids: torch.Tensor, model_kwargs: dict) -> dict:
        """Transformers' model inputs for this prefill, its attention mask left 2D. The cache is empty, so
        nothing is sliced off the inputs (`_prefill`'s next_sequence_length is the whole prompt)."""
        self.preparing = True
        try:
            return model.prepare_inputs_for_generation(input_ids, next_sequence_length=None, is_first_iteration=True,
                                                       **model_kwargs)
        finally:
            self.preparing = False

    def _step(self, model: nn.Module, inputs: _Inputs) -> _Step | None:
        """The graph for these inputs' shapes: held, newly captured, or None (its capture failed)."""
        runner = self.runner
        key = _key(inputs)
        step = runner._steps.pop(key, None)
        if step is None:
            if key in runner._failed or key in runner._out_of_memory:
                return None
            step = self._capture(key, model, inputs)
            if step is None:
                return None
        runner._steps[key] = step  # (re)inserted last: the table's order is the prefill graphs' recency
        self._keep_bound()
        return step

    def _keep_bound(self) -> None:
        """At most MAX_PREFILL_GRAPHS prefill graphs: the least recently used go."""
        keys = [key for key in self.runner._steps if key[1] == _PREFILL]
        for key in keys[: max(0, len(keys) - MAX_PREFILL_GRAPHS)]:
            del self.runner._steps[key]

    def _replay(self, step: _Step, inputs: _Inputs) -> None:
        """Copy the real inputs into the graph's buffers (their pads stay as they were) and replay it."""
        ids, mask, positions, length, _ = step.inputs
        width = inputs.length
        targets, sources = [ids[:, :width], length], [inputs.input_ids, self._length(inputs)]
        for buffer, value in ((mask, inputs.attention_mask), (positions, inputs.position_ids)):
            if buffer is not None:
                targets.append(buffer[:, :width])
                sources.append(value)
        torch._foreach_copy_(targets, sources)  # one call for every input: few launches on CUDA
        step.replay()
        self.runner.stats.prefill_replays += 1

    def _length(self, inputs: _Inputs) -> torch.Tensor:
        """The real length as a device scalar: a view of a table made once per device, so no host copy per call."""
        device = inputs.input_ids.device
        table = self._lengths.get(device)
        if table is None or table.numel() <= inputs.length:
            table = self._lengths[device] = torch.arange(max(PREFILL_TOKEN_CAP, inputs.length) + 1, device=device)
        return table[inputs.length]

    def _capture(self, key: tuple, model: nn.Module, inputs: _Inputs) -> _Step | None:
        """Warm up and capture the padded forward over fresh buffers; None (logged) when either fails."""
        bucket = key[4]
        buffers = _padded_buffers(inputs, bucket, self._length(inputs))
        forward = _padded_forward(model, inputs, buffers)
        cuda = inputs.input_ids.is_cuda
        saved = [position.clone() for position in _write_positions(inputs.cache)]

        def roll_back() -> None:
            # The warm-up (and a capture that runs its forward) wrote this prefill: the cache starts empty again.
            for current, before in zip(_write_positions(inputs.cache), saved):
                current.copy_(before)

        try:
            with _CAPTURE_LOCK, self.runner._undone_on_error(roll_back):
                return self._warm_up_and_capture(forward, buffers, cuda, roll_back)
        except Exception as error:  # never a wrong answer: this prefill runs eagerly
            self._capture_failed(key, error)
            return None

    def _warm_up_and_capture(self, forward: Callable[[], object], buffers: list, cuda: bool,
                             roll_back: Callable[[], None]) -> _Step:
        runner, stats = self.runner, self.runner.stats
        start = time.perf_counter()
        runner._warm_up(forward, cuda)  # the runner's side stream: one cuBLAS workspace for every warm-up
        roll_back()
        memory_before = 0
        if cuda:  # as the runner measures its captures: the growth of the graphs' private pool
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            memory_before = torch.cuda.memory_reserved()
        if cuda and runner._memory_pool is None:
            runner._memory_pool = torch.cuda.graph_pool_handle()
        with runner.rehearsal():
            replay, output = runner.capture(forward, runner._memory_pool)
        roll_back()  # a CUDA capture runs nothing; a backend that runs the forward to capture it does
        if cuda:
            torch.cuda.synchronize()
            stats.graph_memory_bytes += torch.cuda.memory_reserved() - memory_before
        stats.prefill_captures += 1
        stats.prefill_capture_seconds += time.perf_counter() - start
        return _Step(replay=replay, inputs=buffers, output=output)

    def _capture_failed(self, key: tuple, error: Exception) -> None:
        reason = f"{type(error).__name__}: {error}"
        self.runner.stats.failed_captures[f"prefill: {reason}"] = reason
        if is_out_of_memory(error):  # memory may come back: captured again in the next call
            self.runner._out_of_memory.add(key)
        else:
            self.runner._failed.add(key)
        logger.warning("hf_moe_accel: a prefill could not be captured in a CUDA graph, running eagerly (%s)", reason)

    def _run_eagerly(self, reason: str) -> None:
        """Count an eager prefill; say why once per reason (debug: eager prefill is a supported path)."""
        self.runner.stats.eager_prefills += 1
        if reason not in self._logged:
            self._logged.add(reason)
            logger.debug("hf_moe_accel: prefill runs eagerly: %s", reason)


def _shape_reason(input_ids: torch.Tensor, cache) -> str | None:
    """Why a prefill of this shape over `cache` runs eagerly (too long, or no room to pad), or None."""
    batch, length = input_ids.shape
    bucket = prefill_bucket(length)
    if length == 0:
        return "an empty prompt"
    if batch * bucket > PREFILL_TOKEN_CAP:
        return (f"{batch} x {bucket} tokens (batch x padded prompt) is more than PREFILL_TOKEN_CAP={PREFILL_TOKEN_CAP}, "
                "where the GPU sets the pace")
    if bucket > min(layer.max_cache_len for layer in cache.layers):
        return f"the cache has fewer than the {bucket} positions the padded prompt writes"
    return None


def _real_inputs(prepared: dict) -> tuple[_Inputs | None, str | None]:
    """The prepared model inputs a prefill graph pads, and the rest, or (None, why the graph can't take them)."""
    ids = prepared.get("input_ids")
    unknown = [name for name, value in prepared.items() if name not in _PADDED and name not in _SET_BY_GRAPH
               and (isinstance(value, torch.Tensor) or not isinstance(value, Hashable))]
    if unknown:
        return None, f"model inputs {unknown} may run along the sequence too: only {list(_PADDED)} are padded"
    if prepared.get("logits_to_keep") != 1 or not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None, "prepare_inputs_for_generation changed the ids or logits_to_keep"
    for name in ("attention_mask", "position_ids"):
        value = prepared.get(name)
        if value is not None and (not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(ids.shape)):
            return None, f"its {name} is not a (batch, length) tensor"
    cache_name = next(name for name in CACHE_ARGUMENTS if prepared.get(name) is not None)
    flags = tuple(sorted((name, value) for name, value in prepared.items() if name not in _PADDED and name not in _SET_BY_GRAPH))
    return _Inputs(ids, prepared.get("attention_mask"), prepared.get("position_ids"), cache_name, prepared[cache_name],
                   flags), None


def _key(inputs: _Inputs) -> tuple:
    """What a prefill graph is captured for: its cache (first, as the runner's keys), the batch, the bucket, the
    dtypes of ids, mask and positions (None: not given) and the other inputs' values."""
    batch, length = inputs.input_ids.shape
    kinds = tuple(None if t is None else t.dtype for t in (inputs.input_ids, inputs.attention_mask, inputs.position_ids))
    return (id(inputs.cache), _PREFILL, inputs.cache_name, batch, prefill_bucket(length), kinds, inputs.flags)


def _padded_buffers(inputs: _Inputs, bucket: int, length: torch.Tensor) -> list:
    """The graph's input buffers [ids, mask or None, positions or None, real length, column numbers], the pads
    zeros. The step keeps them: a CUDA graph reads their memory at every replay, so none may be freed."""
    pad = (0, bucket - inputs.length)
    padded = [None if t is None else F.pad(t, pad) for t in (inputs.input_ids, inputs.attention_mask, inputs.position_ids)]
    return [*padded, length.clone(), torch.arange(bucket, device=inputs.input_ids.device)]


def _padded_forward(model: nn.Module, inputs: _Inputs, buffers: list) -> Callable[[], object]:
    """The forward a prefill graph captures: the padded inputs read from `buffers`, the mask zeroed past the real
    length, the logits of the last real position only, and the cache's write positions set to the real length."""
    ids, mask, positions, length, columns = buffers
    cache = inputs.cache

    def forward() -> object:
        real = columns < length  # the columns of real tokens; the pads come after them
        output = model(input_ids=ids, attention_mask=None if mask is None else mask * real, position_ids=positions,
                       logits_to_keep=(length - 1).view(1), **{inputs.cache_name: cache}, **dict(inputs.flags),
                       return_dict=True)
        written = _write_positions(cache)  # read after the forward: a cache's first forward allocates them
        torch._foreach_copy_(written, [length] * len(written))  # decode writes from L on, over the pads
        return output

    return forward
