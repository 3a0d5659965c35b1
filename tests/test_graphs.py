"""generate() through graph decode keeps the whole generate() contract.

Each check compares the graph path with the eager fused path of the same weights (`cuda_graphs=False`,
same static cache layout, so the same kernels run). On CPU (CI) the graph backend is a stand-in
that has a CUDA graph's semantics (inputs read from the captured buffers at replay, outputs
overwritten in place) and the fixtures run in float32; on a GPU (`-m gpu`) real CUDA graphs
capture the bfloat16 fixtures.
"""

from __future__ import annotations

import contextlib
import inspect
import logging

import pytest
import torch
from torch.utils._pytree import tree_leaves
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Qwen3MoeForCausalLM,
    StoppingCriteria,
    StoppingCriteriaList,
    pipeline,
)
from transformers.generation.streamers import BaseStreamer

from hf_moe_accel import accelerate, is_accelerated, unpatch
from hf_moe_accel.costmodel.memory import length_bucket
from hf_moe_accel.graphs import graph_stats
from hf_moe_accel.graphs.cache_pool import StaticCachePool
from hf_moe_accel.graphs.generate import (
    GraphBackend,
    decode_state,
    disable_graph_decode,
    enable_graph_decode,
)
from hf_moe_accel.graphs.stop_check import stop_checks_can_be_deferred


def stand_in_capture(forward, pool):
    """A CPU stand-in for CUDA-graph capture: replay re-runs the forward on the captured buffers."""
    output = forward()

    def replay() -> None:
        for dst, src in zip(tree_leaves(output), tree_leaves(forward())):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)

    return replay, output


SETUPS = [
    pytest.param(("cpu", torch.float32), id="cpu-stand-in"),
    pytest.param(("cuda", torch.bfloat16), id="cuda-graphs", marks=pytest.mark.gpu),
]


class Pair:
    """The same weights twice: `graphs` decodes through graph replays, `eager` eagerly."""

    def __init__(self, path, device: str, dtype: torch.dtype):
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.graphs = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.eager = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        if device == "cpu":
            accelerate(self.graphs, cuda_graphs=False)
            enable_graph_decode(self.graphs, GraphBackend("cpu", stand_in_capture))
        else:
            accelerate(self.graphs)
        accelerate(self.eager, cuda_graphs=False)
        self.device = device

    def inputs(self, prompts: list[str]) -> dict:
        return self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)

    def both(self, inputs: dict, seed: int | None = None, **kwargs):
        """(graph path output, eager output); the eager side uses a static cache like the graphs."""
        outputs = []
        for model, extra in ((self.graphs, {}), (self.eager, {"cache_implementation": "static", "disable_compile": True})):
            if seed is not None:
                torch.manual_seed(seed)
            outputs.append(model.generate(**inputs, **kwargs, **extra))
        return outputs


@pytest.fixture(params=SETUPS)
def pair(request, fixture_path) -> Pair:
    device, dtype = request.param
    return Pair(fixture_path, device, dtype)


PROMPTS = ["def main(", "import os\nimport sys\n\nclass Config:\n    "]


def test_greedy_single_and_batched_left_padded(pair):
    for prompts in (PROMPTS[:1], PROMPTS):
        ours, eager = pair.both(pair.inputs(prompts), max_new_tokens=24, do_sample=False)
        assert torch.equal(ours, eager)
    stats = graph_stats(pair.graphs)
    assert stats["captures"] == 2 and stats["replays"] > 0  # one graph per batch size


def test_sampling_with_logits_processors(pair):
    kwargs = dict(max_new_tokens=20, do_sample=True, temperature=0.8, top_p=0.9, top_k=30, repetition_penalty=1.3, no_repeat_ngram_size=3)
    ours, eager = pair.both(pair.inputs(PROMPTS), seed=1234, **kwargs)
    assert torch.equal(ours, eager)


def test_num_return_sequences(pair):
    ours, eager = pair.both(pair.inputs(PROMPTS[:1]), seed=7, max_new_tokens=12, do_sample=True, num_return_sequences=3)
    assert ours.shape[0] == 3 and torch.equal(ours, eager)


def test_eos_and_stopping_criteria(pair):
    inputs = pair.inputs(PROMPTS[:1])
    full, _ = pair.both(inputs, max_new_tokens=16, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    eos = int(full[0, prompt_len + 4])
    first_eos = prompt_len + int((full[0, prompt_len:] == eos).nonzero()[0])
    ours, eager = pair.both(inputs, max_new_tokens=16, do_sample=False, eos_token_id=eos)
    assert torch.equal(ours, eager) and ours.shape[1] == first_eos + 1

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= prompt_len + 6, device=input_ids.device)

    ours, eager = pair.both(inputs, max_new_tokens=16, do_sample=False, stopping_criteria=StoppingCriteriaList([StopAfter()]))
    assert torch.equal(ours, eager) and ours.shape[1] == prompt_len + 6
    if pair.device == "cuda" and stop_checks_can_be_deferred():  # the checks above ran one step late
        assert graph_stats(pair.graphs)["deferred_stop_checks"] >= 2


def test_batch_finishing_at_different_steps_with_sampling(pair):
    """Sequences reach EOS at different steps (sampled): with deferred stop checks (CUDA, a cache not
    returned) the one extra step after the last EOS must leave no trace in the sequences."""
    inputs = pair.inputs(PROMPTS)
    full, _ = pair.both(inputs, seed=5, max_new_tokens=12, do_sample=True, temperature=1.5)
    start = inputs["input_ids"].shape[1]
    eos = [int(full[0, start + 2]), int(full[1, start + 6])]  # the first row's 3rd token, the second's 7th
    ours, eager = pair.both(inputs, seed=5, max_new_tokens=12, do_sample=True, temperature=1.5, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours, eager) and ours.shape[1] < full.shape[1]


class Collector(BaseStreamer):
    def __init__(self):
        self.chunks: list[torch.Tensor] = []
        self.ended = False

    def put(self, value):
        self.chunks.append(value.detach().cpu().reshape(-1))

    def end(self):
        self.ended = True


def test_streamer_sees_every_token(pair):
    inputs = pair.inputs(PROMPTS[:1])
    streamer = Collector()
    ours = pair.graphs.generate(**inputs, max_new_tokens=10, do_sample=False, streamer=streamer)
    assert streamer.ended
    assert torch.equal(torch.cat(streamer.chunks), ours[0].cpu())


def test_return_dict_with_scores(pair):
    kwargs = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_scores=True, output_logits=True)
    ours, eager = pair.both(pair.inputs(PROMPTS), **kwargs)
    assert torch.equal(ours.sequences, eager.sequences)
    for mine, theirs in zip(ours.scores + ours.logits, eager.scores + eager.logits):
        torch.testing.assert_close(mine, theirs)
    # The returned cache is the caller's: the next call must not reset it under them.
    kept = ours.past_key_values
    length = int(kept.get_seq_length())
    pair.graphs.generate(**pair.inputs(PROMPTS), max_new_tokens=4, do_sample=False)
    assert int(kept.get_seq_length()) == length


def test_hidden_states_kept_by_generate_are_each_steps_own(pair):
    """generate() keeps every step's hidden states: the runner hands them out as copies of graph
    memory (the next replay overwrites it), so each step's are its own, equal to the eager path's."""
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_hidden_states=True)
    replays = graph_stats(pair.graphs)["replays"]
    ours, eager = pair.both(pair.inputs(PROMPTS), **kwargs)
    assert graph_stats(pair.graphs)["replays"] == replays + 5  # the decode steps were replays
    assert torch.equal(ours.sequences, eager.sequences)
    assert len(ours.hidden_states) == len(eager.hidden_states) == 6
    for mine, theirs in zip(ours.hidden_states[1:], eager.hidden_states[1:]):
        for layer_mine, layer_theirs in zip(mine, theirs, strict=True):
            torch.testing.assert_close(layer_mine, layer_theirs)


def test_pipeline(pair):
    text_gen = dict(max_new_tokens=12, do_sample=False)
    ours = pipeline("text-generation", model=pair.graphs, tokenizer=pair.tokenizer)(PROMPTS[0], **text_gen)
    eager = pipeline("text-generation", model=pair.eager, tokenizer=pair.tokenizer)(
        PROMPTS[0], cache_implementation="static", disable_compile=True, **text_gen
    )
    assert ours[0]["generated_text"] == eager[0]["generated_text"]


def test_many_calls_with_changing_shapes_stay_bounded(pair):
    # (batch, new tokens, long prompt): three batch sizes, and a prompt long enough (> 256 tokens)
    # to need the next cache bucket.
    sizes = [(1, 6, False), (2, 10, False), (3, 6, False), (1, 6, True), (2, 6, False), (1, 6, False)]
    long_prompt = PROMPTS[1] * 23
    memory = []
    for batch, new_tokens, long in sizes * 2:
        prompts = ([long_prompt] if long else PROMPTS * 2)[:batch]
        ours, eager = pair.both(pair.inputs(prompts), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        assert torch.equal(ours, eager)
        if pair.device == "cuda":
            memory.append(torch.cuda.memory_allocated())
    stats = graph_stats(pair.graphs)
    assert stats["pooled_caches"] <= 3
    assert stats["captures"] < 2 * len(sizes)  # the second round reuses captured graphs
    if memory:
        first_round, second_round = memory[: len(sizes)], memory[len(sizes) :]
        assert max(second_round) <= max(first_round) * 1.05


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(num_beams=2), "beam search"),
        (dict(cache_implementation="dynamic"), "cache_implementation='dynamic'"),
        (dict(use_cache=False), "use_cache=False"),
    ],
)
def test_what_graphs_cannot_serve_runs_eagerly_with_a_reason(pair, caplog, kwargs, reason):
    inputs = pair.inputs(PROMPTS[:1])
    with caplog.at_level(logging.WARNING, logger="hf_moe_accel"):
        ours = pair.graphs.generate(**inputs, max_new_tokens=8, do_sample=False, **kwargs)
        pair.graphs.generate(**inputs, max_new_tokens=8, do_sample=False, **kwargs)
    eager = pair.eager.generate(**inputs, max_new_tokens=8, do_sample=False, **kwargs)
    assert torch.equal(ours, eager)
    lines = [r.getMessage() for r in caplog.records if "decodes eagerly" in r.getMessage()]
    assert len(lines) == 1 and reason in lines[0]  # one line, not one per call
    assert graph_stats(pair.graphs)["captures"] == 0


# transformers 5.24 renamed generate()'s `past_key_values` to `cache` (the old name still accepted there).
CACHE_ARGUMENT_NAMES = ["past_key_values"] + (["cache"] if "cache" in inspect.signature(Qwen3MoeForCausalLM.forward).parameters else [])


@pytest.mark.parametrize("cache_argument", CACHE_ARGUMENT_NAMES)
def test_a_cache_passed_in_runs_eagerly(pair, caplog, cache_argument):
    from transformers import DynamicCache

    inputs = pair.inputs(PROMPTS[:1])
    user_cache = {cache_argument: DynamicCache(config=pair.graphs.config)}
    with caplog.at_level(logging.WARNING, logger="hf_moe_accel"):
        ours = pair.graphs.generate(**inputs, **user_cache, max_new_tokens=8, do_sample=False)
    eager = pair.eager.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, eager)
    assert any(f"a cache was passed in ({cache_argument})" in r.getMessage() for r in caplog.records)
    assert graph_stats(pair.graphs)["replays"] == 0


def test_capture_failure_falls_back_to_eager(fixture_path, caplog):
    def failing_capture(forward, pool):
        raise RuntimeError("capture refused")

    pair = Pair(fixture_path, "cpu", torch.float32)
    disable_graph_decode(pair.graphs)
    enable_graph_decode(pair.graphs, GraphBackend("cpu", failing_capture))
    inputs = pair.inputs(PROMPTS)
    with caplog.at_level(logging.WARNING, logger="hf_moe_accel"):
        ours, eager = pair.both(inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(ours, eager)
    assert any("capture refused" in r.getMessage() for r in caplog.records)
    assert graph_stats(pair.graphs)["replays"] == 0


def test_unpatch_restores_class_and_stock_generate(fixture_path):
    pair = Pair(fixture_path, "cpu", torch.float32)
    original_class = type(pair.eager)
    assert type(pair.graphs).__name__ == original_class.__name__  # save_pretrained writes this name
    unpatch(pair.graphs)
    assert type(pair.graphs) is original_class and not is_accelerated(pair.graphs)
    assert graph_stats(pair.graphs) is None
    inputs = pair.inputs(PROMPTS[:1])
    assert torch.equal(pair.graphs.generate(**inputs, max_new_tokens=8, do_sample=False), pair.eager.generate(**inputs, max_new_tokens=8, do_sample=False))


def test_cuda_graphs_false_leaves_generate_alone(fixture_path):
    model = AutoModelForCausalLM.from_pretrained(fixture_path, dtype=torch.float32)
    original_class = type(model)
    accelerate(model, cuda_graphs=False)
    assert type(model) is original_class and graph_stats(model) is None


@pytest.mark.parametrize("cuda_here", [True, False])
def test_cpu_model_with_cuda_backend_decodes_eagerly(fixture_path, caplog, monkeypatch, cuda_here):
    """A CPU model on a machine with CUDA gets a warning; without CUDA, accelerate() already said it
    (one info line), so generate() says it at debug level only."""
    tokenizer = AutoTokenizer.from_pretrained(fixture_path)
    model = accelerate(AutoModelForCausalLM.from_pretrained(fixture_path, dtype=torch.float32))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_here)
    with caplog.at_level(logging.DEBUG, logger="hf_moe_accel"):
        model.generate(**tokenizer(PROMPTS[0], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    levels = {r.levelno for r in caplog.records if "the model is on cpu" in r.getMessage()}
    assert levels == ({logging.WARNING} if cuda_here else {logging.DEBUG})


def test_length_buckets_and_pool_eviction(fixture_path):
    assert [length_bucket(n) for n in (1, 256, 257, 1000, 4097)] == [256, 256, 512, 1024, 8192]
    model = AutoModelForCausalLM.from_pretrained(fixture_path, dtype=torch.float32)
    evicted = []
    pool = StaticCachePool(model.config, max_entries=2, on_evict=evicted.append)
    a = pool.get(1, 100)
    assert pool.get(1, 200) is a  # same bucket: reused
    b = pool.get(2, 100)
    c = pool.get(1, 600)
    assert evicted == [a] and pool.owns(b) and pool.owns(c) and len(pool) == 2
    pool.release(b)
    assert evicted == [a, b] and not pool.owns(b)
    with pytest.raises(ValueError):
        StaticCachePool(model.config, max_entries=0)


@pytest.mark.parametrize("setup", SETUPS)
def test_sliding_window_layers_decode_through_graphs(setup):
    """GPT-OSS's sliding-window layers keep their write position in Python, which a replay never
    advances: the pool gives them full-length layers and the model's sliding-window mask keeps the
    window. Prompts longer than the window and 24 new tokens: the graph path's greedy tokens equal
    the eager fused path's over Transformers' own static cache (sliding layers) and stock's."""
    from transformers import AutoConfig

    device, dtype = setup
    config = AutoConfig.for_model("gpt_oss", hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                  num_experts_per_tok=2, vocab_size=128, sliding_window=8)
    assert config.layer_types == ["sliding_attention", "full_attention"]
    torch.manual_seed(0)
    models = [AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval() for _ in range(3)]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    stock, graphs, eager = models
    stock.set_experts_implementation("eager")
    if device == "cpu":
        accelerate(graphs, cuda_graphs=False)
        enable_graph_decode(graphs, GraphBackend("cpu", stand_in_capture))
    else:
        accelerate(graphs)
    accelerate(eager, cuda_graphs=False)
    prompt = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(3)).to(device)
    prompt[1, :3] = 0  # left padding
    mask = (prompt != 0).long()
    kwargs = dict(attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    ours = graphs.generate(prompt, **kwargs)
    assert graph_stats(graphs)["replays"] > 0
    assert torch.equal(ours, eager.generate(prompt, cache_implementation="static", disable_compile=True, **kwargs))
    if device == "cpu":  # float32: stock's own path gives the same tokens (bf16 may part at a near tie)
        assert torch.equal(ours, stock.generate(prompt, **kwargs))


def test_decode_steps_get_the_padded_2d_mask_and_build_the_4d_one_in_the_graph(fixture_path):
    """Served decode steps hand the model the 2D mask padded to the cache length (the captured forward
    builds the 4D mask); with that switched off, the 4D mask generate() builds on the host. Left-padded
    prompts, and one prompt with no padding (a mask of ones, which transformers >= 5.18 drops): tokens
    equal the eager path's every way."""
    pair = Pair(fixture_path, "cpu", torch.float32)
    seen = []

    def note_mask(module, args, kwargs):
        if kwargs.get("input_ids") is not None and kwargs["input_ids"].shape[1] == 1:
            mask = kwargs["attention_mask"]
            seen.append(None if mask is None else tuple(mask.shape))

    pair.graphs.register_forward_pre_hook(note_mask, with_kwargs=True)
    state = decode_state(pair.graphs)
    for prompts in (PROMPTS, PROMPTS[:1]):
        inputs = pair.inputs(prompts)
        batch = len(prompts)
        for in_graph, expected in ((True, (batch, 256)), (False, (batch, 1, 1, 256))):
            state.mask_in_graph = in_graph
            seen.clear()
            ours, eager = pair.both(inputs, max_new_tokens=8, do_sample=False)
            assert torch.equal(ours, eager)
            assert seen and set(seen) == {expected}, (prompts, in_graph, set(seen))


def test_the_mask_stays_generate_s_for_flash_and_flex_attention(fixture_path):
    """Only masks that are plain tensors built by capturable tensor ops move into the graph: for flash
    or flex attention (masks of another kind), and for eager attention before transformers 5.21 (its
    mask copies a zero from the host), a decode step keeps the mask generate() builds."""
    from types import SimpleNamespace

    from transformers import masking_utils

    from hf_moe_accel.graphs.generate import _EAGER_MASK_CAPTURABLE, _graph_decode_mask

    # The version gate matches the installed Transformers: its eager mask makes no tensor from the host.
    assert _EAGER_MASK_CAPTURABLE == ("torch.tensor(" not in inspect.getsource(masking_utils.eager_mask))

    model = AutoModelForCausalLM.from_pretrained(fixture_path, dtype=torch.float32)
    pool = StaticCachePool(model.config)
    cache = pool.get(2, 100)
    state = SimpleNamespace(pool=pool)
    kwargs = dict(inputs_embeds=torch.empty(2, 1, 0), attention_mask=torch.ones(2, 30, dtype=torch.long), cache=cache)
    for implementation, padded in (("sdpa", True), ("eager", _EAGER_MASK_CAPTURABLE), ("flash_attention_2", False),
                                   ("flex_attention", False)):
        config = SimpleNamespace(_attn_implementation=implementation)
        mask = _graph_decode_mask(state, {**kwargs, "config": config})
        assert (mask is not None and mask.shape == (2, 256) and mask[:, :30].all() and not mask[:, 30:].any()) if padded else mask is None
    prefill = {**kwargs, "inputs_embeds": torch.empty(2, 30, 0), "config": SimpleNamespace(_attn_implementation="sdpa")}
    assert _graph_decode_mask(state, prefill) is None


def implementation_bound_capture(model):
    """The stand-in capture, plus what a CUDA graph has and the stand-in lacks: a graph replays the kernels its
    capture ran, so a replay under other attention/experts implementation names than its capture's fails."""

    def names() -> tuple:
        return model.config._attn_implementation, model.config._experts_implementation

    def capture(forward, pool):
        captured = names()
        replay, output = stand_in_capture(forward, pool)

        def bound_replay() -> None:
            assert names() == captured, f"a graph captured under {captured} replayed under {names()}"
            replay()

        return bound_replay, output

    return capture


@pytest.mark.parametrize("switch", ["experts", "attention"])
def test_switching_an_implementation_drops_the_captured_graphs(fixture_path, monkeypatch, switch):
    """set_experts_implementation / set_attn_implementation between generate() calls: the next call drops the
    graphs captured under the old names and captures again; its tokens are stock's with the same choice,
    and switching back to ours gives stock's default tokens again."""
    from hf_moe_accel.patches.attention import DECODE_ATTENTION
    from hf_moe_accel.patches.experts import EXPERTS_IMPLEMENTATION

    from .test_experts_interface import KernelCalls

    kernel_calls = KernelCalls(monkeypatch)
    tokenizer = AutoTokenizer.from_pretrained(fixture_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(fixture_path, dtype=torch.float32).eval()
    stock = AutoModelForCausalLM.from_pretrained(fixture_path, dtype=torch.float32).eval()
    accelerate(model, cuda_graphs=False)
    enable_graph_decode(model, GraphBackend("cpu", implementation_bound_capture(model)))
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    expected = stock.generate(**inputs, **kwargs)
    assert torch.equal(model.generate(**inputs, **kwargs), expected)
    captures = graph_stats(model)["captures"]
    assert captures == 1 and graph_stats(model)["replays"] == 9
    if switch == "experts":
        choices, ours, set_choice = ("eager", "batched_mm"), EXPERTS_IMPLEMENTATION, "set_experts_implementation"
    else:
        choices, ours, set_choice = ("sdpa", "eager"), DECODE_ATTENTION, "set_attn_implementation"
    for choice in choices:
        getattr(model, set_choice)(choice)
        getattr(stock, set_choice)(choice)
        with kernel_calls.refused() if switch == "experts" else contextlib.nullcontext():
            tokens = model.generate(**inputs, **kwargs)
        assert torch.equal(tokens, stock.generate(**inputs, **kwargs)), choice
        captures += 1
        assert graph_stats(model)["captures"] == captures  # captured again under the new names
    getattr(model, set_choice)(ours)
    calls = kernel_calls.count
    assert torch.equal(model.generate(**inputs, **kwargs), expected)
    assert graph_stats(model)["captures"] == captures + 1
    assert switch != "experts" or kernel_calls.count > calls
