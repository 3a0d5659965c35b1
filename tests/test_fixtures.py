"""The trained fixtures (real routing): greedy tokens and held-out perplexity equal to stock."""

import pytest
import torch

from hf_moe_accel import accelerate, patch_report, unpatch

from .helpers import heldout_perplexity, load_fixture, module_classes, state_snapshot

PROMPTS = ["def parse_header(line):\n    ", "import os\nimport sys\n\nclass ", "    for key, value in "]


def _greedy(model, tokenizer, new_tokens: int) -> torch.Tensor:
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True).to(model.device)
    out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[:, batch.input_ids.shape[1] :]


def test_greedy_tokens_identical_to_stock(fixture_path):
    model, tokenizer = load_fixture(fixture_path)
    stock = _greedy(model, tokenizer, 64)
    accelerate(model)
    assert patch_report(model).routers, "the fixture's routers should run the fused routing"
    ours = _greedy(model, tokenizer, 64)
    assert torch.equal(ours, stock)


def test_heldout_perplexity_within_0_1_percent(fixture_path):
    # The first 8192 held-out tokens keep CI fast; the full text is used by `hf-moe-accel eval`.
    model, tokenizer = load_fixture(fixture_path)
    stock = heldout_perplexity(model, tokenizer, fixture_path, max_tokens=8192)
    accelerate(model)
    ours = heldout_perplexity(model, tokenizer, fixture_path, max_tokens=8192)
    assert abs(ours - stock) / stock < 1e-3, (ours, stock)
    assert stock < 200, f"fixture perplexity {stock} is not that of a trained model"


def test_unpatch_restores_classes_and_parameters_bitwise(fixture_path):
    model, _ = load_fixture(fixture_path, dtype=torch.bfloat16)
    classes, state = module_classes(model), state_snapshot(model)
    accelerate(model)
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 5)))
    assert module_classes(model) != classes
    unpatch(model)
    assert module_classes(model) == classes
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)


def test_parameters_are_shared_not_copied(fixture_path):
    model, _ = load_fixture(fixture_path)
    before = {name: p.data_ptr() for name, p in model.named_parameters()}
    accelerate(model)
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == before


def test_accelerate_twice_patches_once(fixture_path):
    model, _ = load_fixture(fixture_path)
    accelerate(model)
    classes = module_classes(model)
    assert accelerate(model) is model
    assert module_classes(model) == classes


def test_unknown_option_is_rejected(fixture_path):
    model, _ = load_fixture(fixture_path)
    with pytest.raises(TypeError, match="bogus_option"):
        accelerate(model, bogus_option=1)


def test_training_mode_keeps_stock_path_with_gradients(fixture_path):
    model, _ = load_fixture(fixture_path)
    accelerate(model)
    model.train()
    ids = torch.randint(0, 100, (1, 6))
    loss = model(ids, labels=ids).loss
    loss.backward()
    experts = next(m for m in model.modules() if hasattr(m, "gate_up_proj"))
    assert experts.gate_up_proj.grad is not None and experts.gate_up_proj.grad.abs().sum() > 0


def test_router_logits_recorded_as_stock(fixture_path):
    model, _ = load_fixture(fixture_path)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        stock = model(ids, output_router_logits=True).router_logits
        accelerate(model)
        ours = model(ids, output_router_logits=True).router_logits
    assert len(ours) == len(stock) == model.config.num_hidden_layers
    for a, b in zip(ours, stock):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_unserved_dtype_falls_back_to_reference_with_one_warning(fixture_path, caplog):
    model, _ = load_fixture(fixture_path, dtype=torch.float64)
    model.set_experts_implementation("eager")  # stock's grouped_mm has no float64 kernel
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        stock = model(ids).logits
        with caplog.at_level("WARNING", logger="hf_moe_accel"):
            accelerate(model)
            ours = model(ids).logits
            model(ids)
    warnings = [r for r in caplog.records if "reference path" in r.getMessage()]
    assert len(warnings) == 1 and "float64" in warnings[0].getMessage()
    torch.testing.assert_close(ours, stock, rtol=1e-9, atol=1e-9)


def test_accelerate_again_with_new_options_raises(fixture_path):
    model, _ = load_fixture(fixture_path)
    accelerate(model, cuda_graphs=False)
    with pytest.raises(ValueError, match="unpatch"):
        accelerate(model, top_k=1)
