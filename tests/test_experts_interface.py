"""Our fused experts as a Transformers experts implementation ("hf_moe_accel", patches/experts.py).

After accelerate() the experts' configs name it, so `config._experts_implementation` says what runs;
a user's `set_experts_implementation(...)` runs stock experts (our kernel is not called), switching
back runs ours, and unpatch puts the earlier name back unless the user chose another. Experts that
can't reach the implementation are refused before anything changes; a module reached by the name
without being patched runs stock, with one warning; an offloaded model refuses a switch.
On CPU, with both trained fixtures and tiny configs built in code.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, Qwen3MoeForCausalLM
from transformers.integrations.moe import (
    ALL_EXPERTS_FUNCTIONS,
    ExpertsInterface,
    use_experts_implementation,
)

import hf_moe_accel
from hf_moe_accel import (
    OffloadOptions,
    UnsupportedMoEError,
    accelerate,
    is_accelerated,
    unpatch,
)
from hf_moe_accel.kernels.spec import is_experts_module
from hf_moe_accel.offload.engine import is_offloaded
from hf_moe_accel.patches import experts as experts_module
from hf_moe_accel.patches.attention import DECODE_ATTENTION
from hf_moe_accel.patches.experts import EXPERTS_IMPLEMENTATION, experts_state
from hf_moe_accel.patches.implementations import ImplementationName
from hf_moe_accel.patches.swap import is_swapped

from .helpers import load_fixture

STOCK_CHOICES = ("grouped_mm", "batched_mm", "eager")


def experts_of(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_experts_module(m)]


class KernelCalls:
    """Counts calls of the fused experts kernel (`hf_moe_accel.kernels.fused_experts`); with `refuse`, each raises."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.count = 0
        self.refuse = False
        real = hf_moe_accel.kernels.fused_experts

        def spy(*args, **kwargs):
            if self.refuse:
                raise AssertionError("the fused experts kernel ran while a stock experts implementation was chosen")
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(hf_moe_accel.kernels, "fused_experts", spy)

    @contextlib.contextmanager
    def refused(self):
        self.refuse = True
        try:
            yield
        finally:
            self.refuse = False


@pytest.fixture
def kernel_calls(monkeypatch) -> KernelCalls:
    return KernelCalls(monkeypatch)


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return model(inputs).logits


@torch.no_grad()
def greedy(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=8, min_new_tokens=8,
                          do_sample=False, pad_token_id=0)


def tiny_qwen3_config(**overrides):
    return AutoConfig.for_model("qwen3_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                vocab_size=128, num_experts=8, num_experts_per_tok=2, **overrides)


def test_config_names_our_experts_and_the_experts_keep_their_class(fixture_path, kernel_calls):
    model, _ = load_fixture(fixture_path)
    stock, _ = load_fixture(fixture_path)
    before = model.config._experts_implementation
    classes = [type(m) for m in experts_of(model)]
    accelerate(model)
    try:
        assert model.config._experts_implementation == EXPERTS_IMPLEMENTATION
        assert model.config._attn_implementation == DECODE_ATTENTION
        assert isinstance(model.config._experts_implementation, ImplementationName)
        assert model.config._experts_implementation.stock == before
        assert [type(m) for m in experts_of(model)] == classes  # dispatched, not class-swapped
        assert not any(is_swapped(m) for m in experts_of(model))
        torch.testing.assert_close(logits(model, ids()), logits(stock, ids()), rtol=1e-5, atol=1e-5)
        assert kernel_calls.count == len(experts_of(model))
        assert torch.equal(greedy(model, ids()), greedy(stock, ids()))
    finally:
        unpatch(model)
    assert model.config._experts_implementation == before and type(model.config._experts_implementation) is str


@pytest.mark.parametrize("choice", STOCK_CHOICES)
def test_a_stock_choice_runs_stock_and_switching_back_runs_ours(fixture_path, kernel_calls, choice):
    model, _ = load_fixture(fixture_path)
    stock, _ = load_fixture(fixture_path)
    stock.set_experts_implementation(choice)
    accelerate(model)
    try:
        model.set_experts_implementation(choice)
        assert model.config._experts_implementation == choice
        with kernel_calls.refused():
            # Our fused router still runs (same outputs as the stock router): logits as stock's with `choice`.
            torch.testing.assert_close(logits(model, ids()), logits(stock, ids()), rtol=1e-5, atol=1e-5)
            assert torch.equal(greedy(model, ids()), greedy(stock, ids()))
        assert kernel_calls.count == 0

        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
        torch.testing.assert_close(logits(model, ids()), logits(stock, ids()), rtol=1e-5, atol=1e-5)
        assert kernel_calls.count == len(experts_of(model))
    finally:
        unpatch(model)


def test_unpatch_puts_the_earlier_name_back_unless_the_user_chose_another(fixture_path):
    model = AutoModelForCausalLM.from_pretrained(fixture_path, dtype=torch.float32, experts_implementation="batched_mm")
    assert model.config._experts_implementation == "batched_mm"
    accelerate(model)
    unpatch(model)
    assert model.config._experts_implementation == "batched_mm"

    accelerate(model)
    model.set_experts_implementation("eager")
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)  # back to ours by hand: still ours, so restored
    unpatch(model)
    assert model.config._experts_implementation == "batched_mm"

    accelerate(model)
    model.set_experts_implementation("eager")
    unpatch(model)
    assert model.config._experts_implementation == "eager"  # the user's choice is kept
    assert not is_accelerated(model) and not any(experts_state(m) for m in experts_of(model))


def test_train_mode_runs_the_earlier_stock_implementation(fixture_path, kernel_calls):
    model, _ = load_fixture(fixture_path)
    accelerate(model)
    try:
        model.train()
        with kernel_calls.refused():
            loss = model(input_ids=ids(), labels=ids()).loss
        loss.backward()
        assert experts_of(model)[0].gate_up_proj.grad is not None
        assert model.config._experts_implementation == EXPERTS_IMPLEMENTATION
    finally:
        unpatch(model)


def test_generate_s_decode_switch_leaves_our_name_alone(fixture_path, monkeypatch):
    """generate() switches "grouped_mm" to "batched_mm" for its decode loop off the CPU
    (`_optimize_model_for_decode`); our name is not one it switches. The device is made to read
    cuda so that the switch would happen (it does for a stock "grouped_mm")."""
    model, _ = load_fixture(fixture_path)
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    with model._optimize_model_for_decode():
        assert model.config._experts_implementation == "batched_mm"  # the switch this test relies on
    accelerate(model, cuda_graphs=False)
    try:
        with model._optimize_model_for_decode():
            assert model.config._experts_implementation == EXPERTS_IMPLEMENTATION
        assert model.config._experts_implementation == EXPERTS_IMPLEMENTATION
    finally:
        unpatch(model)


def test_a_module_sharing_the_config_runs_stock_with_one_warning(caplog, kernel_calls, monkeypatch):
    """Two models built from one config object: accelerating one makes the other's experts read our
    name; they run the stock implementation the config had (one warning), until the other is patched
    too. The name goes back only when the last of them is unpatched."""
    monkeypatch.setattr(experts_module, "_warned_unpatched", set())  # once per process: as if first
    config = tiny_qwen3_config()
    torch.manual_seed(0)
    first = Qwen3MoeForCausalLM(config).eval()
    second = Qwen3MoeForCausalLM(config).eval()
    assert second.config is first.config
    expected = logits(second, ids())
    accelerate(first, cuda_graphs=False)
    try:
        with caplog.at_level(logging.WARNING, logger="hf_moe_accel"), kernel_calls.refused():
            torch.testing.assert_close(logits(second, ids()), expected, rtol=1e-5, atol=1e-5)
            logits(second, ids(2))
        warnings = [r.getMessage() for r in caplog.records if "not patched by accelerate()" in r.getMessage()]
        assert len(warnings) == 1 and "Qwen3MoeExperts" in warnings[0] and "'grouped_mm'" in warnings[0], warnings

        accelerate(second, cuda_graphs=False)
        unpatch(first)
        assert config._experts_implementation == EXPERTS_IMPLEMENTATION  # `second` still holds it
        torch.testing.assert_close(logits(second, ids()), expected, rtol=1e-5, atol=1e-5)
        assert kernel_calls.count == len(experts_of(second))
        unpatch(second)
        assert config._experts_implementation == "grouped_mm"
    finally:
        unpatch(first)
        unpatch(second)


class _FP8LikeInterface(ExpertsInterface):
    """An experts interface of its own, as Transformers' FP8 experts have (ALL_FP8_EXPERTS_FUNCTIONS)."""

    _global_mapping = {}


def _fp8_like(experts_class: type) -> type:
    return use_experts_implementation(type(f"FP8Like{experts_class.__name__}", (experts_class,), {}),
                                      experts_interface=_FP8LikeInterface())


def _own_forward(experts_class: type) -> type:
    def forward(self, hidden_states, top_k_index, top_k_weights):
        return experts_class.forward(self, hidden_states, top_k_index, top_k_weights)

    return type(f"OwnForward{experts_class.__name__}", (experts_class,), {"forward": forward})


@pytest.mark.parametrize("subclass", [_fp8_like, _own_forward], ids=["own-interface", "own-forward"])
def test_experts_outside_the_interface_are_refused_before_anything_changes(subclass):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_qwen3_config()).eval()
    last = experts_of(model)[-1]
    last.__class__ = subclass(type(last))
    classes = {name: type(m) for name, m in model.named_modules()}
    names = (model.config._experts_implementation, model.config._attn_implementation)
    with pytest.raises(UnsupportedMoEError, match=type(last).__name__) as error:
        accelerate(model)
    assert "ALL_EXPERTS_FUNCTIONS" in str(error.value)
    assert (model.config._experts_implementation, model.config._attn_implementation) == names
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert not is_accelerated(model) and not any(experts_state(m) for m in model.modules())
    assert EXPERTS_IMPLEMENTATION in ALL_EXPERTS_FUNCTIONS  # registered process-wide at import


def test_an_offloaded_model_refuses_a_switch(fixture_path):
    """Offloaded experts run the offload engine's forward, which the dispatch never reaches: a switch
    raises a RuntimeError saying to unpatch first; unpatch keeps the user's choice."""
    model, _ = load_fixture(fixture_path)
    stock, _ = load_fixture(fixture_path)
    accelerate(model, gpu_memory="1GiB", offload=OffloadOptions(device="cpu", reserve="16MiB", slots_per_layer=2))
    try:
        assert is_offloaded(model)
        logits(model, ids())  # runs while the config names ours
        model.set_experts_implementation("eager")
        with pytest.raises(RuntimeError, match=r"offloaded.*'eager'.*unpatch\(model\) first"):
            logits(model, ids())
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
        logits(model, ids())
        model.set_experts_implementation("eager")
    finally:
        unpatch(model)
    assert model.config._experts_implementation == "eager"
    stock.set_experts_implementation("eager")
    torch.testing.assert_close(logits(model, ids()), logits(stock, ids()), rtol=1e-5, atol=1e-5)
