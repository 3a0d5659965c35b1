"""`hf-moe-accel eval`: perplexity, greedy agreement and experts per token for each setting."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hf_moe_accel import is_accelerated
from hf_moe_accel.bench.quality import (
    EvalConfig,
    ExpertCounter,
    evaluate,
    greedy_agreement,
    perplexity,
    sweep_settings,
)
from hf_moe_accel.cli import main

from .helpers import heldout_perplexity, load_fixture


class NextTokenModel(nn.Module):
    """Predicts token + 1 at every position (vocabulary of 10), as logits."""

    def forward(self, ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.nn.functional.one_hot((ids + 1) % 10, 10).float())


def test_greedy_agreement_counts_the_continuation_only() -> None:
    # Prompt of 2 tokens, then 4 continuation tokens; the model predicts +1 each step.
    sequences = torch.tensor([[0, 1, 2, 3, 9, 5], [4, 4, 5, 7, 8, 9]])
    # Row 0: 2 (ok), 3 (ok), 9 (no: 4 predicted), 5 (no: 0 predicted). Row 1: 5 ok, 7 no, 8 ok, 9 ok.
    assert greedy_agreement(NextTokenModel(), sequences, prompt_len=2) == pytest.approx(5 / 8)


def test_expert_counter_skips_no_expert_ids() -> None:
    counter = ExpertCounter()
    counter(None, (None, torch.tensor([[0, 3, -1], [-1, -1, 2]]), None), {})
    counter(None, (None,), {"top_k_index": torch.tensor([[1, 2, 3]])})
    assert counter.per_token == pytest.approx((2 + 1 + 3) / 3)


def test_perplexity_matches_the_test_helper(fixture_path) -> None:
    model, tokenizer = load_fixture(fixture_path)
    ids = tokenizer((fixture_path / "heldout.txt").read_text(), return_tensors="pt").input_ids[0][:512]
    expected = heldout_perplexity(model, tokenizer, fixture_path, max_tokens=512)
    assert perplexity(model, ids.view(2, 256), batch=1) == pytest.approx(expected, rel=1e-5)


SMALL = EvalConfig(max_tokens=512, batch=2, prompts=3, prompt_len=24, new_tokens=6)


def test_evaluate_settings(fixture_path) -> None:
    model, tokenizer = load_fixture(fixture_path)
    token_ids = tokenizer((fixture_path / "heldout.txt").read_text(), return_tensors="pt").input_ids[0]
    result = evaluate(model, token_ids, sweep_settings([1], [0.3]), SMALL, progress=False)
    assert not is_accelerated(model), "evaluate leaves the model stock"
    rows = {r["name"]: r for r in result["settings"]}
    assert list(rows) == ["stock", "full", "top_k=1", "threshold=0.3"]
    top_k = model.config.num_experts_per_tok
    assert rows["full"]["ppl"] == pytest.approx(rows["stock"]["ppl"], rel=1e-4)
    assert rows["stock"]["agreement"] == 1.0 and rows["full"]["agreement"] == 1.0
    assert rows["stock"]["experts_per_token"] == rows["full"]["experts_per_token"] == top_k
    assert rows["top_k=1"]["experts_per_token"] == 1.0 and rows["top_k=1"]["experts_fraction"] == 1 / top_k
    assert rows["top_k=1"]["ppl"] > rows["full"]["ppl"] * 1.01 and rows["top_k=1"]["agreement"] < 1.0
    assert 1.0 < rows["threshold=0.3"]["experts_per_token"] < top_k
    assert result["ppl_tokens"] == 512


def test_cli_writes_table_json_and_plot(fixture_path, tmp_path, capsys) -> None:
    out_json, out_png = tmp_path / "eval.json", tmp_path / "eval.png"
    rc = main([
        "eval", "--model", str(fixture_path), "--text", str(fixture_path / "heldout.txt"), "--top-k", "1",
        "--max-tokens", "256", "--prompts", "2", "--prompt-len", "16", "--new-tokens", "3", "--speed-batch", "1",
        "--json", str(out_json), "--plot", str(out_png),
    ])  # fmt: skip
    assert rc == 0
    result = json.loads(out_json.read_text())
    assert [r["name"] for r in result["settings"]] == ["stock", "full", "top_k=1"]
    assert all(r["ppl"] > 1 and r["decode_tokens_per_s"] > 0 for r in result["settings"])
    assert out_png.stat().st_size > 10_000
    assert "| top_k=1 | 1.00 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [(["--top-k", "0"], "at least 1"), (["--threshold", "1.0"], r"[0, 1)"), (["--top-k", "99"], "[1, "),
     (["--window", "0"], "window")],
    ids=["top_k 0", "threshold 1", "top_k above experts", "window 0"],
)
def test_cli_rejects_bad_values(fixture_path, capsys, args: list[str], message: str) -> None:
    rc = main(["eval", "--model", str(fixture_path), "--text", str(fixture_path / "heldout.txt"), *args])
    assert rc == 2 and message in capsys.readouterr().err
