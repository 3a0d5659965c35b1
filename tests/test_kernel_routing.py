"""The fused routing kernel against the plain-torch oracle, on fresh random logits.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (set up by conftest.py), which
is slow: the cases below cover every option of RoutingSpec without a full Cartesian product.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from hf_moe_accel.kernels import routing
from hf_moe_accel.kernels.routing import route_triton
from hf_moe_accel.kernels.routing_reference import route_reference
from hf_moe_accel.kernels.spec import RoutingSpec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The GPU's exp/div differ from the CPU's by an ulp or two; the interpreter matches numpy's float32.
RTOL = {torch.float32: 1e-6 if DEVICE == "cpu" else 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclass(frozen=True)
class Case:
    tokens: int
    spec: RoutingSpec
    logits_dtype: torch.dtype = torch.float32
    layout: str = "contiguous"  # or "strided" (every other column) or "transposed"
    logit_offset: float = 0.0  # large offsets overflow a softmax that does not subtract the max

    def __str__(self) -> str:
        s = self.spec
        parts = [f"T{self.tokens}", f"E{s.num_experts}", f"k{s.top_k}", s.scoring]
        parts += ["renorm"] if s.renormalize else []
        parts += ["bias"] if s.has_correction_bias else []
        parts += [f"g{s.n_group}of{s.topk_group}{s.group_score}"] if s.n_group > 1 else []
        parts += [f"x{s.routed_scaling_factor}"] if s.routed_scaling_factor != 1.0 else []
        parts += [f"w{str(s.weights_dtype)[6:]}"] if s.weights_dtype else []
        parts += [f"t{s.expert_threshold:g}"] if s.expert_threshold else []
        parts += [f"in{str(self.logits_dtype)[6:]}", self.layout]
        parts += [f"plus{self.logit_offset:g}"] if self.logit_offset else []
        return "-".join(parts)


def _softmax(experts: int, top_k: int, **kw) -> RoutingSpec:
    return RoutingSpec(top_k=top_k, num_experts=experts, scoring="softmax", **kw)


def _sigmoid(experts: int, top_k: int, **kw) -> RoutingSpec:
    return RoutingSpec(top_k=top_k, num_experts=experts, scoring="sigmoid", **kw)


def _gpt_oss(experts: int, top_k: int, **kw) -> RoutingSpec:
    return RoutingSpec(top_k=top_k, num_experts=experts, scoring="softmax_topk_logits", **kw)


def _deepseek_v3(experts: int, top_k: int, **kw) -> RoutingSpec:
    kw = {"n_group": 8, "topk_group": 4, "group_score": "top2_sum", "renormalize": True, "renorm_eps": 1e-20,
          "routed_scaling_factor": 2.5, "has_correction_bias": True, **kw}  # fmt: skip
    return RoutingSpec(top_k=top_k, num_experts=experts, scoring="sigmoid", **kw)


def _deepseek_v2(experts: int, top_k: int, **kw) -> RoutingSpec:
    kw = {"n_group": 8, "topk_group": 3, "group_score": "max", **kw}
    return RoutingSpec(top_k=top_k, num_experts=experts, scoring="softmax", **kw)


F16, BF16 = torch.float16, torch.bfloat16
CASES = [
    # softmax (Mixtral, Qwen, OLMoE)
    Case(1, _softmax(8, 2)),
    Case(3, _softmax(8, 2, renormalize=True)),
    Case(64, _softmax(60, 4)),
    Case(200, _softmax(128, 8, renormalize=True)),
    Case(64, _softmax(64, 6)),
    Case(200, _softmax(16, 1)),
    Case(3, _softmax(128, 8, renormalize=True, weights_dtype=F16), logits_dtype=F16),
    Case(64, _softmax(60, 4, renormalize=True, weights_dtype=BF16), logits_dtype=BF16),
    Case(64, _softmax(64, 2, renormalize=True, weights_dtype=BF16)),
    Case(200, _softmax(60, 4, renormalize=True), layout="strided"),
    Case(64, _softmax(512, 16, renormalize=True)),
    Case(3, _softmax(16, 2, renormalize=True), logit_offset=100.0),
    # sigmoid, with and without a correction bias outside groups
    Case(1, _sigmoid(8, 1)),
    Case(64, _sigmoid(64, 4, renormalize=True, renorm_eps=0.01)),
    Case(200, _sigmoid(60, 6, routed_scaling_factor=2.5)),
    Case(3, _sigmoid(16, 2, renormalize=True, weights_dtype=F16), logits_dtype=F16),
    Case(64, _sigmoid(60, 8, renormalize=True, renorm_eps=1e-20, has_correction_bias=True)),
    Case(64, _softmax(64, 8, renormalize=True, has_correction_bias=True)),
    # top-k over the raw logits, softmax over the chosen ones (GPT-OSS)
    Case(1, _gpt_oss(8, 1)),
    Case(3, _gpt_oss(16, 4)),
    Case(200, _gpt_oss(128, 4, weights_dtype=F16), logits_dtype=F16),
    Case(64, _gpt_oss(60, 2, renormalize=True, routed_scaling_factor=2.5)),
    Case(64, _gpt_oss(128, 4, weights_dtype=BF16), logits_dtype=BF16, layout="transposed"),
    Case(3, _gpt_oss(16, 4), logit_offset=100.0),
    # DeepSeek-V3: sigmoid + bias, 8 groups scored by top-2 sum, 4 kept
    Case(1, _deepseek_v3(64, 8)),
    Case(3, _deepseek_v3(128, 8)),
    Case(64, _deepseek_v3(64, 6)),
    Case(200, _deepseek_v3(128, 8, weights_dtype=F16)),
    Case(64, _deepseek_v3(16, 2), logits_dtype=F16),
    Case(64, _deepseek_v3(256, 8), layout="transposed"),
    Case(3, _deepseek_v3(128, 8, n_group=64, topk_group=8)),
    # DeepSeek-V2: softmax, 8 groups scored by their max, 3 kept
    Case(1, _deepseek_v2(64, 6)),
    Case(200, _deepseek_v2(128, 6, routed_scaling_factor=16.0)),
    Case(3, _deepseek_v2(16, 4)),
    Case(64, _deepseek_v2(64, 8, renormalize=True), layout="strided"),
    Case(64, _deepseek_v2(128, 4, n_group=64, topk_group=16)),
    Case(64, _deepseek_v2(160, 6, weights_dtype=BF16)),  # 20 experts per group: not a power of 2
    # Expert threshold: dropped experts come out as id -1, weight 0
    Case(200, _softmax(16, 4, renormalize=True, expert_threshold=0.2)),
    Case(64, _softmax(60, 6, expert_threshold=0.15, weights_dtype=BF16), logits_dtype=BF16),
    Case(64, _gpt_oss(32, 4, expert_threshold=0.25)),
    Case(64, _deepseek_v3(64, 6, expert_threshold=0.18)),
    Case(3, _softmax(8, 1, renormalize=True, expert_threshold=0.9)),
]


def _inputs(case: Case, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fresh logits (in the case's layout) and correction bias, with no ties within a row."""
    gen = torch.Generator().manual_seed(seed)
    tokens, experts = case.tokens, case.spec.num_experts
    logits = torch.randn(tokens, experts, generator=gen)
    if case.logits_dtype != torch.float32:
        # Rounding randn to 8-11 bits would make ties likely; spread the row's ranks over [-3, 3).
        logits = logits.argsort(dim=1).argsort(dim=1).float() * (6 / experts) - 3
    logits = (logits + case.logit_offset).to(case.logits_dtype)
    assert (logits.sort(dim=1).values.diff(dim=1) != 0).all(), "the test needs tie-free logits"
    # Negative biases make the selection scores negative: a padding lane scoring 0 would win.
    bias = torch.randn(experts, generator=gen) * 0.1 - 1 if case.spec.has_correction_bias else None
    logits = logits.to(DEVICE)  # before the layout change: copying to a GPU makes a strided view contiguous
    if case.layout == "strided":
        logits = torch.stack([logits, torch.full_like(logits, float("nan"))], dim=2).flatten(1)[:, ::2]
    elif case.layout == "transposed":
        logits = logits.t().contiguous().t()
    return logits, bias if bias is None else bias.to(DEVICE)


def _assert_same_routing(out: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> None:
    (weights, ids), (ref_weights, ref_ids) = out, ref
    assert ids.dtype == torch.int64 and weights.dtype == ref_weights.dtype
    assert ids.shape == ref_ids.shape and weights.shape == ref_weights.shape
    ids, order = ids.cpu().sort(dim=1)
    ref_ids, ref_order = ref_ids.cpu().sort(dim=1)
    assert torch.equal(ids, ref_ids), "different experts chosen"
    torch.testing.assert_close(
        weights.cpu().gather(1, order).float(),
        ref_weights.cpu().gather(1, ref_order).float(),
        rtol=RTOL[weights.dtype],
        atol=1e-30,
    )


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case: Case) -> None:
    logits, bias = _inputs(case, seed=CASES.index(case))
    assert logits.is_contiguous() == (case.layout == "contiguous")
    out = route_triton(logits, case.spec, bias)
    ref = route_reference(logits, case.spec, bias)
    _assert_same_routing(out, ref)
    # Ids come in descending order of the selection score, like torch.topk(sorted=True).
    assert torch.equal(out[1].cpu(), ref[1].cpu())


@pytest.mark.parametrize("case", [c for c in CASES if c.spec.expert_threshold and c.spec.top_k > 1], ids=str)
def test_threshold_cases_drop_some_experts(case: Case) -> None:
    """The threshold cases above must drop some experts and keep others, or they would test nothing."""
    logits, bias = _inputs(case, seed=CASES.index(case))
    weights, ids = route_triton(logits, case.spec, bias)
    kept = ids >= 0
    assert (~kept).any() and kept.sum(dim=1).gt(1).any() and kept.any(dim=1).all()
    assert not weights[~kept].any()


def test_comparison_catches_wrong_routing() -> None:
    """The check above fails when the kernel's output is compared with any other spec's."""
    case = Case(64, _deepseek_v3(64, 6))
    logits, bias = _inputs(case, seed=0)
    out = route_triton(logits, case.spec, bias)
    _assert_same_routing(out, route_reference(logits, case.spec, bias))
    wrong_specs = [
        replace(case.spec, top_k=5),
        replace(case.spec, renormalize=False),
        replace(case.spec, routed_scaling_factor=1.0),
        replace(case.spec, has_correction_bias=False),
        replace(case.spec, group_score="max"),
        replace(case.spec, topk_group=3),
        replace(case.spec, scoring="softmax"),
        replace(case.spec, weights_dtype=torch.float16),
        replace(case.spec, expert_threshold=0.17),
    ]
    for wrong in wrong_specs:
        with pytest.raises(AssertionError):
            _assert_same_routing(out, route_reference(logits, wrong, bias))


@pytest.mark.parametrize("weights_dtype", [None, torch.bfloat16])
def test_no_tokens_returns_empty_without_launch(monkeypatch: pytest.MonkeyPatch, weights_dtype) -> None:
    monkeypatch.setattr(routing, "_route_kernel", None)  # launching would raise a TypeError
    spec = _deepseek_v3(64, 6, weights_dtype=weights_dtype)
    weights, ids = route_triton(torch.empty(0, 64, device=DEVICE), spec, torch.zeros(64, device=DEVICE))
    assert weights.shape == ids.shape == (0, 6)
    assert weights.dtype == (weights_dtype or torch.float32) and ids.dtype == torch.int64


def test_rejects_specs_it_cannot_honour() -> None:
    logits = torch.randn(4, 60, device=DEVICE)
    with pytest.raises(ValueError, match="n_group"):
        route_triton(logits, _deepseek_v2(60, 4), None)
    with pytest.raises(ValueError, match="correction_bias"):
        route_triton(logits, _sigmoid(60, 4, has_correction_bias=True), None)
