"""bench.ab.run_stock_first: stock's generate() runs as the bench runs it before ours (CPU)."""

from __future__ import annotations

import pytest
import torch

from hf_moe_accel.bench import ab
from tests.helpers import load_fixture


@pytest.mark.parametrize("reset", [False, True])
def test_run_stock_first_runs_each_baseline_and_resets_on_request(fixture_path, monkeypatch, reset):
    model, _ = load_fixture(fixture_path)
    ids = torch.randint(1, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    calls, resets = [], []
    real_timed_generate = ab.timed_generate

    def recording_timed_generate(model, input_ids, new_tokens, **options):
        calls.append((new_tokens, options))
        return real_timed_generate(model, input_ids, new_tokens, **options)  # a real stock generate() call

    monkeypatch.setattr(ab, "timed_generate", recording_timed_generate)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(True))
    ab.run_stock_first(model, ids, 3, reset=reset)
    assert calls == [(3, {}), (3, {"cache_implementation": "static"}), (3, {"cache_implementation": "static"})]
    assert resets == ([True] if reset else [])
