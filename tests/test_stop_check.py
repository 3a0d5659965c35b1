"""Deferred stop checks (transformers >= 5.18) inside the generate() calls our graphs serve.

On CUDA they remove the host's wait on every decode step; what they return is checked against the
eager path in test_graphs.py (EOS mid-way, stopping criteria, streamers, sampling) on the GPU. Here,
on CPU: the switch itself, which only ever answers differently inside a served call, on CUDA, for a
cache the caller doesn't get back.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
)

from hf_moe_accel import accelerate
from hf_moe_accel.graphs import graph_stats
from hf_moe_accel.graphs.generate import GraphBackend, enable_graph_decode
from hf_moe_accel.graphs.stop_check import (
    deferred_stop_checks,
    stop_checks_can_be_deferred,
)

from .test_graphs import stand_in_capture

pytestmark = pytest.mark.skipif(not stop_checks_can_be_deferred(), reason="transformers < 5.18 has no DeferredStopCheck")

CUDA = torch.device("cuda")


def is_supported(device: torch.device, cache_is_returned: bool = False, is_assistant: bool = False) -> bool:
    from transformers.generation.utils import DeferredStopCheck

    return DeferredStopCheck.is_supported(device, None, cache_is_returned, is_assistant=is_assistant)


def test_deferred_only_inside_our_calls_on_cuda_for_a_cache_not_returned():
    calls = []
    assert not is_supported(CUDA)  # transformers' own rule: MPS only
    with deferred_stop_checks(lambda: calls.append(1)):
        assert is_supported(CUDA)
        assert not is_supported(CUDA, cache_is_returned=True)
        assert not is_supported(CUDA, is_assistant=True)
        assert not is_supported(torch.device("cpu"))
    assert not is_supported(CUDA)  # the wrap stays, and answers as before outside
    assert len(calls) == 1


def test_nested_contexts_restore_the_outer_callback():
    outer, inner = [], []
    with deferred_stop_checks(lambda: outer.append(1)):
        with deferred_stop_checks(lambda: inner.append(1)):
            is_supported(CUDA)
        is_supported(CUDA)
    assert (len(outer), len(inner)) == (1, 1)


class AskIfDeferrable(LogitsProcessor):
    """Asks, from inside generate()'s loop, whether a CUDA call would defer its stop checks."""

    def __init__(self):
        self.answers: list[bool] = []

    def __call__(self, input_ids, scores):
        self.answers.append(is_supported(CUDA))
        return scores


def test_served_generate_calls_switch_deferral_on_and_plain_ones_do_not(fixture_path):
    tokenizer = AutoTokenizer.from_pretrained(fixture_path)
    inputs = tokenizer(["def main("], return_tensors="pt")
    served = accelerate(AutoModelForCausalLM.from_pretrained(fixture_path, dtype=torch.float32), cuda_graphs=False)
    enable_graph_decode(served, GraphBackend("cpu", stand_in_capture))
    plain = accelerate(AutoModelForCausalLM.from_pretrained(fixture_path, dtype=torch.float32), cuda_graphs=False)
    for model, expected in ((served, True), (plain, False)):
        probe = AskIfDeferrable()
        model.generate(**inputs, max_new_tokens=3, do_sample=False, logits_processor=LogitsProcessorList([probe]))
        assert probe.answers == [expected] * 3
    # Each deferral granted is counted: here only the probe's three (the call itself, on CPU, kept
    # transformers' per-step checks).
    assert graph_stats(served)["deferred_stop_checks"] == 3
