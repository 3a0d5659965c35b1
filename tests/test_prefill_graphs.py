"""Prefill graphs (graphs/prefill.py): in a generate() call that graphs serve, the prefill replays a graph
captured for a bucket of prompt lengths (inputs right-padded to it), and every path gives the tokens of
an eager prefill on the same weights.

On CPU the graph backend is test_graphs.py's stand-in (a CUDA graph's semantics: inputs read from the
captured buffers at replay, outputs overwritten in place) and the fixtures run in float32: tokens must
equal the eager fused path's and stock's. On a GPU (`-m gpu`) real CUDA graphs capture the bfloat16
fixtures; padding changes the shapes the prefill's kernels run at, so the judge there is the same model
with prefill graphs switched off (HF_MOE_ACCEL_PREFILL_GRAPHS=0): logits equal to bf16 accuracy, and greedy
tokens equal up to the step where the two part, if they do, at a near tie.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_moe_accel import unpatch
from hf_moe_accel.graphs import graph_stats, prefill
from hf_moe_accel.graphs.generate import (
    GraphBackend,
    decode_state,
    disable_graph_decode,
    enable_graph_decode,
)
from hf_moe_accel.graphs.hooks import DecodeHooks
from hf_moe_accel.graphs.prefill import ENV_SWITCH, prefill_bucket

from .test_graphs import SETUPS, Pair, implementation_bound_capture, stand_in_capture

LENGTHS = (1, 5, 16, 17, 100)
BATCHES = (1, 3)
NEW_TOKENS = 4


class Prompts:
    """Prompts cut from the fixture's held-out text, so that the trained model's next tokens are clear."""

    def __init__(self, path, tokenizer, device: str):
        self.tokens = tokenizer((path / "heldout.txt").read_text()[:20000], return_tensors="pt").input_ids[0]
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.device = device

    def batch(self, batch: int, length: int) -> dict:
        """`batch` (up to 3) prompts, left-padded to `length`: rows of `length`, `length` - 2 and `length` // 2
        tokens (at least 1), each cut from its own place in the text."""
        lengths = [max(1, real) for real in (length, length - 2, length // 2)[:batch]]
        ids = torch.full((batch, length), self.pad, dtype=torch.long)
        mask = torch.zeros(batch, length, dtype=torch.long)
        for row, real in enumerate(lengths):
            start = 37 + 251 * row
            ids[row, length - real:] = self.tokens[start : start + real]
            mask[row, length - real:] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}


class Setup:
    """The graph path (`pair.graphs`) and its judges, on the same weights: on CPU the eager fused path with a
    static cache (`pair.eager`) and stock; on a GPU the graph model itself with prefill graphs off."""

    def __init__(self, path, device: str, dtype: torch.dtype, monkeypatch):
        self.pair = Pair(path, device, dtype)
        self.device = device
        self.monkeypatch = monkeypatch
        self.prompts = Prompts(path, self.pair.tokenizer, device)
        self.stock = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval() if device == "cpu" else None

    def ours(self, inputs: dict, seed: int | None = None, **kwargs):
        return _generate(self.pair.graphs, inputs, seed, **kwargs)

    def eager_prefill(self, inputs: dict, seed: int | None = None, **kwargs):
        if self.device == "cpu":
            return _generate(self.pair.eager, inputs, seed, cache_implementation="static", disable_compile=True, **kwargs)
        with self.monkeypatch.context() as patch:
            patch.setenv(ENV_SWITCH, "0")
            return _generate(self.pair.graphs, inputs, seed, **kwargs)

    def check(self, inputs: dict, seed: int | None = None, **kwargs) -> None:
        """Ours against the eager prefill (and stock's greedy tokens on CPU)."""
        kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=self.prompts.pad, **kwargs)
        if self.device == "cpu":
            ours, eager = self.ours(inputs, seed, **kwargs), self.eager_prefill(inputs, seed, **kwargs)
            assert torch.equal(ours, eager), (inputs["input_ids"].shape, seed)
            if seed is None:
                assert torch.equal(ours, _generate(self.stock, inputs, None, **kwargs))
            return
        kwargs.update(return_dict_in_generate=True, output_logits=True)
        ours, eager = self.ours(inputs, seed, **kwargs), self.eager_prefill(inputs, seed, **kwargs)
        _check_equal_up_to_a_near_tie(ours, eager, inputs["input_ids"].shape[1])


def _generate(model, inputs: dict, seed: int | None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=0.9, top_k=40)
    else:
        kwargs.update(do_sample=False)
    return model.generate(**inputs, **kwargs)


def _check_equal_up_to_a_near_tie(ours, reference, prompt_len: int) -> None:
    """bf16: up to and including the step where two generations part (if they do), both saw the same tokens,
    so there the logits must agree to bf16 accuracy."""
    differs = (ours.sequences[:, prompt_len:] != reference.sequences[:, prompt_len:]).any(0).nonzero()
    steps = len(reference.logits) if not differs.numel() else differs[0].item() + 1
    for step in range(steps):
        mine, theirs = ours.logits[step].float(), reference.logits[step].float()
        error = ((mine - theirs).norm() / theirs.norm()).item()
        assert error < 2e-2, f"step {step}: logits differ by {error:.2e}"


@pytest.fixture(params=SETUPS)
def setup(request, fixture_path, monkeypatch) -> Setup:
    device, dtype = request.param
    return Setup(fixture_path, device, dtype, monkeypatch)


def _prefill_graphs_held(model) -> int:
    return sum(1 for key in decode_state(model).runner._steps if key[1] == "prefill")


def test_buckets():
    assert [prefill_bucket(n) for n in (1, 15, 16, 17, 100, 1024, 2048)] == [16, 16, 16, 32, 128, 1024, 2048]


def test_prefill_replays_give_the_eager_prefill_s_tokens(setup):
    """Prompts of 1, 5, 16, 17 and 100 tokens (buckets 16, 16, 16, 32, 128), one prompt and three left-padded
    ones, greedy and sampled (seeded): each served call's prefill is a graph replay, and the tokens are the
    eager prefill's (and, greedy, stock's)."""
    for length in LENGTHS:
        for batch in BATCHES:
            for seed in (None, 1000 + length + batch):
                before = graph_stats(setup.pair.graphs)
                setup.check(setup.prompts.batch(batch, length), seed=seed)
                after = graph_stats(setup.pair.graphs)
                assert after["prefill_replays"] == before["prefill_replays"] + 1, (length, batch, seed)
                # the GPU's judge is the same model with prefill graphs off: one eager prefill per check there
                assert after["eager_prefills"] == before["eager_prefills"] + (setup.device == "cuda"), (length, batch)
    assert graph_stats(setup.pair.graphs)["replays"] > 0  # decode steps replayed their own graphs after each prefill


def test_the_cache_holds_the_real_prompt_after_a_prefill_replay(setup):
    """After one prefill replay (max_new_tokens=1: nothing decoded) every layer's write position is the real
    length L, so decode overwrites the pads from L on; the pads were written up to the bucket, nothing past
    it; the first token's logits are the eager prefill's."""
    length, bucket = 17, 32
    inputs = setup.prompts.batch(3, length)
    kwargs = dict(max_new_tokens=1, do_sample=False, pad_token_id=setup.prompts.pad, return_dict_in_generate=True,
                  output_logits=True)
    ours, eager = setup.ours(inputs, **kwargs), setup.eager_prefill(inputs, **kwargs)
    assert graph_stats(setup.pair.graphs)["prefill_replays"] == 1
    cache = getattr(ours, "cache", None) or ours.past_key_values  # returned to us: the pool let it go
    for layer in cache.layers:
        assert int(layer.cumulative_length) == length
        assert layer.keys[:, :, length:bucket].abs().sum() > 0 and not layer.keys[:, :, bucket:].any()
    tolerance = dict(rtol=1e-4, atol=1e-4) if setup.device == "cpu" else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours.logits[0], eager.logits[0], **tolerance)


def test_repeated_calls_replay_one_graph_per_bucket(setup):
    """Prompts of 17, 20, 32 and 17 tokens share bucket 32: one capture, then replays with new inputs."""
    model, prompts = setup.pair.graphs, setup.prompts
    for length in (17, 20, 32, 17):
        inputs = prompts.batch(1, length)
        ours = setup.ours(inputs, max_new_tokens=2, pad_token_id=prompts.pad)
        if setup.device == "cpu":  # on a GPU the sweep above judges the tokens (bf16: to a near tie)
            assert torch.equal(ours, setup.eager_prefill(inputs, max_new_tokens=2, pad_token_id=prompts.pad))
    stats = graph_stats(model)
    assert stats["prefill_captures"] == 1 and stats["prefill_replays"] == 4 and stats["eager_prefills"] == 0
    setup.ours(prompts.batch(1, 33), max_new_tokens=2, pad_token_id=prompts.pad)  # the next bucket (64)
    assert graph_stats(model)["prefill_captures"] == 2 and _prefill_graphs_held(model) == 2


def test_prompts_above_the_token_cap_prefill_eagerly(setup, monkeypatch, caplog):
    """batch x bucket above PREFILL_TOKEN_CAP (lowered here to 32): the prefill runs eagerly, the decode steps
    still replay, and the tokens are the eager prefill's; at the cap itself the graph serves."""
    monkeypatch.setattr(prefill, "PREFILL_TOKEN_CAP", 32)
    model = setup.pair.graphs
    with caplog.at_level(logging.DEBUG, logger="hf_moe_accel"):
        for batch, length, served in ((1, 32, True), (1, 33, False), (3, 10, False), (2, 16, True)):
            before = graph_stats(model)
            setup.check(setup.prompts.batch(batch, length))
            after = graph_stats(model)
            assert after["prefill_replays"] - before["prefill_replays"] == served, (batch, length)
    assert any("PREFILL_TOKEN_CAP=32" in r.getMessage() for r in caplog.records)


HOST_WORK = {  # a placement's hooks, and whether generate() calls are still served (decode graphs)
    "step_blocker": (DecodeHooks(step_blocker=lambda batch, tokens: None), True),  # zero-copy offload's kind
    "before_replay": (DecodeHooks(before_replay=lambda: None), True),
    "rehearsal": (DecodeHooks(rehearsal=contextlib.nullcontext), True),
    "blocked_reason": (DecodeHooks(blocked_reason="every MoE layer talks to the host"), False),  # the whole call eager
}


def test_a_placement_with_host_work_keeps_prefill_eager(fixture_path):
    """Hooks speak for decode steps; a placement with any host work (offload fills expert slots during a
    prefill) keeps its prefill eager, while its decode steps may replay graphs."""
    pair = Pair(fixture_path, "cpu", torch.float32)
    prompts = Prompts(fixture_path, pair.tokenizer, "cpu")
    inputs = prompts.batch(3, 17)
    for name, (hooks, served) in HOST_WORK.items():
        disable_graph_decode(pair.graphs)
        enable_graph_decode(pair.graphs, GraphBackend("cpu", stand_in_capture), hooks=hooks)
        ours, eager = pair.both(inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=prompts.pad)
        assert torch.equal(ours, eager), name
        stats = graph_stats(pair.graphs)
        assert stats["prefill_captures"] == stats["prefill_replays"] == 0, name
        assert stats["eager_prefills"] == served and (stats["replays"] > 0) == served, name


def test_zero_copy_offload_keeps_prefill_eager():
    """Expert offload (CPU standing in for the GPU side) with zero-copy decode: its decode steps replay
    graphs, its prefill (which fills the expert slots from the host) runs eagerly; tokens equal stock's."""
    from hf_moe_accel import accelerate
    from hf_moe_accel.offload.engine import decode_hooks

    from .test_offload import _tiny_model, options, random_sequences

    model = _tiny_model("qwen3_moe")
    prompt = random_sequences(model, 1, 6)
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    stock = model.generate(prompt, **kwargs)
    accelerate(model, gpu_memory="1GiB", cuda_graphs=False,
               offload=options(slots_per_layer=3, zero_copy=True, zero_copy_max_tokens=2, kv_cache_tokens=300))
    enable_graph_decode(model, GraphBackend("cpu", stand_in_capture), hooks=decode_hooks(model))
    assert torch.equal(model.generate(prompt, **kwargs), stock)
    stats = graph_stats(model)
    assert stats["replays"] == 4 and stats["eager_prefills"] == 1
    assert stats["prefill_captures"] == stats["prefill_replays"] == 0


@pytest.mark.parametrize("switch", ["attention", "experts"])
def test_switching_an_implementation_drops_the_prefill_graphs(fixture_path, switch):
    """A graph replays the kernels its capture ran (the bound capture fails any other replay): after
    set_attn_implementation / set_experts_implementation the prefill is captured again, tokens stay stock's."""
    from hf_moe_accel.patches.attention import DECODE_ATTENTION
    from hf_moe_accel.patches.experts import EXPERTS_IMPLEMENTATION

    pair = Pair(fixture_path, "cpu", torch.float32)
    disable_graph_decode(pair.graphs)
    enable_graph_decode(pair.graphs, GraphBackend("cpu", implementation_bound_capture(pair.graphs)))
    stock = AutoModelForCausalLM.from_pretrained(fixture_path, dtype=torch.float32).eval()
    prompts = Prompts(fixture_path, pair.tokenizer, "cpu")
    inputs = prompts.batch(3, 17)
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=prompts.pad)
    expected = stock.generate(**inputs, **kwargs)
    assert torch.equal(pair.graphs.generate(**inputs, **kwargs), expected)
    assert graph_stats(pair.graphs)["prefill_captures"] == 1
    set_choice, other, ours = (("set_attn_implementation", "sdpa", DECODE_ATTENTION) if switch == "attention"
                               else ("set_experts_implementation", "eager", EXPERTS_IMPLEMENTATION))
    for model in (pair.graphs, stock):
        getattr(model, set_choice)(other)
    assert torch.equal(pair.graphs.generate(**inputs, **kwargs), stock.generate(**inputs, **kwargs))
    assert graph_stats(pair.graphs)["prefill_captures"] == 2 and _prefill_graphs_held(pair.graphs) == 1
    getattr(pair.graphs, set_choice)(ours)
    assert torch.equal(pair.graphs.generate(**inputs, **kwargs), expected)
    assert graph_stats(pair.graphs)["prefill_captures"] == 3 and _prefill_graphs_held(pair.graphs) == 1


def test_the_environment_switch(setup):
    """HF_MOE_ACCEL_PREFILL_GRAPHS=0 runs prefill eagerly (the A/B); unset, graphs again; a typo raises."""
    model, inputs = setup.pair.graphs, setup.prompts.batch(3, 17)
    setup.check(inputs)
    stats = graph_stats(model)
    with setup.monkeypatch.context() as patch:
        patch.setenv(ENV_SWITCH, "0")
        setup.check(inputs)
        assert graph_stats(model)["prefill_replays"] == stats["prefill_replays"]
        assert graph_stats(model)["eager_prefills"] > stats["eager_prefills"]
        patch.setenv(ENV_SWITCH, "of")
        with pytest.raises(ValueError, match=ENV_SWITCH):
            setup.ours(inputs, max_new_tokens=1)
    setup.ours(inputs, max_new_tokens=1)
    assert graph_stats(model)["prefill_replays"] > stats["prefill_replays"]


def test_what_prefill_graphs_leave_eager(fixture_path):
    """Chunked prefill, hidden states kept per position, embeddings passed in, a cache passed in (the whole
    call eager): the prefill runs eagerly and the tokens are the eager path's."""
    from transformers import DynamicCache

    pair = Pair(fixture_path, "cpu", torch.float32)
    prompts = Prompts(fixture_path, pair.tokenizer, "cpu")
    inputs = prompts.batch(3, 17)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=prompts.pad)
    embeds = {"inputs_embeds": pair.graphs.get_input_embeddings()(inputs["input_ids"]),
              "attention_mask": inputs["attention_mask"]}
    hidden_states = {"output_hidden_states": True, "return_dict_in_generate": True}
    for extra, call_inputs in (({"prefill_chunk_size": 8}, inputs), (hidden_states, inputs), ({}, embeds)):
        ours, eager = pair.both(call_inputs, **kwargs, **extra)
        ours, eager = (ours.sequences, eager.sequences) if extra is hidden_states else (ours, eager)
        assert torch.equal(ours, eager), extra
    stats = graph_stats(pair.graphs)
    assert stats["prefill_replays"] == 0 and stats["eager_prefills"] == 3 and stats["replays"] > 0
    ours = pair.graphs.generate(**inputs, **kwargs, past_key_values=DynamicCache(config=pair.graphs.config))
    assert torch.equal(ours, pair.eager.generate(**inputs, **kwargs))
    assert graph_stats(pair.graphs)["eager_prefills"] == 3  # not a served call at all


def test_prefill_graphs_go_with_their_cache_and_stay_bounded(fixture_path, monkeypatch):
    """The pool evicting a cache drops its prefill graphs with its decode graphs; at most MAX_PREFILL_GRAPHS are
    kept (lowered here to 2), least recently used out; unpatch drops them all."""
    monkeypatch.setattr(prefill, "MAX_PREFILL_GRAPHS", 2)
    pair = Pair(fixture_path, "cpu", torch.float32)
    prompts = Prompts(fixture_path, pair.tokenizer, "cpu")
    model, state = pair.graphs, decode_state(pair.graphs)
    for batch in (1, 2, 3, 4):  # four caches in a pool of three: the first is evicted
        model.generate(**prompts.batch(batch, 5), max_new_tokens=2, do_sample=False, pad_token_id=prompts.pad)
    pooled = {id(cache) for cache in state.pool._caches.values()}
    assert state.runner.caches_with_graphs() <= pooled
    assert _prefill_graphs_held(model) == 2
    held = {key[3] for key in state.runner._steps if key[1] == "prefill"}
    assert held == {3, 4}  # the batches used last
    runner = state.runner
    unpatch(model)
    assert runner.graphs_held() == 0 and graph_stats(model) is None


def test_prompts_as_the_tokenizer_pads_them(fixture_path):
    """A call through the tokenizer's own padding (left) and a single unpadded prompt, as users write them."""
    pair = Pair(fixture_path, "cpu", torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(fixture_path, padding_side="left")
    for prompts in (["def main("], ["def main(", "import os\nimport sys\n\nclass Config:\n    "]):
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
        ours, eager = pair.both(inputs, max_new_tokens=8, do_sample=False)
        assert torch.equal(ours, eager)
    assert graph_stats(pair.graphs)["prefill_replays"] == 2
