"""compile_decode: the decode step under torch.compile, inside the decode graphs (issue 3).

On CPU (CI) the graphs are test_graphs.py's stand-in. torch.compile runs with the `aot_eager` backend
(dynamo's trace, the custom ops' fake implementations, AOTAutograd's functionalisation of the cache
writes: all but inductor's code generation, which costs ~40 s per shape cold on a 2-core CPU), and one
test runs inductor itself on one fixture. The MoE kernels as custom ops are checked against the direct
calls, and with `torch.library.opcheck`.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend
from transformers import AutoModelForCausalLM, AutoTokenizer, CompileConfig

from hf_moe_accel import accelerate, is_accelerated, patch_report, unpatch
from hf_moe_accel.graphs import graph_stats, runner
from hf_moe_accel.graphs.generate import GraphBackend, decode_state, enable_graph_decode
from hf_moe_accel.kernels import (
    Activation,
    ExpertWeights,
    RoutingSpec,
    fused_experts,
    ops,
    route,
)
from hf_moe_accel.kernels.experts_triton import fused_experts_triton
from hf_moe_accel.kernels.routing import route_triton

from .test_graphs import PROMPTS, stand_in_capture

EXPERTS_OP = torch.ops.hf_moe_accel.fused_experts.default
ROUTE_OP = torch.ops.hf_moe_accel.route.default


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Dynamo's compiled code and recompile counts are per process: each test starts from none."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class RecordingBackend:
    """`aot_eager`, keeping every graph dynamo hands it (one per compile when nothing breaks the graph)."""

    def __init__(self):
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return lookup_backend("aot_eager")(graph_module, example_inputs)


class CompiledPair:
    """The same weights twice: `compiled` decodes through compiled-step graph replays, `eager` eagerly."""

    def __init__(self, path, compile_backend):
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.compiled = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.eager = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        accelerate(self.compiled, cuda_graphs=False)
        enable_graph_decode(self.compiled, GraphBackend("cpu", stand_in_capture, compile_backend), compile_decode=True)
        accelerate(self.eager, cuda_graphs=False)

    def check(self, prompts: list[str], new_tokens: int) -> None:
        """Greedy tokens equal the eager fused path's (same static cache layout), logits close."""
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True)
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      return_dict_in_generate=True, output_logits=True)
        ours = self.compiled.generate(**inputs, **kwargs)
        eager = self.eager.generate(**inputs, cache_implementation="static", disable_compile=True, **kwargs)
        assert torch.equal(ours.sequences, eager.sequences)
        for mine, theirs in zip(ours.logits, eager.logits, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def test_compiled_decode_matches_eager(fixture_path):
    """One compile per shape, no graph break, each MoE layer's routing and experts one opaque op each;
    a new cache of a shape already compiled reuses the compiled code."""
    backend = RecordingBackend()
    pair = CompiledPair(fixture_path, backend)
    # return_dict_in_generate hands each call's cache to the caller: every call captures over a new one.
    for prompts in (PROMPTS[:1], PROMPTS, PROMPTS[:1]):
        pair.check(prompts, new_tokens=10)
    stats = graph_stats(pair.compiled)
    assert stats["captures"] == stats["compiled_captures"] == 3 and not stats["failed_compiles"]
    assert stats["replays"] == 3 * 9 and stats["eager_steps"] == 0
    assert stats["compile_seconds"] > 0
    assert len(backend.graphs) == 2  # batch 1 and batch 2; the second batch-1 cache compiled nothing
    report = patch_report(pair.compiled)
    assert len(report.experts) == len(report.routers) == pair.compiled.config.num_hidden_layers
    for graph in backend.graphs:
        targets = [node.target for node in graph.graph.nodes if node.op == "call_function"]
        assert targets.count(EXPERTS_OP) == len(report.experts) and targets.count(ROUTE_OP) == len(report.routers)


def _compiled_step_targets(model, prompt_ids: torch.Tensor) -> list[list]:
    """accelerate() `model` with compile_decode, decode 4 tokens: the call targets of each graph compiled."""
    backend = RecordingBackend()
    accelerate(model, cuda_graphs=False)
    enable_graph_decode(model, GraphBackend("cpu", stand_in_capture, backend), compile_decode=True)
    model.generate(prompt_ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert graph_stats(model)["compiled_captures"] == 1
    return [[str(node.target) for node in graph.graph.nodes if node.op == "call_function"] for graph in backend.graphs]


@pytest.mark.parametrize("fixture_path", ["tiny-qwen3-moe"], indirect=True)
def test_stocks_compiled_generate_first_leaves_our_compiled_step_alone(fixture_path):
    """The bench runs stock's compiled static-cache generate() before ours in one process: our step
    still compiles to the one graph it compiles to in a fresh process, no break."""
    prompt_ids = torch.randint(1, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    fresh = _compiled_step_targets(AutoModelForCausalLM.from_pretrained(fixture_path, dtype=torch.float32).eval(), prompt_ids)
    torch._dynamo.reset()
    model = AutoModelForCausalLM.from_pretrained(fixture_path, dtype=torch.float32).eval()
    stock_compile = CompileConfig(backend="aot_eager")
    stock_compile._compile_all_devices = True  # generate() compiles on GPUs only unless told
    for _ in range(2):
        model.generate(prompt_ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                       cache_implementation="static", compile_config=stock_compile)
    assert hasattr(model, "_compiled_call")  # stock's step did compile
    after_stock = _compiled_step_targets(model, prompt_ids)
    assert len(fresh) == 1 and after_stock == fresh


@pytest.mark.parametrize("fixture_path", ["tiny-qwen3-moe"], indirect=True)
def test_inductor_compiled_decode_matches_eager(fixture_path):
    """Inductor's own code (C++ on CPU) around the custom ops, left-padded batch of two."""
    pair = CompiledPair(fixture_path, "inductor")
    pair.check(PROMPTS, new_tokens=8)
    stats = graph_stats(pair.compiled)
    assert stats["compiled_captures"] == 1 and not stats["failed_compiles"]


def _fallback_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "torch.compile'd decode step failed" in r.getMessage()]


@pytest.mark.parametrize("fixture_path", ["tiny-mixtral"], indirect=True)
def test_compile_failure_captures_the_uncompiled_step(fixture_path, caplog):
    def refusing_backend(graph_module, example_inputs):
        raise RuntimeError("backend refused")

    pair = CompiledPair(fixture_path, refusing_backend)
    with caplog.at_level(logging.WARNING, logger="hf_moe_accel"):
        for prompts in (PROMPTS[:1], PROMPTS):
            pair.check(prompts, new_tokens=6)
    stats = graph_stats(pair.compiled)
    assert stats["captures"] == 2 and stats["compiled_captures"] == 0 and stats["replays"] == 2 * 5
    assert len(stats["failed_compiles"]) == 1 and "backend refused" in next(iter(stats["failed_compiles"]))
    lines = _fallback_lines(caplog)
    assert len(lines) == 1 and "backend refused" in lines[0]  # one line, not one per shape


@pytest.mark.parametrize("fixture_path", ["tiny-mixtral"], indirect=True)
def test_shapes_past_the_recompile_limit_capture_the_uncompiled_step(fixture_path, caplog, monkeypatch):
    """Past dynamo's recompile limit a compiled step would silently run uncompiled: here it fails
    loudly and the graph captures the model itself."""
    monkeypatch.setattr(runner, "RECOMPILE_LIMIT", 1)
    pair = CompiledPair(fixture_path, "aot_eager")
    # The config's own patch, not monkeypatch's setattr and restore: with transformers 5.17 (whose generate()
    # sets the alias cache_size_limit) that left torch 2.13's dynamo raising on recompile_limit in later compiles.
    with torch._dynamo.config.patch(recompile_limit=1), caplog.at_level(logging.WARNING, logger="hf_moe_accel"):
        for prompts in (PROMPTS[:1], PROMPTS):  # batch 1 compiles; batch 2 would be a recompile
            pair.check(prompts, new_tokens=6)
    stats = graph_stats(pair.compiled)
    assert stats["captures"] == 2 and stats["compiled_captures"] == 1
    assert any("recompile_limit" in reason for reason in stats["failed_compiles"])
    assert len(_fallback_lines(caplog)) == 1


@pytest.mark.parametrize("fixture_path", ["tiny-qwen3-moe"], indirect=True)
def test_compile_decode_option(fixture_path):
    model = AutoModelForCausalLM.from_pretrained(fixture_path, dtype=torch.float32).eval()
    with pytest.raises(ValueError, match="needs cuda_graphs=True"):
        accelerate(model, cuda_graphs=False, compile_decode=True)
    with pytest.raises(TypeError, match="compile_decode must be True or False"):
        accelerate(model, compile_decode="yes")
    assert not is_accelerated(model)
    accelerate(model, compile_decode=True)
    assert decode_state(model).runner.compile_backend == "inductor"
    with pytest.raises(ValueError, match="compile_decode"):
        accelerate(model, compile_decode=True)
    unpatch(model)
    accelerate(model)
    assert decode_state(model).runner.compile_backend is None
    unpatch(model)


# ---- the custom ops against the direct kernel calls --------------------------------------------------

ROUTING_SPECS = [
    pytest.param(RoutingSpec(top_k=2, num_experts=8), id="softmax"),
    pytest.param(RoutingSpec(top_k=4, num_experts=16, renormalize=True, weights_dtype=torch.float16), id="softmax-renorm-f16"),
    pytest.param(RoutingSpec(top_k=3, num_experts=16, scoring="sigmoid", renormalize=True, renorm_eps=1e-20, n_group=4,
                             topk_group=2, group_score="top2_sum", has_correction_bias=True, routed_scaling_factor=2.5),
                 id="sigmoid-grouped-bias"),
    pytest.param(RoutingSpec(top_k=4, num_experts=8, scoring="softmax_topk_logits", weights_dtype=torch.float32,
                             expert_threshold=0.2), id="topk-logits-threshold"),
    pytest.param(RoutingSpec(top_k=4, num_experts=8, renormalize=True, expert_threshold=0.3), id="threshold"),
]


@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("spec", ROUTING_SPECS)
def test_route_op_matches_direct_call(spec, tokens):
    generator = torch.Generator().manual_seed(tokens)
    logits = torch.randn(tokens, spec.num_experts, generator=generator)
    bias = torch.randn(spec.num_experts, generator=generator) if spec.has_correction_bias else None
    weights, ids = ops.route(logits, spec, bias)
    direct_weights, direct_ids = route(logits, spec, bias)
    assert torch.equal(weights, direct_weights) and torch.equal(ids, direct_ids)
    # The fake implementation gives what both paths give (the Triton one here in its interpreter).
    with torch._subclasses.FakeTensorMode() as mode:
        fake = ops.route(mode.from_tensor(logits), spec, None if bias is None else mode.from_tensor(bias))
    for out in (route_triton(logits, spec, bias), (weights, ids)):
        assert [(t.shape, t.dtype) for t in out] == [(t.shape, t.dtype) for t in fake]
    torch.library.opcheck(ROUTE_OP, _route_args(logits, spec, bias))


def _route_args(logits, spec: RoutingSpec, bias) -> tuple:
    return (logits, bias, spec.top_k, spec.num_experts, spec.scoring, spec.renormalize, spec.renorm_eps, spec.n_group,
            spec.topk_group, spec.group_score, spec.has_correction_bias, spec.routed_scaling_factor, spec.weights_dtype,
            spec.expert_threshold)


def _experts_args(hidden, weights: ExpertWeights, ids, topk_weights) -> tuple:
    act = weights.activation
    return (hidden, weights.gate_up, weights.down, weights.gate_up_bias, weights.down_bias, weights.transposed,
            weights.interleaved, weights.has_gate, act.kind, act.alpha, act.limit, ids, topk_weights)


def _expert_weights(layout: str, generator: torch.Generator) -> ExpertWeights:
    experts, hidden, inter = 4, 32, 24

    def rand(*shape):
        return torch.randn(*shape, generator=generator) / shape[-1] ** 0.5

    if layout == "default":
        return ExpertWeights(rand(experts, 2 * inter, hidden), rand(experts, hidden, inter))
    if layout == "gpt-oss":  # transposed, interleaved gate/up, biases, clamped SwiGLU
        return ExpertWeights(rand(experts, hidden, 2 * inter), rand(experts, inter, hidden), rand(experts, 2 * inter),
                             rand(experts, hidden), transposed=True, interleaved=True,
                             activation=Activation("swiglu_oai", alpha=1.702, limit=1.0))
    return ExpertWeights(rand(experts, inter, hidden), rand(experts, hidden, inter), has_gate=False,
                         activation=Activation("relu2"))


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("layout", ["default", "gpt-oss", "ungated-relu2"])
def test_experts_op_matches_direct_call(layout, tokens):
    generator = torch.Generator().manual_seed(tokens)
    weights = _expert_weights(layout, generator)
    hidden = torch.randn(tokens, weights.hidden_size, generator=generator)
    ids = torch.randint(0, weights.num_experts, (tokens, 2), generator=generator)
    ids[0, 1] = -1  # a dropped pair: adds nothing
    topk_weights = torch.rand(tokens, 2, generator=generator)
    out = ops.fused_experts(hidden, weights, ids, topk_weights)
    assert torch.equal(out, fused_experts(hidden, weights, ids, topk_weights))
    triton_out = fused_experts_triton(hidden, weights, ids, topk_weights)  # interpreted on CPU
    assert (triton_out.shape, triton_out.dtype) == (out.shape, out.dtype)
    torch.testing.assert_close(triton_out, out, rtol=1e-4, atol=1e-5)
    torch.library.opcheck(EXPERTS_OP, _experts_args(hidden, weights, ids, topk_weights))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 3, 64])
def test_ops_on_cuda_give_the_triton_kernels_results(tokens):
    """bf16 on a GPU (olmoe-like layer): the ops run the Triton kernels, bit for bit (no atomics), and pass opcheck."""
    generator = torch.Generator().manual_seed(tokens)
    spec = RoutingSpec(top_k=8, num_experts=64, weights_dtype=torch.bfloat16)
    logits = torch.randn(tokens, 64, generator=generator).to("cuda", torch.bfloat16)
    weights, ids = ops.route(logits, spec)
    direct_weights, direct_ids = route(logits, spec)
    assert torch.equal(weights, direct_weights) and torch.equal(ids, direct_ids)
    torch.library.opcheck(ROUTE_OP, _route_args(logits, spec, None))
    experts = ExpertWeights(*(torch.randn(*shape, generator=generator).div(shape[-1] ** 0.5).to("cuda", torch.bfloat16)
                              for shape in ((64, 2 * 1024, 2048), (64, 2048, 1024))))
    hidden = torch.randn(tokens, 2048, generator=generator).to("cuda", torch.bfloat16)
    out = ops.fused_experts(hidden, experts, ids, weights)
    assert out.dtype == torch.bfloat16 and torch.equal(out, fused_experts(hidden, experts, ids, weights))
    torch.library.opcheck(EXPERTS_OP, _experts_args(hidden, experts, ids, weights))
