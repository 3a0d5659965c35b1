"""FP8 experts in accelerate(): Transformers' fine-grained FP8 experts (issue 31, part 1) and
`expert_dtype="fp8"`, experts quantized at patch time (part 2).

Models are built the way users get them, without a download: a tiny qwen3_moe (or the trained
fixture) whose experts Transformers' own `replace_with_fp8_linear` turns into `FP8Experts`, filled by
Transformers' own quantizer (`Fp8Quantize`) where the sizes are multiples of the block; elsewhere by
the same rule over partial blocks (`quantize_blocks`), as a pre-quantized checkpoint may store them.
Quantizing on load (`from_pretrained(..., quantization_config=FineGrainedFP8Config())`) needs a GPU;
attention linears stay `nn.Linear` here because Transformers' FP8 linear needs a GPU kernel.

Stock's FP8 forward on the CPU is `FP8Experts`' eager forward on the weights dequantized as Transformers
dequantizes them (its FP8 matmul needs a GPU kernel, and also quantizes activations: the GPU tests
compare with it where it is available). On CPU the patched forward runs the plain-torch reference, and,
through Triton's interpreter (`interpreted_kernels`), the Triton kernels, in float32 and float16.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import weakref
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, FineGrainedFP8Config

import hf_moe_accel
from hf_moe_accel import UnsupportedMoEError, accelerate, is_accelerated, unpatch
from hf_moe_accel.cli import main
from hf_moe_accel.kernels import experts_triton, tuning
from hf_moe_accel.kernels.experts_fp8_reference import (
    FP8_DTYPE,
    dequantize_blocks,
    quantize_blocks,
)
from hf_moe_accel.kernels.experts_reference import apply_activation
from hf_moe_accel.kernels.spec import ExpertWeights, is_experts_module
from hf_moe_accel.patches import fp8_experts
from hf_moe_accel.patches.experts import (
    EXPERTS_IMPLEMENTATION,
    expert_weights,
    experts_state,
)

from .helpers import load_fixture, state_snapshot

fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8", reason="Transformers without fine-grained FP8")

PROJECTIONS = ("gate_up_proj", "down_proj")
KEEP_UNQUANTIZED = ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]  # Transformers' FP8 linear needs a GPU kernel
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
CUDA = torch.cuda.is_available()


def tiny_config(hidden: int = 256, inter: int = 128, **overrides):
    return AutoConfig.for_model("qwen3_moe", hidden_size=hidden, intermediate_size=96, moe_intermediate_size=inter,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                vocab_size=128, num_experts=8, num_experts_per_tok=2, **overrides)


def experts_of(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_experts_module(m)]


def same_bits(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    """Two state snapshots hold the same tensors bit for bit (NaN and float8 included)."""
    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().reshape(-1).view(torch.uint8)

    return before.keys() == after.keys() and all(
        before[k].dtype == after[k].dtype and before[k].shape == after[k].shape and torch.equal(bits(before[k]), bits(after[k]))
        for k in before)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def transformers_quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Transformers' quantizer (`Fp8Quantize`) where it quantizes (sizes multiples of the block); elsewhere
    the same rule over partial blocks."""
    if weight.shape[-2] % block[0] or weight.shape[-1] % block[1]:
        return quantize_blocks(weight, block)
    quantizer = fp8.Fp8Quantize(SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=block)))
    out = quantizer._quantize_one("w", weight)
    return out["w"], out["w_scale_inv"]


def transformers_dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Transformers' own dequantization where the version has it (5.25: the scale rounded to `dtype` first),
    else the reference's (equal in float32: test_kernel_fp8.py)."""
    dequantize = getattr(fp8, "_dequantize_fp8_weight", None)
    if dequantize is None:
        return dequantize_blocks(weight, scale, block, dtype)
    return dequantize(weight.clone(), scale, list(block), dtype)


def fp8_model(config, dtype: torch.dtype = torch.float32, block: tuple[int, int] = (128, 128), seed: int = 0) -> nn.Module:
    """A random-weight model whose experts Transformers' `replace_with_fp8_linear` made FP8Experts, holding
    the quantized weights of the model it replaced (gate_up's scale grid as Transformers allocates it, rows
    past the weight's NaN: never read)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    dense = {name: {p: getattr(m, p).detach().float() for p in PROJECTIONS}
             for name, m in model.named_modules() if is_experts_module(m)}
    fp8.replace_with_fp8_linear(model, modules_to_not_convert=KEEP_UNQUANTIZED,
                                quantization_config=FineGrainedFP8Config(weight_block_size=block))
    for name, experts in model.named_modules():
        if name not in dense:
            continue
        assert type(experts).__name__ == "FP8Experts"
        experts.to_empty(device="cpu")
        for proj in PROJECTIONS:
            stored, scale = transformers_quantize(dense[name][proj], block)
            getattr(experts, proj).data.copy_(stored)
            grid = getattr(experts, f"{proj}_scale_inv").data
            grid.fill_(float("nan"))
            grid[:, : scale.shape[1], : scale.shape[2]].copy_(scale)
    return model.eval()


def stock_dequantized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of an FP8 model running stock FP8Experts' eager forward on the weights Transformers dequantizes."""
    stock = copy.deepcopy(model)
    for experts in experts_of(stock):
        for proj in PROJECTIONS:
            weight = transformers_dequantize(getattr(experts, proj), getattr(experts, f"{proj}_scale_inv"),
                                             tuple(experts.block_size), dtype)
            setattr(experts, proj, nn.Parameter(weight, requires_grad=False))
    stock.set_experts_implementation("eager")
    return stock


def reference_requantized(model: nn.Module, block: tuple[int, int] = (128, 128)) -> nn.Module:
    """A copy of a plain model whose experts hold dequantize(quantize(w)): what expert_dtype="fp8" computes."""
    stock = copy.deepcopy(model)
    for experts in experts_of(stock):
        for proj in PROJECTIONS:
            weight = getattr(experts, proj)
            stored, scale = quantize_blocks(weight.detach(), block)
            weight.data.copy_(dequantize_blocks(stored, scale, block, weight.dtype))
    return stock


def routing(tokens: int, hidden: int, top_k: int, dtype: torch.dtype, pool: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    ids = torch.rand(tokens, pool, generator=g).argsort(dim=1)[:, :top_k]
    return x, ids, torch.rand(tokens, top_k, generator=g).to(dtype)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def token_ids(batch: int = 2, length: int = 7, seed: int = 1, device: str = "cpu") -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)


class Launches:
    """Block-scaled experts sent to the Triton kernels on CPU tensors (Triton's interpreter); counts launches."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = experts_triton.fused_experts_triton

        def spy(*args, **kwargs):
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(hf_moe_accel.kernels, "block_scaled_kernels_serve", lambda hidden_states, weights: True)
        monkeypatch.setattr(experts_triton, "fused_experts_triton", spy)


@pytest.fixture
def interpreted_kernels(monkeypatch) -> Launches:
    if not tuning.interpreting():
        pytest.skip("runs the Triton kernels on CPU tensors in Triton's interpreter (the GPU tests run them natively)")
    return Launches(monkeypatch)


# ---------------------------------------------------------------------------------------------
# Part 1: Transformers' FP8Experts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_model_matches_stock(dtype: torch.dtype) -> None:
    """Logits and greedy tokens of the accelerated FP8 model against stock FP8Experts on the same stored
    weights; the config names our implementation, the experts keep their class, unpatch gives the stock
    FP8 path back with every parameter bitwise unchanged."""
    model = fp8_model(tiny_config(), dtype)
    stock = stock_dequantized(model, dtype)
    before = state_snapshot(model)
    classes = [type(m) for m in experts_of(model)]
    accelerate(model)
    try:
        assert model.config._experts_implementation == EXPERTS_IMPLEMENTATION
        assert [type(m) for m in experts_of(model)] == classes
        assert EXPERTS_IMPLEMENTATION in fp8.ALL_FP8_EXPERTS_FUNCTIONS  # registered in Transformers' FP8 interface
        for experts in experts_of(model):
            assert expert_weights(experts, experts_state(experts).activation).scales is not None
        assert rel_error(logits(model, token_ids()), logits(stock, token_ids())) < TOLERANCE[dtype]
        inputs = token_ids(1, 5)
        greedy = {"attention_mask": torch.ones_like(inputs), "max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(model.generate(inputs, **greedy), stock.generate(inputs, **greedy))
    finally:
        unpatch(model)
    assert model.config._experts_implementation == "grouped_mm"
    assert fp8.ALL_FP8_EXPERTS_FUNCTIONS.get_interface("grouped_mm", None) is fp8.fp8_grouped_mm_experts_forward
    assert same_bits(before, state_snapshot(model))
    assert not any(experts_state(m) for m in model.modules()) and not is_accelerated(model)


# One token; several tokens with experts that get none; sizes that are not multiples of the 128 block
# (partial blocks, gate and up rows in one block); smaller blocks Transformers' quantizer fills itself.
KERNEL_CASES = [
    {"hidden": 256, "inter": 128, "tokens": 1, "pool": 8, "dtype": torch.float32},
    {"hidden": 256, "inter": 128, "tokens": 5, "pool": 3, "dtype": torch.float16},
    {"hidden": 200, "inter": 72, "tokens": 1, "pool": 8, "dtype": torch.float16},
    {"hidden": 200, "inter": 72, "tokens": 6, "pool": 4, "dtype": torch.float32},
    {"hidden": 64, "inter": 48, "tokens": 4, "pool": 5, "dtype": torch.float32, "block": (32, 32)},
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()).replace("torch.", ""))
def test_patched_fp8_experts_run_the_kernels(case: dict, interpreted_kernels: Launches) -> None:
    """Each patched FP8Experts module, called as its MoE block calls it, through the Triton kernels against
    stock FP8Experts on the same weights, fresh random inputs each layer."""
    dtype, block = case["dtype"], case.get("block", (128, 128))
    model = fp8_model(tiny_config(case["hidden"], case["inter"]), dtype, block)
    stock = stock_dequantized(model, dtype)
    accelerate(model)
    try:
        for layer, (ours, theirs) in enumerate(zip(experts_of(model), experts_of(stock))):
            x, ids, weights = routing(case["tokens"], case["hidden"], 2, dtype, case["pool"], seed=layer)
            with torch.no_grad():
                out, ref = ours(x, ids, weights), theirs(x, ids, weights)
            assert out.dtype == dtype and rel_error(out, ref) < TOLERANCE[dtype], layer
        assert interpreted_kernels.count == len(experts_of(model))
        with torch.no_grad():  # the whole model, one token, through the kernels too
            assert rel_error(logits(model, token_ids(1, 1)), logits(stock, token_ids(1, 1))) < TOLERANCE[dtype]
    finally:
        unpatch(model)


def test_experts_the_quantizer_left_unquantized_run_as_plain_weights() -> None:
    """Transformers' on-the-fly quantizer leaves experts whose sizes aren't multiples of the block in the
    model's dtype inside FP8Experts (it forwards them with F.linear): they run the plain kernels."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(200, 72)).eval()
    dense = [{p: getattr(m, p).detach().clone() for p in PROJECTIONS} for m in experts_of(model)]
    fp8.replace_with_fp8_linear(model, modules_to_not_convert=KEEP_UNQUANTIZED, quantization_config=FineGrainedFP8Config())
    for experts, weights in zip(experts_of(model), dense):
        experts.to_empty(device="cpu")
        for proj in PROJECTIONS:
            setattr(experts, proj, nn.Parameter(weights[proj], requires_grad=False))
    model.eval()
    stock = copy.deepcopy(model)
    stock.set_experts_implementation("eager")
    accelerate(model)
    try:
        assert all(expert_weights(m, experts_state(m).activation).scales is None for m in experts_of(model))
        assert rel_error(logits(model, token_ids()), logits(stock, token_ids())) < TOLERANCE[torch.float32]
    finally:
        unpatch(model)


def _ue8m0(experts: nn.Module) -> None:
    experts.gate_up_proj_scale_inv = nn.Parameter(experts.gate_up_proj_scale_inv.data.to(torch.float8_e8m0fnu), requires_grad=False)


def _fp4(experts: nn.Module) -> None:
    experts.gate_up_proj = nn.Parameter(torch.zeros(experts.gate_up_proj.shape[:-1] + (experts.gate_up_proj.shape[-1] // 2,),
                                                    dtype=torch.int8), requires_grad=False)


def _mixed(experts: nn.Module) -> None:
    experts.down_proj = nn.Parameter(experts.down_proj.data.float(), requires_grad=False)


REFUSED_LAYOUTS = {
    "float32 scales": _ue8m0,
    "per-tensor": lambda experts: setattr(experts, "block_size", None),
    "static activation": lambda experts: setattr(experts, "activation_scheme", "static"),
    "FP4": _fp4,
    "both in": _mixed,
    "no fused activation": lambda experts: setattr(experts, "gate_softcap", 10.0),
}


@pytest.mark.parametrize("message", sorted(REFUSED_LAYOUTS))
def test_unsupported_fp8_layouts_are_refused_before_anything_changes(message: str) -> None:
    model = fp8_model(tiny_config())
    last = experts_of(model)[-1]
    REFUSED_LAYOUTS[message](last)
    names = (model.config._experts_implementation, model.config._attn_implementation)
    with pytest.raises(UnsupportedMoEError, match=message) as error:
        accelerate(model)
    assert "FineGrainedFP8Config(dequantize=True)" in str(error.value) and "expert_dtype='fp8'" in str(error.value)
    assert (model.config._experts_implementation, model.config._attn_implementation) == names
    assert not is_accelerated(model) and not any(experts_state(m) for m in model.modules())


def _fp8_experts_for(**config_overrides) -> nn.Module:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(**config_overrides))
    fp8.replace_with_fp8_linear(model, modules_to_not_convert=KEEP_UNQUANTIZED,
                                quantization_config=FineGrainedFP8Config(weight_block_size=(128, 128)))
    return experts_of(model)[0]


@pytest.mark.parametrize("overrides", [{}, {"hidden_act": "gelu"}, {"swiglu_limit": 0.5},
                                       {"swiglu_limit": 0.5, "swiglu_alpha": 1.3}, {"swiglu_limit": 0.5, "limit_after_act": True}],
                         ids=["silu", "gelu", "clamped", "oai", "post-clamped"])
def test_fp8_activation_is_fp8_experts_gate(overrides: dict) -> None:
    """`fp8_experts.activation` computes FP8Experts' `_apply_gate` (Transformers' branches for its config)."""
    experts = _fp8_experts_for(**overrides)
    if overrides.get("limit_after_act") and not hasattr(experts, "limit_after_act"):
        pytest.skip("this Transformers' FP8Experts has no limit_after_act")
    activation = fp8_experts.activation(experts)
    assert activation is not None
    gate_up = 2 * torch.randn(64, 2 * 128, generator=torch.Generator().manual_seed(0))
    described = ExpertWeights(gate_up=torch.empty(0), down=torch.empty(0), activation=activation)
    torch.testing.assert_close(apply_activation(gate_up, described), experts._apply_gate(gate_up), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Part 2: expert_dtype="fp8", quantized at patch time


@pytest.fixture
def qwen_fixture(fixture_path):
    if fixture_path.name != "tiny-qwen3-moe":
        pytest.skip("one trained fixture is enough here")
    return fixture_path


def test_expert_dtype_quantizes_in_transformers_layout_and_unpatch_restores_bitwise(qwen_fixture) -> None:
    """The trained fixture (sizes multiples of 128): the quantized bits and scales are Transformers'
    quantizer's, the logits those of the model on dequantize(quantize(w)); unpatch puts the very
    parameter objects back, bitwise."""
    model, _ = load_fixture(qwen_fixture)
    reference = reference_requantized(model)
    before = state_snapshot(model)
    originals = {id(p) for p in model.parameters()}
    accelerate(model, expert_dtype="fp8", keep_original_experts=True)
    try:
        for name, experts in [(n, m) for n, m in model.named_modules() if is_experts_module(m)]:
            for proj in PROJECTIONS:
                stored, scale = transformers_quantize(before[f"{name}.{proj}"], (128, 128))
                assert getattr(experts, proj).dtype == FP8_DTYPE and not getattr(experts, proj).requires_grad
                assert torch.equal(getattr(experts, proj).view(torch.uint8), stored.view(torch.uint8))
                assert torch.equal(getattr(experts, f"{proj}_scale_inv"), scale)
        assert len(hf_moe_accel.patch_report(model).quantized) == len(experts_of(model))
        torch.testing.assert_close(logits(model, token_ids()), logits(reference, token_ids()), rtol=1e-5, atol=1e-5)
    finally:
        unpatch(model)
    assert same_bits(before, state_snapshot(model))
    assert {id(p) for p in model.parameters()} == originals
    assert not any(m._forward_pre_hooks for m in experts_of(model))
    assert model.config._experts_implementation == "grouped_mm"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_expert_dtype_runs_the_kernels(dtype: torch.dtype, interpreted_kernels: Launches) -> None:
    """Sizes that are not multiples of the block, one token and several, through the Triton kernels, against
    the model on dequantize(quantize(w))."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(200, 72), dtype=dtype).eval()
    reference = reference_requantized(model)
    accelerate(model, expert_dtype="fp8", keep_original_experts=True)
    try:
        for ids in (token_ids(1, 1), token_ids(1, 4)):
            assert rel_error(logits(model, ids), logits(reference, ids)) < TOLERANCE[dtype]
        assert interpreted_kernels.count == 2 * len(experts_of(model))
    finally:
        unpatch(model)


def test_expert_dtype_frees_the_originals_and_unpatch_refuses() -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config()).eval()
    reference = reference_requantized(model)
    originals = [weakref.ref(getattr(m, p)) for m in experts_of(model) for p in PROJECTIONS]
    accelerate(model, expert_dtype="fp8")
    gc.collect()
    assert all(ref() is None for ref in originals), "the original expert weights are freed"
    with pytest.raises(RuntimeError, match=r"reload the model.*keep_original_experts=True"):
        unpatch(model)
    assert is_accelerated(model) and model.config._experts_implementation == EXPERTS_IMPLEMENTATION
    torch.testing.assert_close(logits(model, token_ids()), logits(reference, token_ids()), rtol=1e-5, atol=1e-5)


def test_quantized_experts_run_only_ours() -> None:
    """A stock experts implementation (or training mode) can't read FP8 weights in this class: it raises,
    saying what to do; switching back runs ours again."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config()).eval()
    accelerate(model, expert_dtype="fp8", keep_original_experts=True)
    try:
        model.set_experts_implementation("eager")
        with pytest.raises(RuntimeError, match=r"expert_dtype='fp8'.*'eager'.*unpatch\(model\)"):
            logits(model, token_ids())
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
        logits(model, token_ids())
        model.train()
        with pytest.raises(RuntimeError, match="training mode"):
            logits(model, token_ids())
        model.eval()
    finally:
        unpatch(model)
    assert model.config._experts_implementation == "grouped_mm"
    logits(model, token_ids())  # stock again, on the original weights


def test_a_failing_accelerate_puts_the_originals_back(monkeypatch) -> None:
    """All or nothing: a failure after the experts were quantized restores them, without keep_original_experts."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config()).eval()
    before = state_snapshot(model)

    def fail(*args, **kwargs):
        raise RuntimeError("a later step failed")

    monkeypatch.setattr(hf_moe_accel.api, "apply_expert_selection", fail)
    with pytest.raises(RuntimeError, match="a later step failed"):
        accelerate(model, expert_dtype="fp8")
    assert same_bits(before, state_snapshot(model))
    assert not is_accelerated(model) and not any(m._forward_pre_hooks for m in experts_of(model))


def test_a_deep_copy_restores_its_own_originals() -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config()).eval()
    before = state_snapshot(model)
    accelerate(model, expert_dtype="fp8", keep_original_experts=True)
    twin = copy.deepcopy(model)
    unpatch(twin)
    unpatch(model)
    for restored in (model, twin):
        assert same_bits(before, state_snapshot(restored))
    assert not {id(p) for p in twin.parameters()} & {id(p) for p in model.parameters()}


@pytest.mark.parametrize("options, error, message", [
    ({"expert_dtype": True}, TypeError, "expert_dtype must be one of 'fp8' or None"),
    ({"expert_dtype": 8}, TypeError, "expert_dtype must be one of 'fp8' or None"),
    ({"expert_dtype": "FP8"}, ValueError, "expert_dtype must be one of 'fp8' or None"),
    ({"expert_dtype": "bf16"}, ValueError, "expert_dtype must be one of 'fp8' or None"),
    ({"expert_dtype": "fp8", "keep_original_experts": "yes"}, TypeError, "keep_original_experts must be True or False"),
    ({"keep_original_experts": True}, ValueError, "pass expert_dtype='fp8' with it"),
], ids=["bool", "int", "upper-case", "other-dtype", "keep-not-bool", "keep-alone"])
def test_bad_values_are_refused_before_anything_changes(options: dict, error: type, message: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config()).eval()
    before = state_snapshot(model)
    with pytest.raises(error, match=message):
        accelerate(model, **options)
    assert not is_accelerated(model) and same_bits(before, state_snapshot(model))


def test_an_accelerated_model_refuses_expert_dtype() -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config()).eval()
    accelerate(model)
    try:
        with pytest.raises(ValueError, match="already accelerated; call unpatch.*expert_dtype"):
            accelerate(model, expert_dtype="fp8")
    finally:
        unpatch(model)


def test_eval_cli_reports_fp8_beside_the_checkpoint_dtype(qwen_fixture, tmp_path, capsys) -> None:
    out_json = tmp_path / "eval.json"
    rc = main(["eval", "--model", str(qwen_fixture), "--text", str(qwen_fixture / "heldout.txt"), "--expert-dtype", "fp8",
               "--max-tokens", "256", "--prompts", "2", "--prompt-len", "16", "--new-tokens", "3", "--json", str(out_json)])
    assert rc == 0
    rows = {r["name"]: r for r in json.loads(out_json.read_text())["settings"]}
    assert list(rows) == ["stock", "full", "fp8"] and rows["fp8"]["expert_dtype"] == "fp8"
    assert rows["fp8"]["ppl"] != rows["full"]["ppl"] and abs(rows["fp8"]["ppl_change_pct"]) < 5
    assert "| fp8 |" in capsys.readouterr().out


def test_eval_cli_refuses_other_expert_dtypes(qwen_fixture, capsys) -> None:
    rc = main(["eval", "--model", str(qwen_fixture), "--text", str(qwen_fixture / "heldout.txt"), "--expert-dtype", "int4"])
    assert rc == 2 and "'fp8'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# GPU: bf16 activations, FP8 weights read by the kernels (compute capability 8.9+)


def _kernels_read_fp8() -> bool:
    return CUDA and torch.cuda.get_device_capability() >= (8, 9)


@pytest.fixture
def triton_calls(monkeypatch) -> list:
    """One entry per call of the fused-experts Triton kernels."""
    calls = []
    real = experts_triton.fused_experts_triton

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(experts_triton, "fused_experts_triton", spy)
    return calls


def _greedy(prompt: torch.Tensor) -> dict:
    return {"attention_mask": torch.ones_like(prompt), "max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False,
            "pad_token_id": 0}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(256, 128), (200, 72)], ids=["blocks", "partial-blocks"])
def test_fp8_model_on_gpu(shape: tuple[int, int], triton_calls: list) -> None:
    """bf16 FP8 model on the GPU: logits against stock FP8Experts on its dequantized weights through the
    Triton kernels (compute capability 8.9+); generate() through CUDA graphs and eagerly."""
    model = fp8_model(tiny_config(*shape), torch.bfloat16).to("cuda")
    stock = stock_dequantized(model, torch.bfloat16)
    eager = copy.deepcopy(model)
    accelerate(model)
    accelerate(eager, cuda_graphs=False)
    try:
        ids = token_ids(device="cuda")
        assert rel_error(logits(model, ids), logits(stock, ids)) < TOLERANCE[torch.bfloat16]
        assert bool(triton_calls) == _kernels_read_fp8()
        prompt = token_ids(1, 5, device="cuda")  # random weights: near-ties, so only the logits are compared
        assert model.generate(prompt, **_greedy(prompt)).shape == eager.generate(prompt, **_greedy(prompt)).shape == (1, 17)
    finally:
        unpatch(model)
        unpatch(eager)


@pytest.mark.gpu
def test_model_quantized_by_transformers_on_load(qwen_fixture) -> None:
    """The user's path: from_pretrained(..., quantization_config=FineGrainedFP8Config(...)) quantizes the
    trained fixture's experts on load (a GPU only); the accelerated model against stock FP8Experts on its
    dequantized weights."""
    config = FineGrainedFP8Config(weight_block_size=(128, 128), modules_to_not_convert=KEEP_UNQUANTIZED)
    model = AutoModelForCausalLM.from_pretrained(qwen_fixture, dtype=torch.bfloat16, device_map="cuda",
                                                 quantization_config=config).eval()
    assert all(type(m).__name__ == "FP8Experts" and m.down_proj.dtype == FP8_DTYPE for m in experts_of(model))
    stock = stock_dequantized(model, torch.bfloat16)
    accelerate(model)
    try:
        ids = token_ids(device="cuda")
        assert rel_error(logits(model, ids), logits(stock, ids)) < TOLERANCE[torch.bfloat16]
    finally:
        unpatch(model)


@pytest.mark.gpu
def test_fp8_model_against_transformers_fp8_forward() -> None:
    """Against Transformers' own FP8 path (DeepGEMM or its finegrained-fp8 kernel), which also quantizes
    activations: within the bounds test_kernel_fp8.py derives (8% relative RMS, 10% of the max)."""
    from .test_kernel_fp8 import _transformers_fp8_matmul_reason

    if reason := _transformers_fp8_matmul_reason():
        pytest.skip(reason)
    model = fp8_model(tiny_config(512, 384), torch.bfloat16).to("cuda")
    stock = copy.deepcopy(model)
    accelerate(model)
    try:
        ids = token_ids(device="cuda")
        out, ref = logits(model, ids).float(), logits(stock, ids).float()
        rms = ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
        assert rms < 0.08 and rel_error(out, ref) < 0.10, f"rms {rms:.3f}, max {rel_error(out, ref):.3f}"
    finally:
        unpatch(model)


@pytest.mark.gpu
def test_expert_dtype_on_gpu(qwen_fixture, triton_calls: list) -> None:
    """The trained fixture in bf16 on the GPU: the experts' GPU memory halves, logits match the
    dequantize(quantize(w)) model, greedy tokens through graphs equal eager ones, unpatch restores bitwise
    from the host copy."""
    model, _ = load_fixture(qwen_fixture, dtype=torch.bfloat16, device="cuda")
    reference = reference_requantized(model)
    eager = copy.deepcopy(model)
    before = state_snapshot(model)
    expert_bytes = sum(getattr(m, p).numel() * 2 for m in experts_of(model) for p in PROJECTIONS)
    gc.collect()
    allocated = torch.cuda.memory_allocated()
    accelerate(model, expert_dtype="fp8", keep_original_experts=True)
    accelerate(eager, expert_dtype="fp8", cuda_graphs=False)
    try:
        gc.collect()
        freed = allocated - torch.cuda.memory_allocated()
        assert freed > 2 * 0.45 * expert_bytes, f"freed {freed} of 2 x {expert_bytes} expert bytes"
        ids = token_ids(device="cuda")
        assert rel_error(logits(model, ids), logits(reference, ids)) < TOLERANCE[torch.bfloat16]
        assert bool(triton_calls) == _kernels_read_fp8()
        prompt = token_ids(1, 5, device="cuda")
        assert torch.equal(model.generate(prompt, **_greedy(prompt)), eager.generate(prompt, **_greedy(prompt)))
    finally:
        unpatch(model)
    assert same_bits(before, state_snapshot(model)) and all(p.is_cuda for p in model.parameters())


@pytest.mark.gpu
def test_expert_dtype_with_compile_decode_on_gpu(qwen_fixture, caplog) -> None:
    """The quantized experts' guard hook and block-scaled custom op inside the compiled decode step: it
    compiles (no fallback to the uncompiled step) and decodes the tokens asked for."""
    model, _ = load_fixture(qwen_fixture, dtype=torch.bfloat16, device="cuda")
    accelerate(model, expert_dtype="fp8", keep_original_experts=True, compile_decode=True)
    try:
        prompt = token_ids(1, 5, device="cuda")
        with caplog.at_level(logging.WARNING, logger="hf_moe_accel"):
            assert model.generate(prompt, **_greedy(prompt)).shape == (1, 17)
        assert not [r for r in caplog.records if "torch.compile'd decode step failed" in r.getMessage()]
    finally:
        unpatch(model)
