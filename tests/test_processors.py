"""The logits processors' stand-ins (graphs/processors.py): the same scores as Transformers' own, and used only
inside the generate() calls graphs serve."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    TemperatureLogitsWarper,
)

from hf_moe_accel import accelerate
from hf_moe_accel.graphs.generate import GraphBackend, enable_graph_decode
from hf_moe_accel.graphs.processors import (
    EosBelowLengthProcessor,
    stand_in_for,
    with_stand_ins,
)

from .test_graphs import stand_in_capture

VOCAB = 97


def _stock_processors(eos: int | list[int], prompt: int, min_new: int) -> list:
    return [MinLengthLogitsProcessor(prompt + min_new, eos), MinNewTokensLengthLogitsProcessor(prompt, min_new, eos)]


@pytest.mark.parametrize("eos", [5, [5, 96], [0]])
@pytest.mark.parametrize("batch", [1, 3])
def test_stand_ins_give_stock_s_scores_below_at_and_past_the_length(eos, batch):
    prompt, min_new = 7, 4
    generator = torch.Generator().manual_seed(0)
    for stock in _stock_processors(eos, prompt, min_new):
        ours = stand_in_for(stock)
        assert isinstance(ours, EosBelowLengthProcessor)
        for length in (prompt, prompt + min_new - 1, prompt + min_new, prompt + min_new + 3):  # below, below, at, past
            input_ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
            scores = torch.randn(batch, VOCAB, generator=generator)
            expected = stock(input_ids, scores.clone())
            got = ours(input_ids, scores)
            assert torch.equal(got, expected), (type(stock).__name__, length)
            assert got.data_ptr() != scores.data_ptr()  # a new tensor, as stock's: later processors may write theirs
        below = ours(torch.zeros(batch, prompt, dtype=torch.long), torch.zeros(batch, VOCAB))
        assert (below[:, eos] == float("-inf")).all() and below.isfinite().sum() == batch * (VOCAB - len(torch.tensor(eos).view(-1)))


def test_only_those_two_classes_get_stand_ins():
    class MyMinLength(MinLengthLogitsProcessor):  # a subclass may do more than its parent: kept
        pass

    temperature = TemperatureLogitsWarper(0.7)
    mine = MyMinLength(10, 3)
    stock = _stock_processors(3, 5, 5)
    processors = with_stand_ins(LogitsProcessorList([temperature, stock[0], mine, stock[1]]))
    assert isinstance(processors, LogitsProcessorList)
    assert processors[0] is temperature and processors[2] is mine
    assert isinstance(processors[1], EosBelowLengthProcessor) and isinstance(processors[3], EosBelowLengthProcessor)
    assert (processors[1].min_length, processors[3].min_length) == (10, 10)


def test_served_calls_use_the_stand_ins_and_decode_what_stock_does(fixture_path, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(fixture_path)
    stock = AutoModelForCausalLM.from_pretrained(fixture_path, dtype=torch.float32).eval()
    served = AutoModelForCausalLM.from_pretrained(fixture_path, dtype=torch.float32).eval()
    accelerate(served, cuda_graphs=False)
    enable_graph_decode(served, GraphBackend("cpu", stand_in_capture))
    seen = []
    original_call = LogitsProcessorList.__call__

    def recording_call(self, input_ids, scores, **kwargs):
        seen.append([type(processor) for processor in self])
        return original_call(self, input_ids, scores, **kwargs)

    monkeypatch.setattr(LogitsProcessorList, "__call__", recording_call)
    inputs = tokenizer(["def main("], return_tensors="pt")
    prompt = inputs["input_ids"].shape[1]
    # EOS is the token greedy decoding picks first: the stand-ins must hold it off for min_new_tokens steps.
    first = int(stock.generate(**inputs, max_new_tokens=1, do_sample=False)[0, prompt])
    kwargs = dict(max_new_tokens=10, min_new_tokens=6, do_sample=False, eos_token_id=first, pad_token_id=0)
    expected = stock.generate(**inputs, **kwargs, cache_implementation="static", disable_compile=True)
    stock_types = seen[-1]
    seen.clear()
    got = served.generate(**inputs, **kwargs)
    assert torch.equal(got, expected) and got.shape[1] > prompt + 6
    assert MinNewTokensLengthLogitsProcessor in stock_types
    assert EosBelowLengthProcessor in seen[-1] and MinNewTokensLengthLogitsProcessor not in seen[-1]
    assert len(seen[-1]) == len(stock_types)
