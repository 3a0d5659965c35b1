"""Bad inputs get one clear error: the command line's checkpoints, numbers and output paths (exit
status 2 and one line on stderr naming what is wrong, no traceback, before any run), hardware
descriptions (the field and its valid range), accelerate()'s argument types (TypeError naming the
option), and what a machine without CUDA is told (the reference path, no speed claim).

Every command-line refusal here must come before a model loads or a run starts: an autouse
fixture makes loading a checkpoint and running the A/B bench fail the test."""

from __future__ import annotations

import importlib
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hf_moe_accel import accelerate, is_accelerated, unpatch
from hf_moe_accel.bench import ab
from hf_moe_accel.cli import main
from hf_moe_accel.costmodel.hardware import hardware_from_json, hardware_preset

# The module (the package's `main` attribute is the function): tests patch its loader.
cli_main_module = importlib.import_module("hf_moe_accel.cli.main")

COMMANDS = ["env", "generate", "eval", "bench", "plan"]


def _argv(command: str, model: str, tmp_path: Path) -> list[str]:
    """The least each command needs beside --model."""
    text = tmp_path / "text.txt"
    text.write_text("some held-out text\n")
    extra = {
        "env": [],
        "generate": ["--prompt", "hi", "--max-new-tokens", "2"],
        "eval": ["--text", str(text)],
        "bench": ["--device", "cpu"],
        "plan": ["--hardware", "h100"],
    }[command]
    return [command, "--model", model, *extra]


def _refused(capsys, argv: list[str], *expected: str) -> str:
    """main(argv) exits with 2 and one stderr line holding each of `expected`; returns that line."""
    rc = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2, (rc, captured.out, err)
    assert "Traceback" not in captured.err and len(err.splitlines()) == 1, err
    for part in expected:
        assert part in err, (part, err)
    return err


def _config(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "num_hidden_layers": 1}))


@pytest.fixture(autouse=True)
def _no_model_loads(monkeypatch):
    """No test here may load weights or build a model for a run: each refusal comes first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(ab, "run_ab", refuse)


# ---- --model: checkpoints that don't exist or are broken -----------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_a_model_path_that_does_not_exist(command, tmp_path, capsys):
    missing = str(tmp_path / "no-such-checkpoint")
    expected = "neither a preset" if command == "plan" else "no such folder"  # plan also takes preset names
    _refused(capsys, _argv(command, missing, tmp_path), missing, expected)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_folder_without_config_json(command, tmp_path, capsys):
    folder = tmp_path / "not-a-checkpoint"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    _refused(capsys, _argv(command, str(folder), tmp_path), str(folder), "no config.json")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_model_path_that_is_a_file(command, tmp_path, capsys):
    _config(tmp_path / "ckpt")
    file = str(tmp_path / "ckpt" / "config.json")
    _refused(capsys, _argv(command, file, tmp_path), file, "neither a preset" if command == "plan" else "is a file")


@pytest.mark.parametrize("content", ['{"model_type": "qwen3_moe",', "[1, 2]", "\xff\xfe"], ids=["cut-off", "not-an-object", "not-utf8"])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_corrupted_config_json(command, content, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_bytes(content.encode("latin-1"))
    _refused(capsys, _argv(command, str(folder), tmp_path), str(folder / "config.json"))


def _truncated_safetensors(file: Path) -> None:
    save_file({"w": torch.zeros(256, 256)}, str(file))
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])  # an interrupted download


@pytest.mark.parametrize("command", ["generate", "eval", "bench"])  # env and plan read the config only
def test_a_truncated_safetensors_file(command, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    _config(folder)
    _truncated_safetensors(folder / "model.safetensors")
    _refused(capsys, _argv(command, str(folder), tmp_path), str(folder / "model.safetensors"), "truncated", "download it again")


@pytest.mark.parametrize("header", [b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!", b"\x05"], ids=["bad-header", "tiny"])
def test_a_safetensors_file_that_is_not_one(header, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    _config(folder)
    (folder / "model.safetensors").write_bytes(header)
    _refused(capsys, _argv("bench", str(folder), tmp_path), str(folder / "model.safetensors"), "download it again")


def test_missing_weights_and_missing_shards(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    _config(folder)
    _refused(capsys, _argv("bench", str(folder), tmp_path), str(folder), "no weights", "model.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"a": torch.zeros(2)}, str(folder / "model-00001-of-00002.safetensors"))
    _refused(capsys, _argv("bench", str(folder), tmp_path), "model.safetensors.index.json", "model-00002-of-00002.safetensors")


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_checkpoint_without_tokenizer(command, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    _config(folder)
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    _refused(capsys, _argv(command, str(folder), tmp_path), str(folder), "no tokenizer files")


def test_a_good_checkpoint_passes_the_checks(fixture_path):
    from hf_moe_accel.cli.checkpoint import check_checkpoint

    check_checkpoint(str(fixture_path), tokenizer=True)  # the fixtures are whole: nothing raised


def test_env_on_a_good_checkpoint_reads_its_config(fixture_path, capsys):
    assert main(["env", "--model", str(fixture_path)]) == 0
    assert "MoE blocks patched" in capsys.readouterr().out


# ---- numbers: refused by argparse with the valid range -------------------------------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["bench", "--new-tokens", "0"], ">= 2"),
        (["bench", "--new-tokens", "1"], ">= 2"),
        (["bench", "--prompt-len", "0"], ">= 1"),
        (["bench", "--repeats", "0"], ">= 1"),
        (["bench", "--batch", "0"], "positive integers"),
        (["bench", "--batch", "1,-2"], "positive integers"),
        (["bench", "--top-k", "0"], ">= 1"),
        (["bench", "--threshold", "1"], "[0, 1)"),
        (["bench", "--threshold", "nan"], "[0, 1)"),
        (["bench", "--gpu-memory", "1GiB", "--miss-drop-threshold", "1"], "[0, 1)"),
        (["bench", "--prompt-len", "eight"], ">= 1"),
        (["plan", "--model", "qwen3-30b-a3b", "--hardware", "h100x8", "--gpus", "0"], ">= 1"),
        (["plan", "--model", "qwen3-30b-a3b", "--hardware", "h100", "--batch", "0"], "positive integers"),
        (["plan", "--model", "qwen3-30b-a3b", "--hardware", "h100", "--prompt-len", "0"], ">= 1"),
        (["plan", "--model", "qwen3-30b-a3b", "--hardware", "h100", "--new-tokens", "-1"], ">= 1"),
        (["plan", "--model", "qwen3-30b-a3b", "--hardware", "h100", "--repeats", "0"], ">= 1"),
        (["plan", "--model", "qwen3-30b-a3b", "--hardware", "h100", "--hit-rate", "1.5"], "[0, 1]"),
        (["plan", "--model", "qwen3-30b-a3b", "--hardware", "h100", "--gpu-memory", "0GiB"], "positive"),
        (["generate", "--model", "x", "--prompt", "hi", "--max-new-tokens", "0"], ">= 1"),
        (["eval", "--model", "x", "--text", "t", "--window", "0"], ">= 1"),
        (["eval", "--model", "x", "--text", "t", "--batch", "0"], ">= 1"),
        (["eval", "--model", "x", "--text", "t", "--prompts", "0"], ">= 1"),
        (["eval", "--model", "x", "--text", "t", "--speed-batch", "-1"], ">= 0"),
    ],
)
def test_numbers_out_of_range_are_refused_with_the_range(argv, expected, capsys):
    flag = next(a for a in reversed(argv) if a.startswith("--"))
    err = _refused(capsys, argv, flag, expected)
    assert "--help" in err


@pytest.mark.parametrize("flag", [["--host-dtype", "int4"], ["--miss-drop-threshold", "0.1"], ["--no-zero-copy"]])
def test_offload_flags_need_gpu_memory(flag, capsys):
    _refused(capsys, ["bench", "--device", "cpu", *flag], flag[0], "needs --gpu-memory")


def test_measured_plans_need_two_new_tokens(capsys):
    _refused(capsys, ["plan", "--model", "qwen3-30b-a3b", "--hardware", "h100", "--measure", "--new-tokens", "1"],
             "--new-tokens must be 2 or more")


def test_an_empty_prompt_is_refused(capsys):
    _refused(capsys, ["generate", "--model", "x", "--prompt", "hi", "--prompt", ""], "--prompt", "empty")


def test_the_smallest_valid_numbers_are_kept(fixture_path, monkeypatch, capsys):
    """No silent default in place of a value given: bench runs what it was asked (run_ab records it)."""
    seen = {}

    def record(model, name, workloads, repeats, **kwargs):
        seen.update(workloads=workloads, repeats=repeats)
        return []

    monkeypatch.setattr(ab, "run_ab", record)
    monkeypatch.setattr(cli_main_module, "load_model", lambda *a, **k: torch.nn.Linear(1, 1))
    assert main(["bench", "--model", str(fixture_path), "--device", "cpu", "--batch", "1", "--prompt-len", "1",
                 "--new-tokens", "2", "--repeats", "1"]) == 0
    assert seen == {"workloads": [ab.BenchWorkload(1, 1, 2)], "repeats": 1}


# ---- output paths: checked before the run --------------------------------------------------------


_EVAL = ["eval", "--model", "MODEL", "--text", "MODEL/heldout.txt"]
_PLAN = ["plan", "--model", "qwen3-30b-a3b", "--hardware", "h100"]


@pytest.mark.parametrize(
    "argv, flag",
    [(["bench", "--device", "cpu"], "--json"), (["bench", "--device", "cpu"], "--plot"), (_EVAL, "--json"),
     (_EVAL, "--plot"), (_PLAN, "--json")],
    ids=["bench-json", "bench-plot", "eval-json", "eval-plot", "plan-json"],
)
def test_output_paths_are_checked_before_the_run(argv, flag, tmp_path, capsys, fixture_path):
    argv = [a.replace("MODEL", str(fixture_path)) for a in argv]
    missing = tmp_path / "no-such-folder" / "out.file"
    _refused(capsys, [*argv, flag, str(missing)], flag, str(missing), "doesn't exist")
    _refused(capsys, [*argv, flag, str(tmp_path)], flag, str(tmp_path), "is a folder")


# ---- hardware descriptions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("hbm_tb_s", 0, "> 0"),
        ("hbm_tb_s", -3.0, "> 0"),
        ("pcie_gb_s", 0.0, "> 0"),
        ("link_gb_s", -50, "> 0"),
        ("gemm_tflops", math.inf, "> 0"),
        ("cpu_gb_s", math.nan, "> 0"),
        ("gpu_memory_gib", 0, "> 0"),
        ("gpu_count", 0, "integer >= 1"),
        ("gpu_count", 1.5, "integer >= 1"),
        ("link_latency_us", -1, ">= 0"),
        ("graph_step_host_us", True, ">= 0"),
        ("zero_copy_share", 0, "in (0, 1]"),
        ("zero_copy_share", 1.5, "in (0, 1]"),
        ("gpu_name", 3, "string"),
    ],
)
def test_hardware_json_refuses_values_out_of_range(field, value, expected, tmp_path):
    path = tmp_path / "hw.json"
    path.write_text(json.dumps({"base": "h100", field: value}))
    with pytest.raises(ValueError, match=rf"{path}: field {field} must be .*{expected.replace('(', '[(]')}"):
        hardware_from_json(path)


def test_hardware_json_keeps_edge_values(tmp_path):
    path = tmp_path / "hw.json"
    path.write_text(json.dumps({"base": "h100", "gpu_count": 2.0, "link_latency_us": 0, "zero_copy_share": 1}))
    hardware = hardware_from_json(path)
    assert (hardware.gpu_count, hardware.link_latency_us, hardware.zero_copy_share) == (2, 0, 1)
    assert isinstance(hardware.gpu_count, int)
    path.write_text(json.dumps({"base": 8}))
    with pytest.raises(ValueError, match="preset name"):
        hardware_from_json(path)


def test_plan_refuses_a_bad_hardware_file_in_one_line(tmp_path, capsys):
    path = tmp_path / "hw.json"
    path.write_text(json.dumps({**hardware_preset("h100").to_json(), "hbm_tb_s": 0}))
    _refused(capsys, ["plan", "--model", "qwen3-30b-a3b", "--hardware", str(path)], str(path), "hbm_tb_s", "> 0")


# ---- accelerate(): argument types -------------------------------------------------------------


def _tiny_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe", hidden_size=32, moe_intermediate_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
        vocab_size=64, decoder_sparse_step=1, mlp_only_layers=[],
    )
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    "model, expected",
    [(None, "expects a loaded torch.nn.Module.*got NoneType"), ({}, "expects a loaded torch.nn.Module.*got dict"),
     ("org/model", r"takes a loaded model, not a path.*AutoModelForCausalLM.from_pretrained\('org/model'\)"),
     (Path("/ckpt"), r"takes a loaded model, not a path.*from_pretrained\('/ckpt'\)")],
    ids=["None", "dict", "str", "Path"],
)
def test_accelerate_wants_a_loaded_module(model, expected):
    for function in (accelerate, unpatch, is_accelerated):
        with pytest.raises(TypeError, match=f"{function.__name__}\\(\\) {expected}"):
            function(model)


@pytest.mark.parametrize(
    "options, expected",
    [
        (dict(cuda_graphs="no"), "cuda_graphs must be True or False, got 'no'"),
        (dict(cuda_graphs=0), "cuda_graphs must be True or False, got 0"),
        (dict(cuda_graphs=None), "cuda_graphs must be True or False, got None"),
        (dict(compile_decode=1), "compile_decode must be True or False, got 1"),
        (dict(compile_decode="yes"), "compile_decode must be True or False"),
        (dict(parallel=2), "parallel must be one of 'auto'"),
        (dict(devices=0), r"devices must be a list.*devices=\[0\]"),
        (dict(devices=2.5), "devices must be a list"),
    ],
)
def test_accelerate_option_types(options, expected):
    model = _tiny_model()
    with pytest.raises(TypeError, match=f"accelerate\\(\\): {expected}"):
        accelerate(model, **options)
    assert not is_accelerated(model)  # nothing changed


# ---- a machine without CUDA --------------------------------------------------------------------


def test_accelerate_on_a_machine_without_cuda_says_the_reference_path_runs(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = _tiny_model()
    with caplog.at_level(logging.DEBUG, logger="hf_moe_accel"):
        accelerate(model)
    lines = [r for r in caplog.records if "patched" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    message = lines[0].getMessage()
    assert "reference path runs" in message and "CUDA graphs need CUDA" in message
    assert "decodes through" not in message  # no promise of graphs
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    unpatch(model)


def test_accelerate_of_a_cpu_model_on_a_cuda_machine_says_when_graphs_serve(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = _tiny_model()
    with caplog.at_level(logging.INFO, logger="hf_moe_accel"):
        accelerate(model, cuda_graphs=False)
    message = next(r.getMessage() for r in caplog.records if "patched" in r.getMessage())
    assert "not on CUDA" in message and "reference path" in message and "decodes through" not in message
    unpatch(model)


def test_env_says_graphs_need_cuda_without_it(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["env", "--preset", "tiny-qwen3-moe"]) == 0
    lines = {line.split("  ")[0]: line.split("  ")[-1].strip() for line in capsys.readouterr().out.splitlines()}
    assert lines["CUDA-graph decode"].startswith("needs CUDA, none here")
    assert "on a CUDA machine: served" in lines["CUDA-graph decode"]


def test_env_refuses_an_unknown_preset_in_one_line(capsys):
    _refused(capsys, ["env", "--preset", "no-such-preset"], "unknown preset 'no-such-preset'")


def _row(device: str, speedup: float = 0.8) -> dict:
    rate = {"decode_tokens_per_s": 100.0, "ttft_s": 0.01, "prefill_tokens_per_s": 1000.0, "peak_memory_gib": None}
    return {"model": "m", "device": device, "batch": 1, "accelerate_options": {},
            "stock": {**rate, "baselines": {"default": {"before": rate}}}, "ours": {**rate, "graphs": None},
            "speedup": speedup}


def test_the_cpu_bench_table_says_the_speedup_is_the_reference_path():
    table = ab.markdown_table([_row("cpu")])
    assert "| 0.80x (CPU reference path) |" in table
    assert table.splitlines()[-1] == ab.CPU_REFERENCE_NOTE and "no speed claim" in ab.CPU_REFERENCE_NOTE
    gpu = ab.markdown_table([_row("NVIDIA H100 80GB HBM3")])
    assert "| 0.80x |" in gpu and "reference path" not in gpu


def test_the_cpu_bench_prints_the_reference_path_note(fixture_path, monkeypatch, capsys):
    monkeypatch.setattr(ab, "run_ab", lambda *args, **kwargs: [_row("cpu")])
    monkeypatch.setattr(cli_main_module, "load_model", lambda *a, **k: torch.nn.Linear(1, 1))
    assert main(["bench", "--model", str(fixture_path), "--device", "cpu", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count(ab.CPU_REFERENCE_NOTE) == 2  # before the run, and under the table
    assert "0.80x (CPU reference path)" in out
