"""The A/B bench on CPU: stock's generate() runs as the bench runs it before ours; the command's
table, JSON and plot (decode, time to first token, prefill tokens/s per batch and prompt length);
the one-token time to first token; the list of prompt lengths; start-up in fresh processes."""

from __future__ import annotations

import importlib
import json
import os
import tempfile

import pytest
import torch

from hf_moe_accel.bench import ab, timing
from hf_moe_accel.cli import main
from hf_moe_accel.cli.main import build_parser
from tests.helpers import load_fixture

cli_main_module = importlib.import_module("hf_moe_accel.cli.main")


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
    """`hf-moe-accel bench --model PATH` on CPU: per batch and prompt length (shortest prompt first),
    both stock baselines before and after ours, the best as the baseline for decode and, apart, for
    time to first token; ours, the speedups, and how PDL stood (off on CPU, with the reason)."""
    out, png = tmp_path / "ab.json", tmp_path / "ab.png"
    assert main(["bench", "--model", str(fixture_path), "--batch", "1,2", "--prompt-len", "8,4", "--new-tokens", "3",
                 "--repeats", "1", "--json", str(out), "--plot", str(png)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["batch"], r["prompt_len"], r["new_tokens"]) for r in rows] == [(1, 4, 3), (2, 4, 3), (1, 8, 3), (2, 8, 3)]
    for row in rows:
        baselines = row["stock"]["baselines"]
        assert set(baselines) == {"default", "static"} and all(set(b) == {"before", "after"} for b in baselines.values())
        best = max(baselines, key=lambda name: max(p["decode_tokens_per_s"] for p in baselines[name].values()))
        assert row["stock"]["best_baseline"] == best
        assert row["speedup"] == pytest.approx(row["ours"]["decode_tokens_per_s"] / row["stock"]["decode_tokens_per_s"])
        tokens = row["batch"] * row["prompt_len"]
        passes = [(name, when, p) for name, b in baselines.items() for when, p in b.items()]
        for result in [p for _, _, p in passes] + [row["ours"]]:
            assert result["ttft_s"] > 0 and result["first_logits_s"] > 0
            assert result["prefill_tokens_per_s"] == pytest.approx(tokens / result["ttft_s"])
        name, when, fastest = min(passes, key=lambda t: t[2]["ttft_s"])
        assert row["stock"]["prefill_best"] == {"baseline": name, "pass": when, "ttft_s": fastest["ttft_s"],
                                                "prefill_tokens_per_s": fastest["prefill_tokens_per_s"]}
        assert row["ttft_ratio"] == pytest.approx(row["ours"]["ttft_s"] / fastest["ttft_s"])
        assert row["prefill_speedup"] == pytest.approx(row["ours"]["prefill_tokens_per_s"] / fastest["prefill_tokens_per_s"])
        assert row["pdl"] == {"kernels": "off (not a CUDA launch)", "inductor": "off (not a CUDA launch)"}
        assert "hbm_limit_tokens_per_s" not in row  # no copy bandwidth measured on CPU
        assert "start" not in row  # no --start-time
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[:3] == ["model", "batch", "prompt"]
    for column in ("stock default TTFT ms", "stock static TTFT ms", "ours TTFT ms", "prefill tok/s stock best / ours",
                   "prefill speedup"):
        assert column in header, header
    assert not any("start" in column for column in header)
    for line, row in zip(table[1:], rows):
        cells = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|"))))
        assert (cells["batch"], cells["prompt"]) == (str(row["batch"]), str(row["prompt_len"]))
        assert cells["ours TTFT ms"] == f"{1e3 * row['ours']['ttft_s']:.1f}"
        for name, passes in row["stock"]["baselines"].items():  # each baseline's shorter TTFT of its two passes
            assert cells[f"stock {name} TTFT ms"] == f"{1e3 * min(p['ttft_s'] for p in passes.values()):.1f}"
        assert cells["prefill speedup"] == f"{row['prefill_speedup']:.2f}x (CPU reference path)"
    assert png.stat().st_size > 0


def test_the_plot_has_decode_ttft_and_prefill_panels(fixture_path, tmp_path):
    pytest.importorskip("matplotlib")
    model, _ = load_fixture(fixture_path)
    rows = ab.run_ab(model, "fixture", [ab.BenchWorkload(1, 4, 2), ab.BenchWorkload(1, 8, 2)], repeats=1,
                     stock_passes=1, accelerate_options={"cuda_graphs": False})
    fig = ab.figure(rows)
    decode, first, prefill = fig.axes
    assert [ax.get_ylabel() for ax in fig.axes] == ["decode tokens/s", "time to first token, ms (lower is better)",
                                                    "prefill tokens/s"]
    # Bars go series by series (stock default, stock static, ours), one per workload in each.
    ours = slice(2 * len(rows), 3 * len(rows))
    assert [b.get_height() for b in decode.patches[ours]] == pytest.approx([r["ours"]["decode_tokens_per_s"] for r in rows])
    assert [b.get_height() for b in first.patches[ours]] == pytest.approx([1e3 * r["ours"]["ttft_s"] for r in rows])
    assert [b.get_height() for b in prefill.patches[ours]] == pytest.approx([r["ours"]["prefill_tokens_per_s"] for r in rows])
    stock_static = [min(p["ttft_s"] for p in r["stock"]["baselines"]["static"].values()) for r in rows]
    assert [b.get_height() for b in first.patches[len(rows):2 * len(rows)]] == pytest.approx([1e3 * t for t in stock_static])
    import matplotlib.pyplot as plt

    plt.close(fig)


@pytest.mark.parametrize("one_token_ttft", [False, True])
def test_time_to_first_token_is_a_one_token_generate(fixture_path, monkeypatch, one_token_ttft):
    """With one_token_ttft, TTFT is the median of `repeats` generate() calls of one new token after an
    untimed one, apart from the full-length runs; without it, the first logits of the full-length runs."""
    model, _ = load_fixture(fixture_path)
    ids = torch.randint(1, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    calls = []
    real_forced_greedy = timing.forced_greedy

    def recording(model, input_ids, new_tokens, **options):
        calls.append(new_tokens)
        return real_forced_greedy(model, input_ids, new_tokens, **options)

    monkeypatch.setattr(timing, "forced_greedy", recording)
    result = timing.time_generate(model, ids, 4, repeats=3, one_token_ttft=one_token_ttft)
    assert calls == [4] * 4 + ([1] * 4 if one_token_ttft else [])
    assert result.prefill_tokens_per_s == pytest.approx(2 * 5 / result.ttft_s)
    if not one_token_ttft:
        assert result.ttft_s == result.first_logits_s
    durations = iter([0.5, 0.2, 0.3, 0.1])  # the untimed call, then three timed ones: median 0.2
    monkeypatch.setattr(timing, "time_first_token", lambda *a, **k: next(durations))
    if one_token_ttft:
        assert timing.time_generate(model, ids, 4, repeats=3, one_token_ttft=True).ttft_s == 0.2


def test_prompt_len_takes_a_list_and_one_value():
    parse = build_parser().parse_args
    assert parse(["bench", "--prompt-len", "128,2048,8192"]).prompt_len == [128, 2048, 8192]
    assert parse(["bench", "--prompt-len", "128"]).prompt_len == [128]
    assert parse(["bench", "--prompt-len", " 4, 8"]).prompt_len == [4, 8]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt-len", "0"], ">= 1"),
        (["--prompt-len", "128,0"], ">= 1, got 0"),
        (["--prompt-len", "128,eight"], "expected an integer >= 1, got 'eight'"),
        (["--prompt-len", "128,,2048"], "comma-separated"),
        (["--prompt-len", ""], "comma-separated"),
        (["--prompt-len", "128,2048,128"], "128 more than once"),
        (["--prompt-len", "128,256", "--gpu-memory", "16GiB"], "give --prompt-len one value"),
        (["--start-time", "--gpu-memory", "16GiB"], "doesn't combine with --gpu-memory"),
    ],
)
def test_bench_refuses_bad_prompt_lengths_before_any_model(argv, message, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built for a refused command")

    monkeypatch.setattr(cli_main_module, "_bench_model", no_model)
    assert main(["bench", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def _probe_script(body: str):
    """A start probe as `python -c`: `body` runs with `out` (the result file) and `os` defined."""
    return lambda workload, out: ["-c", f"import json, os\nout = {out!r}\n{body}"]


def test_start_probes_share_caches_in_a_new_folder_cold_then_warm():
    """The cold process starts with empty caches; the warm one finds what the cold one wrote; both
    in one folder that is new and gone afterwards; every cache variable points there."""
    body = (
        "names = " + repr(ab.START_CACHE_VARIABLES) + "\n"
        "folder = os.environ['TORCHINDUCTOR_CACHE_DIR']\n"
        "found = os.path.isdir(folder) and sorted(os.listdir(folder))\n"
        "os.makedirs(folder, exist_ok=True)\n"
        "open(os.path.join(folder, 'artifact'), 'w').close()\n"
        "json.dump({'found': found, 'pid': os.getpid(), 'caches': {n: os.environ[n] for n in names}}, open(out, 'w'))\n"
    )
    (start,) = ab.measure_start(_probe_script(body), [ab.BenchWorkload(1, 4, 2)])
    cold, warm = start["cold"], start["warm"]
    assert cold["found"] is False and warm["found"] == ["artifact"]
    assert len({cold["pid"], warm["pid"], os.getpid()}) == 3
    assert cold["caches"] == warm["caches"]
    roots = {os.path.dirname(path) for path in cold["caches"].values()}
    assert len(roots) == 1 and len(set(cold["caches"].values())) == len(ab.START_CACHE_VARIABLES)
    assert not os.path.exists(roots.pop())
    assert all(os.environ.get(name) != path for name, path in cold["caches"].items())


def test_a_failed_start_probe_is_reported_and_the_next_one_runs():
    body = "import sys\nprint('probe broke', file=sys.stderr)\nsys.exit(3)\n"
    lines = []
    starts = ab.measure_start(_probe_script(body), [ab.BenchWorkload(1, 4, 2), ab.BenchWorkload(2, 4, 2)],
                              report=lines.append)
    assert len(starts) == 2
    for start in starts:
        assert start["cold"] == start["warm"] == {"error": "exit status 3: probe broke"}
    assert len(lines) == 4 and all("probe broke" in line for line in lines)
    row = {"model": "m", "device": "cpu", "batch": 1, "prompt_len": 4, "accelerate_options": {}, "speedup": None,
           "stock": {"baselines": {"default": {"before": {"error": "x"}}}, "prefill_best": None},
           "ours": {"decode_tokens_per_s": 1.0, "ttft_s": 0.5, "prefill_tokens_per_s": 8.0, "peak_memory_gib": None},
           "start": starts[0]}
    line = ab.markdown_table([row]).splitlines()[2]
    assert line.endswith("| failed | failed |") and "| failed / 8 |" in line


def test_start_time_runs_accelerate_and_the_first_generate_in_two_fresh_processes(tmp_path, capsys):
    """`bench --start-time`: per workload, a cold and a warm probe process with this run's model and
    options; each times accelerate() and its first generate() (to the first token, to its end)."""
    out = tmp_path / "start.json"
    assert main(["bench", "--preset", "tiny-qwen3-moe", "--device", "cpu", "--batch", "1", "--prompt-len", "4",
                 "--new-tokens", "2", "--repeats", "1", "--stock", "default", "--stock-passes", "1", "--top-k", "2",
                 "--start-time", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["accelerate_options"] == {"cuda_graphs": True, "top_k": 2}
    cold, warm = row["start"]["cold"], row["start"]["warm"]
    for probe in (cold, warm):
        assert probe["accelerate_options"] == row["accelerate_options"]
        assert 0 < probe["accelerate_s"] < probe["first_token_s"] < probe["first_generate_s"]
        assert probe["pid"] != os.getpid()
    assert cold["pid"] != warm["pid"] and cold["caches"] == warm["caches"]
    (folder,) = {os.path.dirname(path) for path in cold["caches"].values()}  # one folder, removed afterwards
    assert folder.startswith(tempfile.gettempdir()) and not os.path.exists(folder)
    printed = capsys.readouterr().out
    assert "start-up, batch 1, prompt 4, cold: first token" in printed
    assert "start-up, batch 1, prompt 4, warm: first token" in printed
    header, line = [line for line in printed.splitlines() if line.startswith("| ")]
    assert header.endswith("| cold start s (token / generate) | warm start s (token / generate) |")
    assert line.endswith(f"| {cold['first_token_s']:.1f} / {cold['first_generate_s']:.1f} "
                         f"| {warm['first_token_s']:.1f} / {warm['first_generate_s']:.1f} |")

