"""The fused-experts Triton kernels and the expert sort against their plain-torch references.

On CPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), at small sizes that
are not multiples of the interpreter's blocks (BLOCK_M 16, BLOCK_N 16/32, BLOCK_K 32).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from hf_moe_accel.kernels import tuning
from hf_moe_accel.kernels.align import align_pairs, align_reference, max_blocks
from hf_moe_accel.kernels.experts_reference import experts_reference
from hf_moe_accel.kernels.experts_triton import fused_experts_triton
from hf_moe_accel.kernels.spec import Activation, ExpertWeights

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Case:
    tokens: int
    top_k: int
    experts: int = 8
    hidden: int = 72
    inter: int = 56
    dtype: torch.dtype = torch.float32
    transposed: bool = False
    interleaved: bool = False
    bias: bool = False
    has_gate: bool = True
    act: str = "silu"
    limit: float = 7.0  # the clamped SwiGLUs' limit
    used_experts: int | None = None  # route every token to the first few experts only


def make_weights(case: Case, device: str = DEVICE) -> ExpertWeights:
    g = torch.Generator().manual_seed(1)
    rows = 2 * case.inter if case.has_gate else case.inter
    gate_up = torch.randn(case.experts, rows, case.hidden, generator=g) / case.hidden**0.5
    down = torch.randn(case.experts, case.hidden, case.inter, generator=g) / case.inter**0.5
    if case.transposed:  # the same numbers, stored [E, K, N]; the kernels must follow the strides
        gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    biases = (torch.randn(case.experts, rows, generator=g), torch.randn(case.experts, case.hidden, generator=g))
    to = dict(device=device, dtype=case.dtype)
    return ExpertWeights(
        gate_up=gate_up.to(**to),
        down=down.to(**to),
        gate_up_bias=biases[0].to(**to) if case.bias else None,
        down_bias=biases[1].to(**to) if case.bias else None,
        transposed=case.transposed,
        interleaved=case.interleaved,
        has_gate=case.has_gate,
        activation=Activation(case.act, limit=case.limit),
    )


def make_routing(case: Case, device: str = DEVICE, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.tokens, case.hidden, generator=g).to(device=device, dtype=case.dtype)
    pool = case.used_experts or case.experts
    ids = torch.rand(case.tokens, pool, generator=g).argsort(dim=1)[:, : case.top_k]  # k distinct experts
    weights = torch.rand(case.tokens, case.top_k, generator=g)
    return x, ids.to(device), weights.to(device)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def check(case: Case, path: str, config: dict | None = None) -> None:
    weights = make_weights(case)
    x, ids, topk_weights = make_routing(case)
    out = fused_experts_triton(x, weights, ids, topk_weights, path=path, config=config)
    ref = experts_reference(x, weights, ids, topk_weights)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert rel_error(out, ref) < TOLERANCE[case.dtype], f"{case} {path}: rel error {rel_error(out, ref):.2e}"


CASES = [
    Case(tokens=1, top_k=1),
    Case(tokens=3, top_k=2, dtype=torch.float16),
    Case(tokens=3, top_k=4, transposed=True),
    Case(tokens=3, top_k=8, experts=16, hidden=64, inter=48, used_experts=10),
    # The projections are ~N(0, 1) (~N(0, 2) with biases): limit 0.75 clips a good share of gate and up.
    Case(tokens=3, top_k=2, interleaved=True, bias=True, act="swiglu_oai", limit=0.75),
    Case(tokens=3, top_k=4, transposed=True, interleaved=True, bias=True, act="swiglu_oai", dtype=torch.float16, limit=0.75),
    Case(tokens=3, top_k=2, has_gate=False, act="relu", bias=True),
    Case(tokens=3, top_k=2, transposed=True, has_gate=False, act="gelu_tanh", dtype=torch.float16),
    Case(tokens=3, top_k=2, act="gelu", bias=True, transposed=True),
    Case(tokens=3, top_k=2, act="gelu_tanh", interleaved=True),
    Case(tokens=64, top_k=2, experts=16, hidden=64, inter=48, used_experts=5),
    Case(tokens=64, top_k=4, experts=8, hidden=64, inter=48, dtype=torch.float16, transposed=True, bias=True),
    Case(tokens=3, top_k=2, act="swiglu_clamped", limit=0.75),
    Case(tokens=3, top_k=4, transposed=True, act="swiglu_clamped", limit=0.75, dtype=torch.float16),
    Case(tokens=3, top_k=2, interleaved=True, bias=True, act="swiglu_clamped", limit=0.75),
    Case(tokens=24, top_k=2, act="swiglu_clamped", limit=0.75, dtype=torch.float16, used_experts=3),  # several blocks per expert
    Case(tokens=1, top_k=2, act="swiglu_post_clamped", limit=0.75),
    Case(tokens=3, top_k=2, act="swiglu_post_clamped", limit=0.75),
    Case(tokens=24, top_k=2, transposed=True, act="swiglu_post_clamped", limit=0.75, dtype=torch.float16, used_experts=3),
    Case(tokens=3, top_k=2, has_gate=False, act="relu2"),
    Case(tokens=3, top_k=4, transposed=True, has_gate=False, act="relu2", bias=True, dtype=torch.float16),
    Case(tokens=3, top_k=2, act="relu2", interleaved=True),
    Case(tokens=24, top_k=2, has_gate=False, act="relu2", used_experts=3),
]
CLAMPED_CASES = [case for case in CASES if case.act.startswith("swiglu")]


@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_experts_match_reference(case: Case, path: str) -> None:
    check(case, path)


@pytest.mark.parametrize("case", CLAMPED_CASES, ids=str)
def test_clamped_cases_clip(case: Case) -> None:
    """The clamped-SwiGLU cases above must hit their limit, or they would pass without the clamp."""
    weights = make_weights(case)
    x, ids, topk_weights = make_routing(case)
    unclamped = replace(weights, activation=replace(weights.activation, limit=float("inf")))
    ref = experts_reference(x, weights, ids, topk_weights)
    assert rel_error(experts_reference(x, unclamped, ids, topk_weights), ref) > 10 * TOLERANCE[case.dtype]


def test_prefill_many_tokens() -> None:
    check(Case(tokens=200, top_k=2, experts=8, hidden=64, inter=48, interleaved=True, bias=True), "prefill")


@pytest.mark.parametrize("split_k", [2, 3])
def test_prefill_split_k(split_k: int) -> None:
    config = tuning.get_config("prefill", 8, 56, 72, 5, 2, torch.float32, DEVICE)
    config = {**config, "down": {**config["down"], "SPLIT_K": split_k, "BLOCK_K": 16}}
    check(Case(tokens=5, top_k=2, bias=True), "prefill", config)


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_int32_ids_and_half_routing_weights(path: str) -> None:
    case = Case(tokens=4, top_k=2, dtype=torch.float16)
    weights = make_weights(case)
    x, ids, topk_weights = make_routing(case)
    ref = experts_reference(x, weights, ids, topk_weights.half())
    out = fused_experts_triton(x, weights, ids.int(), topk_weights.half(), path=path)
    assert rel_error(out, ref) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("path", ["decode", "prefill", None])
def test_no_tokens(path: str | None) -> None:
    case = Case(tokens=0, top_k=2)
    x, ids, topk_weights = make_routing(case)
    out = fused_experts_triton(x, make_weights(case), ids, topk_weights, path=path)
    assert out.shape == (0, case.hidden) and out.dtype == x.dtype


@pytest.mark.parametrize("act", ["swiglu_oai", "swiglu_clamped", "swiglu_post_clamped"])
def test_swiglus_need_a_gate(act: str) -> None:
    case = Case(tokens=1, top_k=1, has_gate=False, act=act)
    x, ids, topk_weights = make_routing(case)
    with pytest.raises(ValueError, match="gate"):
        fused_experts_triton(x, make_weights(case), ids, topk_weights)


@pytest.mark.parametrize(
    "tokens, top_k, experts, block_m, used",
    [(1, 1, 8, 16, 8), (3, 2, 8, 16, 8), (64, 4, 16, 16, 5), (200, 8, 16, 32, 16), (5, 8, 128, 16, 100), (700, 6, 64, 64, 64)],
)
def test_align_matches_reference(tokens: int, top_k: int, experts: int, block_m: int, used: int) -> None:
    _, ids, _ = make_routing(Case(tokens=tokens, top_k=top_k, experts=experts, used_experts=used), seed=tokens)
    sorted_pairs, block_experts = align_pairs(ids.int(), experts, block_m)
    ref_pairs, ref_experts = align_reference(ids, experts, block_m)
    assert torch.equal(sorted_pairs, ref_pairs) and torch.equal(block_experts, ref_experts)

    # The contract itself: each pair once, in a block of its expert; blocks of one expert contiguous.
    num_pairs = tokens * top_k
    n_blocks = max_blocks(num_pairs, experts, block_m)
    assert sorted_pairs.shape == (n_blocks * block_m,) and block_experts.shape == (n_blocks,)
    real = sorted_pairs < num_pairs
    assert torch.equal(sorted_pairs[real].sort().values.cpu(), torch.arange(num_pairs, dtype=torch.int32))
    slot_expert = block_experts.long().repeat_interleave(block_m)
    assert torch.equal(slot_expert[real], ids.reshape(-1)[sorted_pairs[real].long()])
    used_blocks = block_experts[block_experts >= 0]
    assert (block_experts[: used_blocks.numel()] >= 0).all() and (used_blocks.diff() >= 0).all()
    counts = torch.bincount(ids.reshape(-1), minlength=experts)
    assert torch.equal(torch.bincount(used_blocks.long(), minlength=experts), (counts + block_m - 1) // block_m)


def drop_pairs(ids: torch.Tensor, weights: torch.Tensor, pattern: str, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Mark pairs "no expert" (-1), with garbage weights that must be ignored: none, some (random, at
    least one whole row), or all of them."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "none":
        drop = torch.zeros(ids.shape, dtype=torch.bool)
    elif pattern == "all":
        drop = torch.ones(ids.shape, dtype=torch.bool)
    else:
        drop = torch.rand(ids.shape, generator=g) < 0.4
        drop[0] = True
        if ids.shape[0] > 1:
            drop[-1] = False
    drop = drop.to(ids.device)
    garbage = torch.full_like(weights, float("nan"))
    return torch.where(drop, -1, ids), torch.where(drop, garbage, weights)


@pytest.mark.parametrize("pattern", ["none", "some", "all"])
def test_reference_skips_no_expert_pairs(pattern: str) -> None:
    """-1 with any weight adds what a real expert with weight 0 adds: nothing."""
    case = Case(tokens=5, top_k=3, bias=True)
    weights = make_weights(case)
    x, ids, topk_weights = make_routing(case)
    dropped_ids, dropped_weights = drop_pairs(ids, topk_weights, pattern)
    zeroed = torch.where(dropped_ids >= 0, topk_weights, 0.0)
    ref = experts_reference(x, weights, ids, zeroed)
    out = experts_reference(x, weights, dropped_ids, dropped_weights)
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6)  # GEMMs over other row counts may round differently
    if pattern == "all":
        assert not out.any()


NO_EXPERT_CASES = [
    Case(tokens=1, top_k=1),
    Case(tokens=3, top_k=4, transposed=True, dtype=torch.float16),
    Case(tokens=5, top_k=2, interleaved=True, bias=True, act="swiglu_oai", limit=0.75),
    Case(tokens=24, top_k=2, experts=8, hidden=64, inter=48, used_experts=3),  # several blocks per expert
    Case(tokens=6, top_k=2, has_gate=False, act="relu2", bias=True),
]


def _with_pairs_dropped(case: Case, path: str, pattern: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel output, reference) on the case's routing with the `pattern` of pairs marked -1."""
    weights = make_weights(case)
    x, ids, topk_weights = make_routing(case)
    ids, topk_weights = drop_pairs(ids, topk_weights, pattern)
    return fused_experts_triton(x, weights, ids, topk_weights, path=path), experts_reference(x, weights, ids, topk_weights)


@pytest.mark.parametrize("pattern", ["none", "some", "all"])
@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("case", NO_EXPERT_CASES, ids=str)
def test_no_expert_pairs_match_reference(case: Case, path: str, pattern: str) -> None:
    out, ref = _with_pairs_dropped(case, path, pattern)
    assert not out.isnan().any()
    if pattern == "all":
        assert not out.any()
    else:
        assert rel_error(out, ref) < TOLERANCE[case.dtype]


@pytest.mark.parametrize("tokens, top_k, experts, block_m", [(1, 1, 8, 16), (3, 2, 8, 16), (64, 4, 16, 16), (200, 8, 16, 32)])
@pytest.mark.parametrize("pattern", ["some", "all"])
def test_align_leaves_out_no_expert_pairs(tokens: int, top_k: int, experts: int, block_m: int, pattern: str) -> None:
    _, ids, weights = make_routing(Case(tokens=tokens, top_k=top_k, experts=experts), seed=tokens)
    ids, _ = drop_pairs(ids, weights, pattern)
    sorted_pairs, block_experts = align_pairs(ids.int(), experts, block_m)
    ref_pairs, ref_experts = align_reference(ids, experts, block_m)
    assert torch.equal(sorted_pairs, ref_pairs) and torch.equal(block_experts, ref_experts)
    # Exactly the pairs with a real expert are placed, and only their experts' blocks exist.
    placed = sorted_pairs[sorted_pairs < tokens * top_k].long().sort().values.cpu()
    assert torch.equal(placed, (ids.reshape(-1) >= 0).nonzero().flatten().cpu())
    kept = ids[ids >= 0]
    counts = torch.bincount(kept, minlength=experts)
    used_blocks = block_experts[block_experts >= 0].long()
    assert torch.equal(torch.bincount(used_blocks, minlength=experts), (counts + block_m - 1) // block_m)


@pytest.fixture
def tuned_data(monkeypatch: pytest.MonkeyPatch):
    """Tuned data for one shape at top-k 8, served as if read from a GPU's file."""
    small = {"gate_up": {"BLOCK_N": 16}, "down": {"BLOCK_N": 16}}
    large = {"gate_up": {"BLOCK_N": 64}, "down": {"BLOCK_N": 64}}
    entry = {"decode_max_tokens": 4, "decode": {"1": small}, "prefill": {"16": {"BLOCK_M": 16, **small}, "256": {"BLOCK_M": 64, **large}}}
    data = {tuning.shape_key(128, 768, 2048, 8, torch.bfloat16): entry}
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(tuning, "device_config_file", lambda device: "a GPU's file")
    monkeypatch.setattr(tuning, "load_config_file", lambda file: data)
    tuning._tuned.cache_clear()
    tuning.get_config.cache_clear()
    yield
    tuning._tuned.cache_clear()
    tuning.get_config.cache_clear()


def test_tuned_configs_pick_the_nearest_token_count(tuned_data) -> None:
    args = (128, 768, 2048)
    assert tuning.use_decode_path(*args, 4, 8, torch.bfloat16, "cuda") is True
    assert tuning.use_decode_path(*args, 5, 8, torch.bfloat16, "cuda") is False
    assert tuning.get_config("prefill", *args, 100, 8, torch.bfloat16, "cuda")["BLOCK_M"] == 16
    assert tuning.get_config("prefill", *args, 1000, 8, torch.bfloat16, "cuda")["BLOCK_M"] == 64
    assert tuning.get_config("decode", *args, 3, 8, torch.bfloat16, "cuda")["path"] == "decode"


def test_other_top_k_uses_the_tuned_entry_at_equal_pairs(tuned_data) -> None:
    """top-k 4 on a shape tuned at top-k 8: twice the tokens give the same pairs, hence the same config."""
    args = (128, 768, 2048)
    assert tuning.use_decode_path(*args, 8, 4, torch.bfloat16, "cuda") is True  # 32 pairs, as 4 tokens x 8
    assert tuning.use_decode_path(*args, 9, 4, torch.bfloat16, "cuda") is False
    assert tuning.get_config("prefill", *args, 100, 4, torch.bfloat16, "cuda")["BLOCK_M"] == 16  # as 50 x 8
    assert tuning.get_config("prefill", *args, 400, 4, torch.bfloat16, "cuda")["BLOCK_M"] == 64  # as 200 x 8
    # Another shape has no data: the heuristic (interpreter configs aside, it reads the GPU: not here).
    assert tuning._tuned(64, 768, 2048, 4, torch.bfloat16, "cuda", False) is None


def test_shape_key() -> None:
    assert tuning.shape_key(32, 2880, 2880, 4, torch.bfloat16, transposed=True) == (
        "E=32,N=2880,K=2880,topk=4,dtype=bfloat16,transposed"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("layout", ["default", "gpt_oss", "swiglu_clamped", "swiglu_post_clamped", "relu2"])
def test_bf16_on_gpu(path: str, tokens: int, layout: str) -> None:
    base = Case(tokens=tokens, top_k=4, experts=32, hidden=512, inter=384, dtype=torch.bfloat16)
    if layout == "gpt_oss":
        base = replace(base, transposed=True, interleaved=True, bias=True, act="swiglu_oai")
    elif layout == "swiglu_clamped":  # DeepSeek-V4 / GLM-5-Next / HY-V4, with a limit that clips
        base = replace(base, act="swiglu_clamped", limit=0.75)
    elif layout == "swiglu_post_clamped":  # Bailing-Hybrid, with a limit that clips
        base = replace(base, act="swiglu_post_clamped", limit=0.75)
    elif layout == "relu2":  # Nemotron-H: ungated
        base = replace(base, has_gate=False, act="relu2")
    check(base, path)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("pattern", ["some", "all"])
def test_no_expert_pairs_bf16_on_gpu(path: str, pattern: str) -> None:
    case = Case(tokens=33, top_k=4, experts=32, hidden=512, inter=384, dtype=torch.bfloat16)
    out, ref = _with_pairs_dropped(case, path, pattern)
    assert not out.isnan().any()
    assert (not out.any()) if pattern == "all" else rel_error(out, ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
def test_cuda_graph_capture() -> None:
    case = Case(tokens=16, top_k=4, experts=32, hidden=512, inter=384, dtype=torch.bfloat16)
    weights = make_weights(case)
    x, ids, topk_weights = make_routing(case)
    for path in ("decode", "prefill"):
        fused_experts_triton(x, weights, ids, topk_weights, path=path)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fused_experts_triton(x, weights, ids, topk_weights, path=path)
        _, new_ids, new_weights = make_routing(case, seed=5)
        ids.copy_(new_ids)
        topk_weights.copy_(new_weights)
        graph.replay()
        assert rel_error(out, experts_reference(x, weights, ids, topk_weights)) < TOLERANCE[torch.bfloat16]
