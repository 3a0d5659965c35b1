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


def test_bench_command_writes_the_ab_table_json_and_plot(fixture_path, tmp_path, capsys):
    """`hf-moe-accel bench --model PATH` on CPU: per run, both stock baselines before and after ours,
    the best as the baseline, ours, the speedup, and how PDL stood (off on CPU, with the reason)."""
    import json

    from hf_moe_accel.cli import main

    out, png = tmp_path / "ab.json", tmp_path / "ab.png"
    assert main(["bench", "--model", str(fixture_path), "--batch", "1,2", "--prompt-len", "8", "--new-tokens", "3",
                 "--repeats", "1", "--json", str(out), "--plot", str(png)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["batch"], r["prompt_len"], r["new_tokens"]) for r in rows] == [(1, 8, 3), (2, 8, 3)]
    for row in rows:
        baselines = row["stock"]["baselines"]
        assert set(baselines) == {"default", "static"} and all(set(b) == {"before", "after"} for b in baselines.values())
        best = max(baselines, key=lambda name: max(p["decode_tokens_per_s"] for p in baselines[name].values()))
        assert row["stock"]["best_baseline"] == best
        assert row["speedup"] == pytest.approx(row["ours"]["decode_tokens_per_s"] / row["stock"]["decode_tokens_per_s"])
        assert row["pdl"] == {"kernels": "off (not a CUDA launch)", "inductor": "off (not a CUDA launch)"}
        assert "hbm_limit_tokens_per_s" not in row  # no copy bandwidth measured on CPU
    printed = capsys.readouterr().out
    assert all(f"| {row['model']} | {row['batch']} |" in printed for row in rows), printed
    assert png.stat().st_size > 0
