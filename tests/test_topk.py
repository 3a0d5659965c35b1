"""Fewer activated experts: `accelerate(model, top_k=..., expert_threshold=...)`.

Static top-k is checked against stock Transformers with its routers' top_k changed; the threshold
rule against hand-made routing cases (reference and Triton kernel) and, end to end, against stock
with the dropped experts' weights zeroed in plain torch.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from hf_moe_accel import accelerate, is_accelerated, unpatch
from hf_moe_accel.graphs import graph_stats
from hf_moe_accel.kernels.routing import route_triton
from hf_moe_accel.kernels.routing_reference import route_reference
from hf_moe_accel.kernels.spec import RoutingSpec
from hf_moe_accel.quality.selection import moe_layers

from .helpers import load_fixture, module_classes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tokens(seed: int = 0, shape: tuple[int, int] = (2, 24)) -> torch.Tensor:
    return torch.randint(0, 1000, shape, generator=torch.Generator().manual_seed(seed))


def _routers(model) -> list[torch.nn.Module]:
    return [router for _, router in moe_layers(model)]


def _stock_routers(model) -> list[torch.nn.Module]:
    return [m for name, m in model.named_modules() if name.endswith(".gate") and hasattr(m, "top_k")]


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids.to(model.device)).logits.float()


# ---------------------------------------------------------------------------------------------
# The threshold rule on hand-made routing cases: counts and renormalisation worked out by hand.


def _logits_for_probs(probs: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is exactly proportional to `probs` (each row sums to 1)."""
    return torch.tensor(probs, dtype=torch.float64).log().float()


# Top-4 of 6 experts. Row 0: top-4 probs 0.4, 0.3, 0.2, 0.05 (normalised over the four: 0.421,
# 0.316, 0.211, 0.053). Row 1: four equal probs 0.24 (0.25 each). Row 2: one dominant expert.
PROBS = [
    [0.05, 0.4, 0.02, 0.3, 0.2, 0.03],
    [0.24, 0.02, 0.24, 0.24, 0.02, 0.24],
    [0.01, 0.01, 0.9, 0.03, 0.03, 0.02],
]


def _spec(**kw) -> RoutingSpec:
    return RoutingSpec(**{"top_k": 4, "num_experts": 6, "scoring": "softmax", **kw})


def _both(logits: torch.Tensor, spec: RoutingSpec, bias: torch.Tensor | None = None):
    """(reference, Triton) routing of the same logits; the Triton one in the interpreter on CPU."""
    ref = route_reference(logits.to(DEVICE), spec, bias)
    out = route_triton(logits.to(DEVICE), spec, bias)
    return ref, out


def _as_dict(weights: torch.Tensor, ids: torch.Tensor) -> list[dict[int, float]]:
    """Per token {expert: weight} of the kept experts; dropped slots must be id -1 with weight 0."""
    rows = []
    for w_row, id_row in zip(weights.float().cpu().tolist(), ids.cpu().tolist()):
        assert all(w == 0.0 for w, e in zip(w_row, id_row) if e == -1)
        rows.append({e: w for w, e in zip(w_row, id_row) if e != -1})
    return rows


def _assert_routing(got: list[dict[int, float]], expected: list[dict[int, float]]) -> None:
    assert [sorted(r) for r in got] == [sorted(r) for r in expected]
    for g, e in zip(got, expected):
        for expert in e:
            assert math.isclose(g[expert], e[expert], rel_tol=1e-5), (g, e)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_threshold_renormalised_family(impl: str) -> None:
    """renormalize=True (Mixtral, Qwen3 with norm_topk_prob): kept weights renormalised to sum 1."""
    ref, out = _both(_logits_for_probs(PROBS), _spec(renormalize=True, expert_threshold=0.2))
    expected = [
        {1: 0.4 / 0.9, 3: 0.3 / 0.9, 4: 0.2 / 0.9},  # 0.053 < 0.2 dropped
        {0: 0.25, 2: 0.25, 3: 0.25, 5: 0.25},  # 0.25 >= 0.2: all kept
        {2: 1.0},  # 0.918 kept, the rest dropped
    ]
    _assert_routing(_as_dict(*(ref if impl == "reference" else out)), expected)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_threshold_keeps_the_largest_when_all_are_under(impl: str) -> None:
    """Four equal weights (0.25 each) under t=0.3: only the first of the tied largest stays, weight 1."""
    ref, out = _both(_logits_for_probs(PROBS), _spec(renormalize=True, expert_threshold=0.3))
    weights, ids = ref if impl == "reference" else out
    got = _as_dict(weights, ids)
    _assert_routing([got[0], got[2]], [{1: 0.4 / 0.7, 3: 0.3 / 0.7}, {2: 1.0}])
    assert list(got[1].values()) == pytest.approx([1.0])
    assert ids[1, 0].item() in got[1], "the first slot (the first of the tied largest) is the one kept"


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_threshold_without_renormalisation_keeps_raw_probs(impl: str) -> None:
    """renormalize=False (OLMoE, Qwen with norm_topk_prob=False): the kept probabilities unchanged (then
    scaled), the threshold read on the weights normalised over the k chosen."""
    ref, out = _both(_logits_for_probs(PROBS), _spec(expert_threshold=0.3, routed_scaling_factor=2.0))
    weights, ids = ref if impl == "reference" else out
    got = _as_dict(weights, ids)
    _assert_routing([got[0], got[2]], [{1: 0.8, 3: 0.6}, {2: 1.8}])  # 0.316 >= 0.3 kept, 0.211 dropped
    assert list(got[1].values()) == pytest.approx([0.48])  # all at 0.25: the first kept, 0.24 * 2


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_threshold_softmax_over_kept_logits(impl: str) -> None:
    """GPT-OSS: softmax over the chosen logits; after dropping, the softmax over the kept logits."""
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0, 3.0, -5.0]])
    spec = RoutingSpec(top_k=3, num_experts=6, scoring="softmax_topk_logits", expert_threshold=0.2)
    ref, out = _both(logits, spec)
    # softmax(3, 2, 1) = 0.665, 0.245, 0.090: expert 2 dropped; softmax(3, 2) = 0.731, 0.269.
    kept = torch.softmax(torch.tensor([3.0, 2.0]), dim=0).tolist()
    _assert_routing(_as_dict(*(ref if impl == "reference" else out)), [{4: kept[0], 0: kept[1]}])


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_threshold_with_correction_bias_keeps_the_largest_weight(impl: str) -> None:
    """A selection bias can put a smaller weight in the first slot: the largest unbiased weight is the
    one kept when all are under the threshold."""
    logits = torch.logit(torch.tensor([[0.6, 0.5, 0.45, 1e-4]]))
    bias = torch.tensor([0.0, 0.0, 1.0, 0.0], device=DEVICE)  # selection order: expert 2, 0, 1
    spec = RoutingSpec(top_k=3, num_experts=4, scoring="sigmoid", has_correction_bias=True, renormalize=True,
                       renorm_eps=1e-20, expert_threshold=0.4)
    ref, out = _both(logits, spec, bias)
    weights, ids = ref if impl == "reference" else out
    assert ids[0, 0].item() in (2, -1) and ids[0, 1].item() == 0
    # Normalised: 0.6 / 1.55 = 0.387, 0.5 / 1.55 = 0.323, 0.45 / 1.55 = 0.290, all under 0.4.
    _assert_routing(_as_dict(weights, ids), [{0: 1.0}])


def test_zero_threshold_changes_nothing() -> None:
    logits = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
    spec = RoutingSpec(top_k=4, num_experts=12, renormalize=True)
    for impl in (route_reference, route_triton):
        base = impl(logits.to(DEVICE), spec)
        zero = impl(logits.to(DEVICE), replace(spec, expert_threshold=0.0))
        assert all(torch.equal(a, b) for a, b in zip(base, zero))


# ---------------------------------------------------------------------------------------------
# End to end on the trained fixtures.


def test_full_top_k_is_stock(fixture_path) -> None:
    model, _ = load_fixture(fixture_path)
    ids = _tokens()
    stock = _logits(model, ids)
    accelerate(model, top_k=model.config.num_experts_per_tok)
    torch.testing.assert_close(_logits(model, ids), stock, rtol=1e-4, atol=1e-4)


def test_smaller_top_k_is_stock_with_that_top_k(fixture_path) -> None:
    model, _ = load_fixture(fixture_path)
    ids = _tokens(1)
    full = _logits(model, ids)
    for top_k in range(1, model.config.num_experts_per_tok):
        for router in _stock_routers(model):
            router.top_k = top_k
        stock = _logits(model, ids)
        for router in _stock_routers(model):
            router.top_k = model.config.num_experts_per_tok
        accelerate(model, top_k=top_k)
        ours = _logits(model, ids)
        unpatch(model)
        torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4)
        assert (ours - full).abs().max() > 1e-2, f"top_k={top_k} should change the logits"


def test_top_k_per_layer(fixture_path) -> None:
    model, _ = load_fixture(fixture_path)
    routers = _stock_routers(model)
    per_layer = [1 + i % model.config.num_experts_per_tok for i in range(len(routers))]
    ids = _tokens(2)
    for router, top_k in zip(routers, per_layer):
        router.top_k = top_k
    stock = _logits(model, ids)
    for router in routers:
        router.top_k = model.config.num_experts_per_tok
    accelerate(model, top_k=per_layer)
    torch.testing.assert_close(_logits(model, ids), stock, rtol=1e-4, atol=1e-4)


def _zero_dropped(router, threshold: float):
    """The stock router, then the threshold rule in plain torch for a renormalising family: dropped
    experts keep their id with weight 0 (the stock experts compute them, times 0)."""
    stock_forward = router.forward

    def forward(hidden_states):
        logits, weights, ids = stock_forward(hidden_states)
        keep = weights >= threshold * weights.sum(dim=-1, keepdim=True)
        keep |= torch.arange(weights.shape[1]) == weights.argmax(dim=-1, keepdim=True)
        kept = weights * keep
        return logits, (kept / kept.sum(dim=-1, keepdim=True)).to(weights.dtype), ids

    return forward


@pytest.mark.parametrize("threshold", [0.15, 0.35])
def test_threshold_is_stock_with_dropped_weights_zeroed(fixture_path, threshold: float) -> None:
    model, _ = load_fixture(fixture_path)
    ids = _tokens(3)
    with torch.no_grad():
        routers = _stock_routers(model)
        assert routers and all(r.norm_topk_prob if hasattr(r, "norm_topk_prob") else True for r in routers)
        for router in routers:
            router.forward = _zero_dropped(router, threshold)
        stock = _logits(model, ids)
        for router in routers:
            del router.forward
        accelerate(model, expert_threshold=threshold)
        counts = []
        hooks = [r.register_forward_hook(lambda m, a, out: counts.append((out[2] >= 0).sum(-1))) for r in _routers(model)]
        ours = _logits(model, ids)
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4)
    counts = torch.cat(counts)
    assert counts.min() >= 1 and counts.max() <= model.config.num_experts_per_tok
    assert counts.float().mean() < model.config.num_experts_per_tok, "the threshold should drop some experts"


def test_unpatch_undoes_the_options(fixture_path) -> None:
    model, _ = load_fixture(fixture_path)
    ids = _tokens(4)
    stock, classes = _logits(model, ids), module_classes(model)
    accelerate(model, top_k=1, expert_threshold=0.5)
    unpatch(model)
    assert module_classes(model) == classes
    assert all(r.top_k == model.config.num_experts_per_tok for r in _stock_routers(model))
    assert torch.equal(_logits(model, ids), stock)
    accelerate(model)  # a later plain accelerate() runs the full top-k
    torch.testing.assert_close(_logits(model, ids), stock, rtol=1e-4, atol=1e-4)


def test_router_logits_still_recorded(fixture_path) -> None:
    model, _ = load_fixture(fixture_path)
    ids = _tokens(5)
    with torch.no_grad():
        for router in _stock_routers(model):
            router.top_k = 1
        stock = model(ids, output_router_logits=True).router_logits
        for router in _stock_routers(model):
            router.top_k = model.config.num_experts_per_tok
        accelerate(model, top_k=1)
        ours = model(ids, output_router_logits=True).router_logits
    assert len(ours) == len(stock) == model.config.num_hidden_layers
    for a, b in zip(ours, stock):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Other routing rules, on the tiny random models of test_families.


def _family(name: str):
    from . import test_families

    case = next(c for c in test_families.CASES if c.name == name)
    model = test_families.build(case)
    routers = [test_families.router_of(model, n) for n, _ in test_families.experts_modules(model)]
    return model, routers, test_families.input_ids()


@pytest.mark.parametrize(
    "name, top_k", [("deepseek_v3", 2), ("deepseek_v2-grouped", 1), ("gpt_oss", 1), ("openai_privacy_filter", 2)]
)
def test_static_top_k_other_families(name: str, top_k: int) -> None:
    """Grouped top-k with a correction bias, top-k over logits, the privacy filter's 1/k scale."""
    from .test_families import forward, main_output, rel_max_error

    model, routers, ids = _family(name)
    own = routers[0].top_k
    for router in routers:
        router.top_k = top_k
    stock = main_output(forward(model, ids))
    for router in routers:
        router.top_k = own
    accelerate(model, top_k=top_k)
    assert rel_max_error(main_output(forward(model, ids)), stock) < 1e-4


def _threshold_in_plain_torch(router, threshold: float, renormalizes: bool):
    """Stock router, then the rule on its final weights w: normalised w / sum(w) (any scaling cancels);
    dropped experts get weight 0; a renormalising family's kept weights are scaled back to sum(w)."""
    stock_forward = router.forward

    def forward(hidden_states, *args):
        logits, weights, ids = stock_forward(hidden_states, *args)
        total = weights.sum(dim=-1, keepdim=True)
        keep = weights >= threshold * total
        keep |= torch.arange(weights.shape[1]) == weights.argmax(dim=-1, keepdim=True)
        kept = weights * keep
        if renormalizes:
            kept = kept * total / kept.sum(dim=-1, keepdim=True)
        return logits, kept.to(weights.dtype), ids

    return forward


@pytest.mark.parametrize("name, renormalizes", [("deepseek_v3", True), ("deepseek_v2", False), ("gpt_oss", True)])
def test_threshold_other_families(name: str, renormalizes: bool) -> None:
    from .test_families import forward, main_output, rel_max_error

    model, routers, ids = _family(name)
    threshold = 0.4 if routers[0].top_k == 2 else 0.3
    for router in routers:
        router.forward = _threshold_in_plain_torch(router, threshold, renormalizes)
    stock = main_output(forward(model, ids))
    for router in routers:
        del router.forward
    accelerate(model, expert_threshold=threshold)
    dropped = []
    hooks = [r.register_forward_hook(lambda m, a, out: dropped.append((out[2] < 0).any())) for r in _routers(model)]
    ours = main_output(forward(model, ids))
    for hook in hooks:
        hook.remove()
    assert any(dropped), "the threshold should drop some experts"
    assert rel_max_error(ours, stock) < 1e-4


def test_top_k_beyond_the_eligible_groups_is_rejected() -> None:
    model, _, _ = _family("deepseek_v3")  # 16 experts, 4 groups of 4, 2 groups eligible
    with pytest.raises(ValueError, match="8 experts eligible"):
        accelerate(model, top_k=9)
    assert not is_accelerated(model)


def test_stock_router_family_is_rejected() -> None:
    model, _, _ = _family("phimoe")  # sparsemixer routing: the router keeps its stock forward
    with pytest.raises(ValueError, match="stock forward"):
        accelerate(model, expert_threshold=0.2)
    assert not is_accelerated(model)
    accelerate(model)  # without the options it still accelerates (the experts)


BAD_VALUES = [
    (dict(top_k=0), ValueError, "at least 1"),
    (dict(top_k=-2), ValueError, "at least 1"),
    (dict(top_k=99), ValueError, r"\[1, \d+\]"),
    (dict(top_k=[1, 2]), ValueError, "MoE layers"),
    (dict(top_k=[1, 2, 3, 99]), ValueError, r"\[1, \d+\]"),
    (dict(top_k=2.0), TypeError, "int"),
    (dict(top_k=True), TypeError, "int"),
    (dict(top_k="2"), TypeError, "int"),
    (dict(expert_threshold=-0.1), ValueError, r"\[0, 1\)"),
    (dict(expert_threshold=1.0), ValueError, r"\[0, 1\)"),
    (dict(expert_threshold=float("nan")), ValueError, r"\[0, 1\)"),
    (dict(expert_threshold="0.1"), TypeError, "number"),
]


@pytest.mark.parametrize("options, error, match", BAD_VALUES, ids=lambda v: str(v))
def test_bad_values_rejected_and_nothing_changed(fixture_path, options: dict, error: type, match: str) -> None:
    model, _ = load_fixture(fixture_path)
    assert model.config.num_hidden_layers == 4  # the list cases assume 4 MoE layers
    classes = module_classes(model)
    with pytest.raises(error, match=match):
        accelerate(model, **options)
    assert not is_accelerated(model) and module_classes(model) == classes


# ---------------------------------------------------------------------------------------------
# GPU: the kernels end to end, and capture in a CUDA graph (no host sync in the threshold path).


@pytest.mark.gpu
@pytest.mark.parametrize("options", [dict(top_k=1), dict(expert_threshold=0.3)], ids=str)
def test_fixture_on_gpu_matches_plain_torch(fixture_path, options: dict) -> None:
    model, _ = load_fixture(fixture_path, device="cuda")
    ids = _tokens(6, (4, 40))
    accelerate(model, cuda_graphs=False, **options)
    ours = _logits(model, ids)
    unpatch(model)
    model.cpu()
    accelerate(model, **options)  # the CPU reference path, itself checked against stock above
    torch.testing.assert_close(ours.cpu(), _logits(model, ids), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_threshold_decodes_through_cuda_graphs(fixture_path) -> None:
    """generate() with graph decode gives the eager tokens: the threshold path captures (no host sync)."""
    model, _ = load_fixture(fixture_path, dtype=torch.bfloat16, device="cuda")
    ids = _tokens(7, (4, 32)).cuda()

    def greedy():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                              do_sample=False, pad_token_id=0)

    accelerate(model, cuda_graphs=False, expert_threshold=0.3)
    eager = greedy()
    unpatch(model)
    accelerate(model, expert_threshold=0.3)
    assert torch.equal(greedy(), eager)
    assert graph_stats(model)["replays"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 8, 96])
def test_threshold_routing_and_experts_capture_in_a_cuda_graph(tokens: int) -> None:
    from hf_moe_accel.kernels import fused_experts
    from hf_moe_accel.kernels.experts_reference import experts_reference

    from .test_kernel_experts import Case, make_weights, rel_error

    torch.manual_seed(tokens)
    case = Case(tokens=tokens, top_k=8, experts=64, hidden=512, inter=256, dtype=torch.bfloat16)
    weights = make_weights(case)
    spec = RoutingSpec(top_k=8, num_experts=64, renormalize=True, expert_threshold=0.12, weights_dtype=torch.bfloat16)
    x = torch.randn(tokens, case.hidden, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(tokens, 64, device="cuda")

    def step():
        topk_weights, topk_ids = route_triton(logits, spec)
        return fused_experts(x, weights, topk_ids, topk_weights), topk_ids

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, topk_ids = step()
    logits.copy_(torch.randn(tokens, 64, device="cuda") * 2)
    graph.replay()
    ref_weights, ref_ids = route_reference(logits, spec)
    assert torch.equal(topk_ids.sort(dim=1).values, ref_ids.sort(dim=1).values)
    assert (ref_ids == -1).any()
    assert rel_error(out, experts_reference(x, weights, ref_ids, ref_weights)) < 2e-2
