"""Pickling and copying an accelerated model.

A pickle (`torch.save(model)`, `pickle.dumps`, multiprocessing) of an accelerated model loads back as
the stock model: stock classes, the stock implementation names in its configs, no state of ours,
the same weights and the same generations; loading it needs no hf_moe_accel. Pickling leaves the
accelerated model as it was. `copy.deepcopy` gives an accelerated copy of its own: unpatching either
leaves the other accelerated, and a copy made after graphs were captured captures its own.
"""

from __future__ import annotations

import copy
import importlib
import io
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from hf_moe_accel import accelerate, is_accelerated, unpatch
from hf_moe_accel.graphs import graph_stats
from hf_moe_accel.graphs.generate import GraphBackend, enable_graph_decode
from hf_moe_accel.patches.attention import DECODE_ATTENTION
from hf_moe_accel.patches.experts import EXPERTS_IMPLEMENTATION, experts_state
from hf_moe_accel.patches.swap import is_swapped

from .helpers import load_fixture, module_classes
from .test_experts_interface import KernelCalls, experts_of, greedy, ids, logits
from .test_graphs import PROMPTS, stand_in_capture


@pytest.fixture
def kernel_calls(monkeypatch) -> KernelCalls:
    return KernelCalls(monkeypatch)


def torch_round_trip(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def pickle_round_trip(model: nn.Module) -> nn.Module:
    return pickle.loads(pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL))


def ours_left_on(model: nn.Module) -> dict[str, object]:
    """Attributes of ours holding anything but None, by module name."""
    return {f"{name}.{key}": value for name, module in model.named_modules() for key, value in module.__dict__.items()
            if key.startswith("_hf_moe_accel") and value is not None}


def assert_stock(loaded: nn.Module, stock: nn.Module) -> None:
    assert module_classes(loaded) == module_classes(stock)
    for module in loaded.modules():  # each class is the one its name imports (a pickle names it so)
        cls = type(module)
        assert getattr(importlib.import_module(cls.__module__), cls.__qualname__) is cls, cls
    for config in (loaded.config, *(m.config for m in experts_of(loaded))):
        assert type(config._experts_implementation) is str and config._experts_implementation == stock.config._experts_implementation
        assert type(config._attn_implementation) is str and config._attn_implementation == stock.config._attn_implementation
    assert not is_accelerated(loaded) and not ours_left_on(loaded)
    stock_state = stock.state_dict()
    assert all(torch.equal(value, stock_state[key]) for key, value in loaded.state_dict().items())


@pytest.mark.parametrize("round_trip", [torch_round_trip, pickle_round_trip], ids=["torch.save", "pickle"])
@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graph-decode", "no-graphs"])
def test_a_pickle_loads_back_as_the_stock_model(fixture_path, kernel_calls, round_trip, cuda_graphs):
    model, _ = load_fixture(fixture_path)
    stock, _ = load_fixture(fixture_path)
    accelerate(model, cuda_graphs=cuda_graphs)
    classes = module_classes(model)
    assert any(is_swapped(m) for m in model.modules())  # the classes a plain pickle couldn't name

    loaded = round_trip(model)
    assert_stock(loaded, stock)
    with kernel_calls.refused():
        torch.testing.assert_close(logits(loaded, ids()), logits(stock, ids()), rtol=0, atol=0)
        assert torch.equal(greedy(loaded, ids()), greedy(stock, ids()))
    accelerate(loaded)  # a loaded model accelerates as any stock one
    assert torch.equal(greedy(loaded, ids()), greedy(stock, ids())) and kernel_calls.count > 0
    unpatch(loaded)

    # Pickling left the accelerated model as it was.
    assert is_accelerated(model) and module_classes(model) == classes
    assert model.config._experts_implementation == EXPERTS_IMPLEMENTATION
    assert model.config._attn_implementation == DECODE_ATTENTION
    calls = kernel_calls.count
    assert torch.equal(greedy(model, ids()), greedy(stock, ids())) and kernel_calls.count > calls
    unpatch(model)


def test_a_pickle_loads_without_hf_moe_accel(fixture_path, tmp_path):
    """The pickle names Transformers' classes and names only: a process that never imports hf_moe_accel loads it."""
    model, _ = load_fixture(fixture_path)
    stock, _ = load_fixture(fixture_path)
    accelerate(model)
    torch.save(model, tmp_path / "model.pt")
    torch.save(ids(), tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        model = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False)
        inputs = torch.load({str(tmp_path / "ids.pt")!r})
        assert not any(name.split(".")[0] == "hf_moe_accel" for name in sys.modules), "hf_moe_accel was imported"
        with torch.no_grad():
            tokens = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=8, min_new_tokens=8,
                                    do_sample=False, pad_token_id=0)
        torch.save(tokens, {str(tmp_path / "tokens.pt")!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "tokens.pt"), greedy(stock, ids()))
    unpatch(model)


def test_deepcopy_is_an_accelerated_model_of_its_own(fixture_path, kernel_calls):
    model, _ = load_fixture(fixture_path)
    stock, _ = load_fixture(fixture_path)
    accelerate(model)
    twin = copy.deepcopy(model)
    assert is_accelerated(twin) and module_classes(twin) == module_classes(model)
    assert twin.config is not model.config and twin.config._experts_implementation == EXPERTS_IMPLEMENTATION
    assert all(experts_state(m) is not None for m in experts_of(twin))
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(twin.parameters(), model.parameters()))
    torch.testing.assert_close(logits(twin, ids()), logits(stock, ids()), rtol=1e-5, atol=1e-5)
    assert kernel_calls.count == len(experts_of(twin))

    twin.set_experts_implementation("eager")  # the copy's config alone
    assert model.config._experts_implementation == EXPERTS_IMPLEMENTATION
    unpatch(twin)
    assert module_classes(twin) == module_classes(stock) and twin.config._experts_implementation == "eager"
    assert is_accelerated(model) and model.config._experts_implementation == EXPERTS_IMPLEMENTATION
    calls = kernel_calls.count
    assert torch.equal(greedy(model, ids()), greedy(stock, ids())) and kernel_calls.count > calls
    unpatch(model)
    assert module_classes(model) == module_classes(stock) and model.config._experts_implementation == "grouped_mm"


def test_deepcopy_after_captures_captures_its_own_graphs(fixture_path):
    """Captured graphs replay the memory of the model they were captured on (found by their cache's id,
    which a later cache may reuse once that one is freed): a deep copy holds none of them, captures its
    own and decodes as stock, while the original keeps its graphs."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fixture_path, padding_side="left")
    model, _ = load_fixture(fixture_path)
    stock, _ = load_fixture(fixture_path)
    accelerate(model, cuda_graphs=False)
    enable_graph_decode(model, GraphBackend("cpu", stand_in_capture))
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    expected = stock.generate(**inputs, **kwargs)
    assert torch.equal(model.generate(**inputs, **kwargs), expected) and graph_stats(model)["captures"] == 1

    twin = copy.deepcopy(model)
    assert graph_stats(twin)["captures"] == 0
    with torch.no_grad():  # weights of the copy alone change: a graph of the original would not see it
        for parameter in twin.parameters():
            parameter.mul_(1.5)
    twin_stock = copy.deepcopy(stock)
    with torch.no_grad():
        for parameter in twin_stock.parameters():
            parameter.mul_(1.5)
    assert torch.equal(twin.generate(**inputs, **kwargs), twin_stock.generate(**inputs, **kwargs))
    assert graph_stats(twin)["captures"] == 1 and graph_stats(twin)["replays"] == 9
    assert torch.equal(model.generate(**inputs, **kwargs), expected) and graph_stats(model)["captures"] == 1
