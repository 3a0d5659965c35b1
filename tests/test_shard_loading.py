"""Shard-only loading (`load_for_rank`) over 2 and 4 gloo processes, a two-node launch, and failures.

The pytest process writes the checkpoints the workers read (a fixture re-split into several files
with an index, a larger random one for memory, the random layouts of test_distributed.py) and
launches this file under torchrun in worker mode, as test_distributed.py does:

- "load", on 2 ranks (one node) and on 4 ranks (two torchrun nodes of 2 on 127.0.0.1): every rank
  loads each checkpoint for "ep" and "tp" (and the larger one for "dp"), counting every byte it
  reads through safetensors and its peak resident memory while loading and accelerating; it checks
  its tensors against the whole model cut by the same rule, and generates from the fixtures;
- "missing": a checkpoint whose index names a shard file that isn't there;
- "dead": two nodes, and the last rank exits after loading while the others generate.

Peak memory is the rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) over its resident set before the call, file-backed pages included. The bound
checked, for loading plus accelerate(): the rank's share (its tensors' bytes) + the largest stored
tensor + the documented mapped-file window (1/32 of the share, 4 to 256 MiB) + PEAK_SLACK (the
model's skeleton, file headers, code paged in by accelerate()). Large tensors get their own mappings
(MALLOC_MMAP_THRESHOLD_), so freed memory is returned and not reused unseen.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_distributed import (
    FIXTURES,
    PROMPTS,
    RANDOM_CONFIGS,
    REPO,
    _fixture_names,
    _torchrun,
    build_case,
    run_case,
    torchrun_env,
)

MIB = 2**20
PEAK_SLACK = 16 * MIB
TIMEOUT_S = 60  # the workers' process-group timeout: no run here can wait longer on a lost rank
DEAD_TIMEOUT_S = 20
# A random qwen3_moe checkpoint large enough that a rank's share stands well above the constants.
BIG = dict(model_type="qwen3_moe", hidden_size=256, moe_intermediate_size=256, intermediate_size=512, num_hidden_layers=4,
           num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=64, num_experts_per_tok=2,
           vocab_size=2048, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=True)
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}


# ---- the checkpoints (pytest process) ----------------------------------------------------------


def _split_checkpoint(source: Path, target: Path, parts: int) -> None:
    """`source`'s single-file checkpoint written as `parts` files and an index, keys dealt round
    robin so that every layer spans files."""
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True)
    tensors = load_file(source / "model.safetensors")
    weight_map = {}
    for index in range(parts):
        name = f"model-{index + 1:05d}-of-{parts:05d}.safetensors"
        chunk = sorted(tensors)[index::parts]
        save_file({key: tensors[key] for key in chunk}, target / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    for extra in source.iterdir():
        if extra.suffix == ".json" or extra.name.startswith("tokenizer"):
            shutil.copy(extra, target / extra.name)


def _write_big(target: Path) -> None:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(BIG)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    model.tie_weights()
    model.save_pretrained(target, max_shard_size="40MB")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    if "tiny-qwen3-moe" in _fixture_names():
        paths["tiny-qwen3-moe"] = root / "tiny-qwen3-moe-split"
        _split_checkpoint(FIXTURES / "tiny-qwen3-moe", paths["tiny-qwen3-moe"], parts=3)
        missing = paths["missing"] = root / "missing-shard"
        missing.mkdir()
        for item in paths["tiny-qwen3-moe"].iterdir():
            if item.name != "model-00002-of-00003.safetensors":
                (missing / item.name).symlink_to(item)
    if "tiny-mixtral" in _fixture_names():
        paths["tiny-mixtral"] = FIXTURES / "tiny-mixtral"  # one file, as the fixture stores it
    for name in RANDOM_CONFIGS:
        model, _ = build_case(name)
        model.save_pretrained(root / name)
        paths[name] = root / name
    _write_big(root / "big")
    paths["big"] = root / "big"
    return {name: str(path) for name, path in paths.items()}


# ---- launching ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _two_nodes(args: list[str], timeout: float, extra: tuple[str, ...] = ()) -> tuple[list[subprocess.CompletedProcess], float]:
    """Two torchrun agents of 2 processes each, rendezvous on 127.0.0.1 (the multi-node launch on one
    host); returns their results and the seconds until both ended. An agent still running at
    `timeout` is stopped (SIGTERM, which it passes to its workers) and the test fails."""
    port = _free_port()
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=2",
             "--master-addr=127.0.0.1", f"--master-port={port}", *extra, *args],
            cwd=REPO, env=torchrun_env(**WORKER_ENV), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for node in range(2)
    ]
    started = time.monotonic()
    results = []
    try:
        for agent in agents:
            out, err = agent.communicate(timeout=max(1.0, timeout - (time.monotonic() - started)))
            results.append(subprocess.CompletedProcess(agent.args, agent.returncode, out, err))
    except subprocess.TimeoutExpired:
        for agent in agents:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
        for agent in agents:
            agent.communicate(timeout=30)
        pytest.fail(f"the two-node run didn't end within {timeout:.0f} s: a rank hung")
    return results, time.monotonic() - started


# ---- the worker (under torchrun) ----------------------------------------------------------------


def _status() -> dict[str, int]:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(value.split()[0]) * 1024
    return values


class _ReadCounter:
    """Wraps safetensors' safe_open as the loader sees it: counts the bytes of every tensor a read
    returns and the keys read."""

    def __init__(self, loading_module):
        self.bytes = 0
        self.keys: set[str] = set()
        counter, original = self, loading_module.safe_open

        class Slice:
            def __init__(self, inner, key):
                self.inner, self.key = inner, key

            def __getitem__(self, index):
                tensor = self.inner[index]
                counter.bytes += tensor.numel() * tensor.element_size()
                counter.keys.add(self.key)
                return tensor

            def get_shape(self):
                return self.inner.get_shape()

        class Handle:
            def __init__(self, *args, **kwargs):
                self.inner = original(*args, **kwargs)

            def __enter__(self):
                self.inner.__enter__()
                return self

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)

            def keys(self):
                return self.inner.keys()

            def get_slice(self, key):
                return Slice(self.inner.get_slice(key), key)

            def get_tensor(self, key):
                tensor = self.inner.get_tensor(key)
                counter.bytes += tensor.numel() * tensor.element_size()
                counter.keys.add(key)
                return tensor

        loading_module.safe_open = Handle

    def reset(self) -> None:
        self.bytes, self.keys = 0, set()


def _stored_itemsize(path: str) -> int:
    """Bytes an element of the checkpoint's tensors (one dtype throughout in these checkpoints)."""
    from safetensors import safe_open

    with safe_open(sorted(Path(path).glob("*.safetensors"))[0], framework="pt") as handle:
        dtype = handle.get_slice(next(iter(handle.keys()))).get_dtype()
    return {"BF16": 2, "F16": 2, "F32": 4}[dtype]


def _stored_bytes(model, layout, itemsize: int) -> int:
    """Bytes this rank must read: each distinct tensor it holds in the stored dtype, less the parts
    it fills with zeros."""
    total = 0
    for name, param in model.named_parameters():
        part = layout.slices.get(name) if layout is not None else None
        if part is None or not part.zeros:
            total += param.numel() * itemsize
    return total


def _expert_indices(keys: set[str]) -> dict[int, set[int]]:
    """Layer -> expert indices among the per-expert checkpoint keys read."""
    found: dict[int, set[int]] = {}
    for key in keys:
        match = re.search(r"layers\.(\d+)\..*experts\.(\d+)\.", key)
        if match:
            found.setdefault(int(match[1]), set()).add(int(match[2]))
    return found


def _load_worker(out_dir: Path, paths: dict[str, str]) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_moe_accel.parallel.loading as loading
    from hf_moe_accel import accelerate, unpatch
    from hf_moe_accel.parallel.shards import loaded_shard, shard_layout

    rank, world = loading.join_process_group(timeout=TIMEOUT_S)
    counter = _ReadCounter(loading)
    records: dict[str, dict] = {}

    loading._meta_model(Path(paths["big"]), torch.bfloat16)  # the modeling code imported before measuring
    for mode in ("ep", "tp", "dp"):
        gc.collect()
        counter.reset()
        Path("/proc/self/clear_refs").write_text("5")  # the peak resident set starts again from here
        before = _status()["VmRSS"]
        model = loading.load_for_rank(paths["big"], mode, dtype=torch.bfloat16, device="cpu")
        accelerate(model, parallel=mode, devices="cpu", cuda_graphs=False)
        peak = _status()["VmHWM"] - before
        report = loading.load_report(model)
        records[f"big/{mode}"] = {
            "peak": peak, "share": sum(p.numel() * p.element_size() for p in model.parameters()),
            "read": counter.bytes, "reported": report.bytes_read, "window": report.mapped_window,
            "expected": _stored_bytes(model, loaded_shard(model), 2), "experts": _expert_indices(counter.keys),
        }
        del model

    for name in [n for n in ("tiny-qwen3-moe", "tiny-mixtral", *RANDOM_CONFIGS) if n in paths]:
        full = AutoModelForCausalLM.from_pretrained(paths[name], dtype=torch.float32).eval()
        for mode in ("ep", "tp"):
            counter.reset()
            try:
                model = loading.load_for_rank(paths[name], mode, dtype=torch.float32, device="cpu")
            except loading.ShardLoadError as error:
                records[f"{name}/{mode}"] = {"refused": str(error)}
                continue
            layout = shard_layout(full, mode, rank, world)
            mine, whole = dict(model.named_parameters()), dict(full.named_parameters())
            differ = [n for n, p in whole.items() if not torch.equal(mine[n], layout.slices[n].take(p) if n in layout.slices else p)]
            record = {"differ": differ, "names_equal": mine.keys() == whole.keys(), "read": counter.bytes,
                      "expected": _stored_bytes(model, loaded_shard(model), _stored_itemsize(paths[name])),
                      "experts": _expert_indices(counter.keys),
                      "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight}
            if name in ("tiny-qwen3-moe", "tiny-mixtral"):
                other = "tp" if mode == "ep" else "ep"
                try:
                    accelerate(model, parallel=other, devices="cpu", cuda_graphs=False)
                    record["other_plan"] = "accepted"
                    unpatch(model)
                except ValueError as error:
                    record["other_plan"] = str(error)
                accelerate(model, parallel=mode, devices="cpu", cuda_graphs=False)
                tokenizer = AutoTokenizer.from_pretrained(paths[name])
                tokenizer.padding_side = "left"
                inputs = dict(tokenizer(PROMPTS, return_tensors="pt", padding=True))
                record.update(run_case(model, inputs))
                unpatch(model)  # hooks off; the share stays, marked, and accelerates again
                accelerate(model, parallel=mode, devices="cpu", cuda_graphs=False)
                record["again"] = torch.equal(run_case(model, inputs)["tokens"], record["tokens"])
            records[f"{name}/{mode}"] = record
            del model
        del full
    torch.save({"rank": rank, "world": world, "records": records}, out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _missing_worker(out_dir: Path, paths: dict[str, str]) -> None:
    import torch.distributed as dist

    import hf_moe_accel.parallel.loading as loading

    rank, _ = loading.join_process_group(timeout=TIMEOUT_S)
    try:
        loading.load_for_rank(paths["missing"], "ep", dtype=torch.float32, device="cpu")
        outcome = "loaded"
    except loading.ShardLoadError as error:
        outcome = str(error)
    (out_dir / f"rank{rank}.txt").write_text(outcome)
    dist.destroy_process_group()


def _dead_worker(out_dir: Path, paths: dict[str, str]) -> None:
    import hf_moe_accel.parallel.loading as loading
    from hf_moe_accel import accelerate
    from hf_moe_accel.parallel.distributed import CollectiveError

    rank, world = loading.join_process_group(timeout=DEAD_TIMEOUT_S)
    model = loading.load_for_rank(paths["tiny-qwen3-moe"], "ep", dtype=torch.float32, device="cpu")
    accelerate(model, parallel="ep", devices="cpu", cuda_graphs=False)
    if rank == world - 1:
        os._exit(3)  # dies without a word to the others
    started = time.monotonic()
    ids = torch.tensor([[1, 2, 3, 4]])
    try:
        run_case(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        outcome = "finished"
    except CollectiveError as error:
        outcome = str(error)
    (out_dir / f"rank{rank}.txt").write_text(f"{time.monotonic() - started:.1f}\n{outcome}")
    os._exit(1)  # the process group lost a member: leave without the collective a clean exit would run


# ---- the tests ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["1x2", "2x2"], ids=["2-ranks", "4-ranks-two-nodes"])
def loaded(request, checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"load{request.param}")
    args = [__file__, "load", str(out), json.dumps(checkpoints)]
    if request.param == "1x2":
        _torchrun(2, args, timeout=240, env=torchrun_env(**WORKER_ENV))
    else:
        results, _ = _two_nodes(args, timeout=240)
        for node, result in enumerate(results):
            assert result.returncode == 0, f"node {node} failed:\n{result.stderr[-4000:]}"
    ranks = [torch.load(path, weights_only=False) for path in sorted(out.glob("rank*.pt"))]
    assert [r["rank"] for r in ranks] == list(range(len(ranks))) and len(ranks) == ranks[0]["world"]
    return ranks


@pytest.fixture(scope="module")
def stock():
    return {name: run_case(*build_case(name)) for name in _fixture_names()}


def _split(total: int, world: int, rank: int) -> set[int]:
    from hf_moe_accel.parallel.shards import split_range

    return set(range(*split_range(total, world, rank)))


def _bound(record: dict) -> int:
    largest_stored = BIG["vocab_size"] * BIG["hidden_size"] * 2  # the embedding, bf16
    window = min(max(record["share"] // 32, 4 * MIB), 256 * MIB)  # the documented mapped-file window
    return record["share"] + largest_stored + window + PEAK_SLACK


def test_each_rank_reads_only_its_share_and_peaks_within_the_bound(loaded):
    world = len(loaded)
    whole = loaded[0]["records"]["big/dp"]["share"]
    for rank, result in enumerate(loaded):
        for mode in ("ep", "tp", "dp"):
            record = result["records"][f"big/{mode}"]
            print(f"world {world} rank {rank} {mode}: read {record['read'] / MIB:.2f} MiB, holds {record['share'] / MIB:.2f} MiB, "
                  f"peak +{record['peak'] / MIB:.2f} MiB (bound {_bound(record) / MIB:.2f} MiB)")
            assert record["window"] == min(max(record["share"] // 32, 4 * MIB), 256 * MIB)
            # What the wrapper around safe_open saw is the loader's own count, and exactly this rank's tensors.
            assert record["read"] == record["reported"] == record["expected"], (rank, mode, record)
            assert record["peak"] <= _bound(record), f"rank {rank} {mode}: peak {record['peak'] / MIB:.1f} MiB > {_bound(record) / MIB:.1f} MiB"
            if mode != "dp":
                assert record["share"] < whole * (1 / world + 0.1)
        ep = result["records"]["big/ep"]
        assert ep["experts"] == {layer: _split(BIG["num_experts"], world, rank) for layer in range(BIG["num_hidden_layers"])}
        # Tight enough to fail a rank that held one more copy of the model's experts.
        assert ep["share"] + whole * 0.9 > _bound(ep)


def test_loaded_shards_equal_the_whole_model_cut_by_the_same_rule(loaded):
    world = len(loaded)
    names = [n for n in ("tiny-qwen3-moe", "tiny-mixtral", *RANDOM_CONFIGS) if f"{n}/ep" in loaded[0]["records"]]
    assert len(names) >= len(RANDOM_CONFIGS)
    for rank, result in enumerate(loaded):
        for name in names:
            for mode in ("ep", "tp"):
                record = result["records"][f"{name}/{mode}"]
                if name == "qwen3_six_heads" and world == 4:
                    continue  # refused: test_a_plan_that_cannot_split_is_refused_on_every_rank
                assert "refused" not in record, record.get("refused")
                assert record["names_equal"] and record["differ"] == [], (rank, name, mode, record["differ"][:5])
                assert record["read"] == record["expected"], (rank, name, mode)


def test_tied_embeddings_are_read_once_and_stay_tied(loaded):
    for result in loaded:
        for name in ("tiny-qwen3-moe", "tiny-mixtral"):
            if f"{name}/ep" in result["records"]:
                assert result["records"][f"{name}/ep"]["tied"] and result["records"][f"{name}/tp"]["tied"]


@pytest.mark.parametrize("mode", ["ep", "tp"])
def test_generation_from_loaded_shards_matches_one_stock_process(loaded, stock, mode):
    if not stock:
        pytest.skip(f"needs the trained fixtures at {FIXTURES}")
    for name, reference in stock.items():
        for result in loaded:
            record = result["records"][f"{name}/{mode}"]
            torch.testing.assert_close(record["logits"], reference["logits"], rtol=1e-4, atol=1e-4)
            assert torch.equal(record["tokens"], reference["tokens"]), (name, mode, result["rank"])
            assert record["again"], "after unpatch, accelerate() again gave other tokens"


def test_a_loaded_shard_refuses_another_plan(loaded):
    if not _fixture_names():
        pytest.skip(f"needs the trained fixtures at {FIXTURES}")
    for result in loaded:
        for name in _fixture_names():
            for mode, other in (("ep", "tp"), ("tp", "ep")):
                refusal = result["records"][f"{name}/{mode}"]["other_plan"]
                assert f"share for parallel={mode!r}" in refusal and f"asking for parallel={other!r}" in refusal, refusal


def test_a_plan_that_cannot_split_is_refused_on_every_rank(loaded):
    if len(loaded) != 4:
        pytest.skip("the refusals are for 4 ranks")
    for result in loaded:
        assert "6 attention heads" in result["records"]["qwen3_six_heads/tp"]["refused"]
        assert "at least 4 experts" in result["records"]["qwen3_six_heads/ep"]["refused"]


def test_one_process_loads_the_whole_model_as_from_pretrained_does(checkpoints):
    from transformers import AutoModelForCausalLM

    from hf_moe_accel.parallel.loading import load_for_rank, load_report

    if "tiny-qwen3-moe" not in checkpoints:
        pytest.skip(f"needs the trained fixtures at {FIXTURES}")
    path = checkpoints["tiny-qwen3-moe"]  # three files and an index
    model = load_for_rank(path, "ep", dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert model.lm_head.weight is model.model.embed_tokens.weight and not model.training
    assert load_report(model).bytes_read == sum(p.numel() for p in model.parameters()) * 2
    with pytest.raises(ValueError, match="torchrun"):  # a whole model in one process: no ep without ranks
        from hf_moe_accel import accelerate

        accelerate(model, parallel="ep")


@pytest.mark.gpu
def test_one_process_loads_straight_to_the_gpu(checkpoints):
    """bf16 tensors copied from the files into GPU tensors: the same weights as from_pretrained's,
    nothing left on the host, and the fused kernels give the same tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_moe_accel import accelerate
    from hf_moe_accel.parallel.loading import load_for_rank

    if "tiny-qwen3-moe" not in checkpoints:
        pytest.skip(f"needs the trained fixtures at {FIXTURES}")
    path, device = checkpoints["tiny-qwen3-moe"], torch.device("cuda", 0)
    model = load_for_rank(path, "ep", dtype=torch.bfloat16, device=device)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=str(device)).eval()
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert {t.device for t in [*model.parameters(), *model.buffers()]} == {device}
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True).to(device)
    tokens = [accelerate(m).generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0) for m in (model, reference)]
    assert torch.equal(*tokens)


def test_a_missing_shard_file_is_named_on_every_rank(checkpoints, tmp_path):
    from hf_moe_accel.parallel.loading import ShardLoadError, load_for_rank

    if "missing" not in checkpoints:
        pytest.skip(f"needs the trained fixtures at {FIXTURES}")
    with pytest.raises(ShardLoadError, match="model-00002-of-00003.safetensors is missing"):
        load_for_rank(checkpoints["missing"], "ep")  # one process
    started = time.monotonic()
    _torchrun(2, [__file__, "missing", str(tmp_path), json.dumps(checkpoints)], timeout=120)
    outcomes = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]
    for outcome in outcomes:
        assert "model-00002-of-00003.safetensors is missing" in outcome and "every rank (0-1)" in outcome, outcome
    assert time.monotonic() - started < TIMEOUT_S  # an agreed error, not a timeout


def test_a_rank_that_dies_makes_the_others_raise_instead_of_hanging(checkpoints, tmp_path):
    if "tiny-qwen3-moe" not in checkpoints:
        pytest.skip(f"needs the trained fixtures at {FIXTURES}")
    results, seconds = _two_nodes([__file__, "dead", str(tmp_path), json.dumps(checkpoints)], timeout=120,
                                  extra=("--monitor-interval=1",))
    assert all(result.returncode != 0 for result in results)
    assert "exitcode  : 3" in results[1].stderr  # node 1's agent names the rank that died
    for rank in (0, 1):  # the other node's ranks, whose agent saw nothing: our error, well before a timeout
        elapsed, _, outcome = (tmp_path / f"rank{rank}.txt").read_text().partition("\n")
        print(f"rank {rank} raised after {elapsed} s: {outcome}")
        assert f"rank {rank} of 4: all_reduce with the other ranks failed" in outcome, outcome
        assert float(elapsed) < DEAD_TIMEOUT_S + 10
    assert seconds < 120


if __name__ == "__main__":
    task, out, paths = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    {"load": _load_worker, "missing": _missing_worker, "dead": _dead_worker}[task](out, paths)
