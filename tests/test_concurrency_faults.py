"""Threads, faults and long runs (issue 35).

- Threads: generate() calls on one accelerated model from several threads take turns (a lock per
  model), and each call's tokens are what it gives alone.
- Faults: a call interrupted mid-decode (an error or a KeyboardInterrupt from a stopping criterion or
  a streamer), a capture or a prefill that runs out of GPU memory, a capture interrupted, a compile that
  fails: the next call is right, the lock is free, and the pool holds no cache it shouldn't (every
  graph held is over a pooled cache; an out-of-memory error empties the pool).
- Pickling an offloaded model fails with an error that says to unpatch first; so does deepcopy.
- scripts/soak_generate.py runs (a few calls, CPU).

On CPU the graph backend is test_graphs.py's stand-in (a CUDA graph's semantics, replays re-run the
forward); `-m gpu` runs the same checks with real CUDA graphs on the bf16 fixtures. Where the judge is
the eager twin (test_graphs.Pair), prefill graphs (HF_MOE_ACCEL_PREFILL_GRAPHS) are off or the check is
on CPU: in bf16 a prefill run padded to its bucket may part from an eager one at a near tie.

    python -m pytest -q tests/test_concurrency_faults.py            # CPU
    python -m pytest -q -m gpu tests/test_concurrency_faults.py     # GPU
"""

from __future__ import annotations

import copy
import importlib.util
import io
import itertools
import json
import pickle
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from hf_moe_accel import OffloadOptions, accelerate, unpatch
from hf_moe_accel.graphs import graph_stats, stop_check
from hf_moe_accel.graphs.cache_pool import StaticCachePool
from hf_moe_accel.graphs.generate import GraphBackend, decode_state, enable_graph_decode
from hf_moe_accel.graphs.runner import is_out_of_memory
from hf_moe_accel.offload.engine import decode_hooks, offload_engine
from hf_moe_accel.offload.miss_cost import MissCostModel

from .conftest import FIXTURES
from .helpers import load_fixture
from .test_graphs import SETUPS, Pair, stand_in_capture

SOAK_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "soak_generate.py"
QWEN = "tiny-qwen3-moe"
PAD = 0  # the fixtures' pad (and EOS) id


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tiny models' ops are too small to split over cores, and these tests run Python threads of their
    own: torch's intra-op threads would only contend with them (and with each other on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fixture(name: str = QWEN) -> Path:
    path = FIXTURES / name
    if not path.is_dir():
        pytest.skip(f"trained fixture {name} not found at {path} (expects ../shared/fixtures beside the checkout)")
    return path


@pytest.fixture(params=SETUPS)
def pair(request) -> Pair:
    """tiny-qwen3-moe twice: decoding through graphs (the CPU stand-in, or CUDA graphs with -m gpu) and eagerly."""
    device, dtype = request.param
    return Pair(fixture(), device, dtype)


# ---- calls ------------------------------------------------------------------------------------------


def random_call(seed: int, batch: int, length: int, new_tokens: int, vocab: int = 4096) -> tuple[dict, dict]:
    """(inputs, generate kwargs) of a greedy call: random prompt ids, rows after the first left-padded."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        padding = int(torch.randint(0, length, (1,), generator=generator))
        ids[row, :padding], mask[row, :padding] = PAD, 0
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD)
    return {"input_ids": ids, "attention_mask": mask}, kwargs


def on(device: str, inputs: dict) -> dict:
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def generate(model, call: tuple[dict, dict], device: str, **extra) -> torch.Tensor:
    inputs, kwargs = call
    return model.generate(**on(device, inputs), **kwargs, **extra).cpu()


def eager(pair: Pair, call: tuple[dict, dict]) -> torch.Tensor:
    """The call on the eager twin, over a static cache as the graphs decode."""
    return generate(pair.eager, call, pair.device, cache_implementation="static", disable_compile=True)


# ---- checks -----------------------------------------------------------------------------------------


def lock_is_free(lock) -> bool:
    """Whether another thread could take `lock` now (a re-entrant lock always lets its holder in)."""
    free = []

    def probe() -> None:
        took = lock.acquire(blocking=False)
        free.append(took)
        if took:
            lock.release()

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return free[0]


def assert_ready(model) -> dict:
    """After any call, ended well or not: the lock free, no call marked as served, no deferred stop check
    left on in this thread, no more caches than the pool keeps, and no graph over a cache it doesn't hold."""
    state = decode_state(model)
    stats = graph_stats(model)
    assert lock_is_free(state.lock)
    assert not state.serving
    assert getattr(stop_check._local, "on_deferred", None) is None
    assert stats["pooled_caches"] <= stats["max_pooled_caches"]
    assert state.runner.caches_with_graphs() <= {id(cache) for cache in state.pool._caches.values()}
    assert stats["caches_with_graphs"] <= stats["pooled_caches"]
    return stats


# ---- threads ----------------------------------------------------------------------------------------


class TurnLog(StoppingCriteria):
    """Notes which call ran each decode step, and sleeps a little there (letting the GIL go), so another
    thread's steps would land in between unless the calls take turns. Never stops a call."""

    def __init__(self, log: list[int], call: int):
        self.log, self.call = log, call

    def __call__(self, input_ids, scores, **kwargs):
        self.log.append(self.call)
        time.sleep(0.002)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def took_turns(log: list[int]) -> bool:
    """Whether each call's steps are one unbroken run in `log`."""
    runs = [call for call, _ in itertools.groupby(log)]
    return len(runs) == len(set(runs))


def run_in_threads(model, calls: list[tuple[dict, dict]], threads: int, device: str,
                   log: list[int] | None = None) -> dict[int, torch.Tensor]:
    """Call i of `calls` runs in thread i % threads, all threads started together; tokens by call."""
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def work(mine: list[int]) -> None:
        try:
            barrier.wait()
            for i in mine:
                extra = {} if log is None else {"stopping_criteria": StoppingCriteriaList([TurnLog(log, i)])}
                results[i] = generate(model, calls[i], device, **extra)
        except BaseException as error:  # reported by the test's thread
            errors.append(error)

    workers = [threading.Thread(target=work, args=(list(range(t, len(calls), threads)),)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=600)
    assert not any(worker.is_alive() for worker in workers), "a generate() call never returned"
    if errors:
        raise errors[0]
    return results


def in_threads(jobs: dict[str, Callable[[], object]]) -> dict[str, object]:
    """Each job in a thread of its own, all at once; their results by name (a job's error is raised here)."""
    results: dict[str, object] = {}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            results[name] = jobs[name]()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(name,)) for name in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    if errors:
        raise errors[0]
    return results


def mixed_calls(count: int, max_batch: int, lengths: tuple[int, int], new_tokens: tuple[int, int], seed: int = 0):
    """`count` greedy calls of mixed batch, prompt length and new tokens."""
    rng = torch.Generator().manual_seed(seed)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=rng))

    return [random_call(seed * 1000 + i, draw(1, max_batch), draw(*lengths), draw(*new_tokens)) for i in range(count)]


def test_threads_take_turns_and_each_call_gets_its_own_tokens():
    """4 threads x 4 greedy calls of mixed shapes (one prompt past the first cache bucket) on one model:
    each call's decode steps run in one unbroken turn, and its tokens are the ones it gives alone."""
    pair = Pair(fixture(), "cpu", torch.float32)
    calls = mixed_calls(15, max_batch=3, lengths=(3, 24), new_tokens=(2, 6)) + [random_call(99, 2, 270, 3)]
    alone = {i: generate(pair.graphs, call, "cpu") for i, call in enumerate(calls)}
    log: list[int] = []
    together = run_in_threads(pair.graphs, calls, threads=4, device="cpu", log=log)
    assert took_turns(log) and set(log) == set(range(len(calls)))
    assert all(torch.equal(together[i], alone[i]) for i in alone)
    stats = assert_ready(pair.graphs)
    assert stats["replays"] > 0 and not stats["failed_captures"]


def test_the_turn_log_sees_calls_overlap_where_nothing_makes_them_take_turns():
    """The check above can fail: stock generate() (a model without graph decode, so without the lock)
    runs two threads' steps interleaved."""
    model = AutoModelForCausalLM.from_pretrained(fixture(), dtype=torch.float32).eval()
    accelerate(model, cuda_graphs=False)
    log: list[int] = []
    run_in_threads(model, [random_call(i, 1, 5, 10) for i in range(2)], threads=2, device="cpu", log=log)
    assert not took_turns(log)


class GenerateInside(StoppingCriteria):
    """At its second step, runs `call` on `model` from inside the call it watches (as a streamer might)."""

    def __init__(self, model, call: tuple[dict, dict], device: str):
        self.model, self.call, self.device, self.steps, self.tokens = model, call, device, 0, None

    def __call__(self, input_ids, scores, **kwargs):
        self.steps += 1
        if self.steps == 2:
            self.tokens = generate(self.model, self.call, self.device, cache_implementation="static", disable_compile=True)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def test_a_call_made_inside_a_served_call_leaves_its_cache_and_graphs_alone(pair):
    """A stopping criterion calls generate() on the same model, same shape (the pool would hand it the outer
    call's cache): the lock lets it in, it runs stock generate() on a cache of its own, and both calls'
    tokens are what each gives alone."""
    call, other = random_call(6, 2, 10, 6), random_call(7, 2, 10, 6)  # one shape, other prompts
    alone = generate(pair.graphs, call, pair.device)
    before = assert_ready(pair.graphs)
    inside = GenerateInside(pair.graphs, other, pair.device)
    outer = generate(pair.graphs, call, pair.device, stopping_criteria=StoppingCriteriaList([inside]))
    assert torch.equal(outer, alone) and torch.equal(inside.tokens, eager(pair, other))
    stats = assert_ready(pair.graphs)
    assert stats["captures"] == before["captures"] and stats["pooled_caches"] == before["pooled_caches"]


@pytest.mark.gpu
@pytest.mark.parametrize("fixture_name", ["tiny-qwen3-moe", "tiny-mixtral"])
def test_gpu_threads_get_their_single_threaded_tokens(fixture_name):
    """4 threads x 25 greedy calls of mixed batch (1-4), prompt (4-300, across two cache buckets) and new
    tokens (1-16) on one model under CUDA graphs: each call's tokens equal the single-threaded run's. The
    threads move their inputs to the GPU and read their results while others capture and replay."""
    model, _ = load_fixture(fixture(fixture_name), dtype=torch.bfloat16, device="cuda")
    accelerate(model)
    calls = mixed_calls(100, max_batch=4, lengths=(4, 300), new_tokens=(1, 16), seed=1)
    alone = {i: generate(model, call, "cuda") for i, call in enumerate(calls)}
    together = run_in_threads(model, calls, threads=4, device="cuda")
    mismatched = [i for i in alone if not torch.equal(together[i], alone[i])]
    assert not mismatched, f"calls {mismatched} differ from their single-threaded tokens"
    stats = assert_ready(model)
    assert stats["replays"] > 0 and not stats["failed_captures"], stats


@pytest.mark.gpu
def test_gpu_two_models_capture_side_by_side_in_threads():
    """Two accelerated copies, two threads each: captures of one model while the other replays or captures
    (captures take turns across the process) leave each call's tokens as single-threaded."""
    model, _ = load_fixture(fixture(), dtype=torch.bfloat16, device="cuda")
    accelerate(model)
    twin = copy.deepcopy(model)
    assert decode_state(twin).lock is not decode_state(model).lock
    calls = mixed_calls(24, max_batch=4, lengths=(4, 300), new_tokens=(1, 12), seed=2)
    alone = {i: generate(model, call, "cuda") for i, call in enumerate(calls)}
    decode_state(model).runner.clear()  # both capture again, this time side by side
    decode_state(model).pool.clear()
    results = in_threads({"model": lambda: run_in_threads(model, calls, 2, "cuda"),
                          "twin": lambda: run_in_threads(twin, calls, 2, "cuda")})
    for name in ("model", "twin"):
        assert all(torch.equal(results[name][i], alone[i]) for i in alone), name
    for m in (model, twin):
        stats = assert_ready(m)
        assert stats["replays"] > 0 and not stats["failed_captures"], stats


# ---- faults -----------------------------------------------------------------------------------------


class RaiseAtStep(StoppingCriteria):
    def __init__(self, step: int, error: BaseException):
        self.step, self.error, self.calls = step, error, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls == self.step:
            raise self.error
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class InterruptingStreamer(BaseStreamer):
    """A streamer whose reader went away: the interrupt comes at its `at`-th token batch."""

    def __init__(self, at: int):
        self.at, self.puts = at, 0

    def put(self, value):
        self.puts += 1
        if self.puts == self.at:
            raise KeyboardInterrupt

    def end(self):
        pass


INTERRUPTIONS = {
    "error-from-stopping-criterion": lambda: {"stopping_criteria": StoppingCriteriaList([RaiseAtStep(3, RuntimeError("criterion failed"))])},
    "interrupt-from-stopping-criterion": lambda: {"stopping_criteria": StoppingCriteriaList([RaiseAtStep(3, KeyboardInterrupt())])},
    "interrupt-from-streamer": lambda: {"streamer": InterruptingStreamer(at=4)},
}


@pytest.mark.parametrize("interruption", sorted(INTERRUPTIONS))
def test_a_call_interrupted_mid_decode_leaves_the_model_ready(pair, interruption):
    """The interrupted call's cache stays pooled (reset when next handed out) with its graphs: the next
    call of that shape replays them, and its tokens are those of the call before the interruption."""
    call = random_call(1, 2, 12, 8)
    expected = generate(pair.graphs, call, pair.device)
    if pair.device == "cpu":  # float32: every path agrees (bf16 prefill graphs may part from eager at a near tie)
        assert torch.equal(expected, eager(pair, call))
    before = assert_ready(pair.graphs)
    with pytest.raises((RuntimeError, KeyboardInterrupt)):
        generate(pair.graphs, call, pair.device, **INTERRUPTIONS[interruption]())
    after = assert_ready(pair.graphs)
    assert after["pooled_caches"] == before["pooled_caches"]
    assert torch.equal(generate(pair.graphs, call, pair.device), expected)
    stats = assert_ready(pair.graphs)
    assert stats["captures"] == before["captures"] and stats["replays"] > after["replays"]


def fail_next_step_capture(runner, error: BaseException) -> None:
    """The runner's next decode-step capture fails with `error`, raised inside the capture after the step's
    forward (as a capture running out of memory would); later captures are the backend's own."""
    capture_with, capture = runner._capture_with, runner.capture

    def forward_then_fail(forward, pool):
        def failing_forward():
            forward()
            raise error

        return capture(failing_forward, pool)

    def capture_with_failing_capture(*args, **kwargs):
        runner._capture_with, runner.capture = capture_with, forward_then_fail  # this one capture only
        try:
            return capture_with(*args, **kwargs)
        finally:
            runner.capture = capture

    runner._capture_with = capture_with_failing_capture


def no_graph_but_the_step(pair: Pair, monkeypatch) -> None:
    """Prefill graphs off, and on CPU a stand-in graph pool handle: the decode step's capture is the call's
    only one, so once it fails no graph uses the pool and the runner must let the handle go."""
    monkeypatch.setenv("HF_MOE_ACCEL_PREFILL_GRAPHS", "0")
    if pair.device == "cpu":
        decode_state(pair.graphs).runner._memory_pool = object()


def test_a_capture_out_of_memory_runs_that_call_eagerly_and_captures_in_the_next(pair, monkeypatch):
    """Out of GPU memory while capturing: the step runs eagerly for the rest of the call (its tokens right),
    the graph memory pool no graph uses is let go, and the next call captures the step (memory may be back)."""
    no_graph_but_the_step(pair, monkeypatch)
    runner = decode_state(pair.graphs).runner
    fail_next_step_capture(runner, torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)"))
    call = random_call(2, 2, 10, 6)
    expected = eager(pair, call)
    assert torch.equal(generate(pair.graphs, call, pair.device), expected)
    stats = assert_ready(pair.graphs)
    assert stats["captures"] == 0 and stats["replays"] == 0 and stats["eager_steps"] >= 5
    assert any("out of memory" in reason for reason in stats["failed_captures"])
    assert runner._memory_pool is None and not runner._failed  # not given up on
    assert torch.equal(generate(pair.graphs, call, pair.device), expected)
    stats = assert_ready(pair.graphs)
    assert stats["captures"] == 1 and stats["replays"] >= 5


def test_a_capture_interrupted_is_undone_and_the_next_call_captures(pair, monkeypatch):
    """KeyboardInterrupt inside a capture: it reaches the caller, the cache's write positions are rolled back,
    the pool handle let go, nothing is marked as failed; the next call captures and is right."""
    no_graph_but_the_step(pair, monkeypatch)
    runner = decode_state(pair.graphs).runner
    fail_next_step_capture(runner, KeyboardInterrupt())
    call = random_call(3, 1, 9, 6)
    expected = eager(pair, call)
    with pytest.raises(KeyboardInterrupt):
        generate(pair.graphs, call, pair.device)
    (cache,) = decode_state(pair.graphs).pool._caches.values()
    assert all(int(layer.cumulative_length) == 9 for layer in cache.layers)  # where prefill left them
    stats = assert_ready(pair.graphs)
    assert runner._memory_pool is None and not runner._failed and stats["captures"] == 0
    assert torch.equal(generate(pair.graphs, call, pair.device), expected)
    assert assert_ready(pair.graphs)["captures"] == 1


def test_a_prefill_out_of_memory_empties_the_pool_and_the_next_call_is_right(pair, monkeypatch):
    """Out of GPU memory in prefill: the error reaches the caller; every pooled cache and graph is dropped
    (their memory comes back for the retry); the next call captures again and is right. Prefill graphs are
    off here: an eager prefill is where memory runs out (a replayed one allocates nothing)."""
    monkeypatch.setenv("HF_MOE_ACCEL_PREFILL_GRAPHS", "0")
    call = random_call(4, 2, 11, 6)
    expected = eager(pair, call)
    assert torch.equal(generate(pair.graphs, call, pair.device), expected)
    assert graph_stats(pair.graphs)["pooled_caches"] == 1 and graph_stats(pair.graphs)["graphs_held"] >= 1
    failures = [torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")]

    def prefill_out_of_memory(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if failures and ids is not None and ids.shape[1] > 1:
            raise failures.pop()

    hook = pair.graphs.register_forward_pre_hook(prefill_out_of_memory, with_kwargs=True)
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError):
            generate(pair.graphs, call, pair.device)
    finally:
        hook.remove()
    stats = assert_ready(pair.graphs)
    assert stats["pooled_caches"] == 0 and stats["graphs_held"] == 0 and stats["pooled_kv_cache_bytes"] == 0
    assert torch.equal(generate(pair.graphs, call, pair.device), expected)
    stats = assert_ready(pair.graphs)
    assert stats["captures"] == 2 and stats["pooled_caches"] == 1


def test_a_failing_compile_captures_the_model_and_the_next_call_is_right(pair, monkeypatch):
    """compile_decode whose backend raises: the step is captured uncompiled (one failed compile noted), and
    the calls are right; the pool holds one cache, its graph over it. (Prefill graphs off: the judge is the
    eager twin, whose prefill is eager.)"""

    def refusing_backend(graph_module, example_inputs):
        raise RuntimeError("backend refused")

    monkeypatch.setenv("HF_MOE_ACCEL_PREFILL_GRAPHS", "0")
    torch._dynamo.reset()
    runner = decode_state(pair.graphs).runner
    runner.compile_backend, runner.compile_options = refusing_backend, None
    try:
        call = random_call(5, 1, 8, 5)
        expected = eager(pair, call)
        for _ in range(2):
            assert torch.equal(generate(pair.graphs, call, pair.device), expected)
    finally:
        torch._dynamo.reset()
    stats = assert_ready(pair.graphs)
    assert len(stats["failed_compiles"]) == 1 and stats["compiled_captures"] == 0
    assert stats["captures"] == 1 and stats["replays"] >= 8 and stats["pooled_caches"] == stats["caches_with_graphs"] == 1
    assert stats["graphs_held"] == 1


def test_a_cache_that_fails_to_reset_leaves_the_pool_with_its_graphs():
    model = AutoModelForCausalLM.from_pretrained(fixture(), dtype=torch.float32)
    evicted = []
    pool = StaticCachePool(model.config, max_entries=2, on_evict=evicted.append)
    cache = pool.get(1, 100)
    assert pool.last_key == (1, 256)

    def failing_reset():
        raise RuntimeError("reset failed")

    cache.reset = failing_reset
    with pytest.raises(RuntimeError, match="reset failed"):
        pool.get(1, 100)
    assert evicted == [cache] and not pool.owns(cache) and len(pool) == 0


def test_out_of_memory_is_recognised_through_the_errors_it_caused():
    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        except torch.cuda.OutOfMemoryError:
            raise RuntimeError("operation failed due to a previous error during capture")
    except RuntimeError as error:
        assert is_out_of_memory(error)
    assert not is_out_of_memory(RuntimeError("something else")) and not is_out_of_memory(KeyboardInterrupt())


def test_a_deep_copy_gets_a_lock_of_its_own():
    model = AutoModelForCausalLM.from_pretrained(fixture(), dtype=torch.float32).eval()
    accelerate(model, cuda_graphs=False)
    enable_graph_decode(model, GraphBackend("cpu", stand_in_capture))
    twin = copy.deepcopy(model)
    assert decode_state(twin).lock is not decode_state(model).lock
    with decode_state(model).lock:  # a call in flight on the model doesn't hold up its copy
        assert lock_is_free(decode_state(twin).lock)


# ---- pickling an offloaded model --------------------------------------------------------------------

# Fetch a missed expert with 3 or more tokens, else run it on the CPU (no calibration run).
COSTS = MissCostModel(fetch_s=1e-4, cpu_base_s=0.0, cpu_per_token_s=3.4e-5)


def offloaded(zero_copy: bool = False):
    model, _ = load_fixture(fixture())
    accelerate(model, gpu_memory="1GiB", cuda_graphs=False,
               offload=OffloadOptions(device="cpu", reserve="16MiB", cost_model=COSTS, slots_per_layer=4, zero_copy=zero_copy))
    return model


def refusals(model) -> list[str]:
    """The message of each way of copying `model` (each must raise TypeError)."""
    messages = []
    for copy_it in (lambda: pickle.dumps(model), lambda: torch.save(model, io.BytesIO()), lambda: copy.deepcopy(model)):
        with pytest.raises(TypeError) as caught:
            copy_it()
        messages.append(str(caught.value))
    return messages


def test_an_offloaded_model_refuses_pickling_and_deep_copies_saying_to_unpatch():
    model = offloaded()
    ids = torch.randint(1, 4096, (1, 8), generator=torch.Generator().manual_seed(0))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=PAD)
    before = model.generate(ids, **kwargs)
    for message in refusals(model):
        assert "unpatch(model)" in message and "gpu_memory" in message, message
    engine = offload_engine(model)
    for part in (engine, engine.layers[0]):  # the objects themselves, however they are reached
        with pytest.raises(TypeError, match="unpatch"):
            pickle.dumps(part)
        with pytest.raises(TypeError, match="unpatch"):
            copy.deepcopy(part)
    assert torch.equal(model.generate(ids, **kwargs), before)  # the failed copies changed nothing
    unpatch(model)
    loaded = pickle.loads(pickle.dumps(model))
    assert torch.equal(loaded.generate(ids, **kwargs), before)


def test_an_offloaded_model_under_graph_decode_refuses_the_same_way():
    model = offloaded(zero_copy=True)
    enable_graph_decode(model, GraphBackend("cpu", stand_in_capture), hooks=decode_hooks(model))
    for message in refusals(model):
        assert "unpatch(model)" in message, message
    unpatch(model)


# ---- the soak script --------------------------------------------------------------------------------


def soak_script():
    spec = importlib.util.spec_from_file_location("soak_generate", SOAK_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


SMALL = ["--calls", "3", "--max-batch", "2", "--max-prompt", "24", "--max-new-tokens", "5", "--device", "cpu"]


def test_soak_script_smoke(tmp_path):
    """Three calls each way on the CPU: under graph decode (the stand-in), and offloaded against the
    resident model; the summary says ok and lands in --json."""
    soak = soak_script()
    path = str(fixture())
    # seed 1 draws one sampled call and two greedy ones
    summary = soak.main(["--model", path, "--seed", "1", "--json", str(tmp_path / "soak.json"), *SMALL],
                        backend=GraphBackend("cpu", stand_in_capture))
    assert summary["ok"], summary["failed_checks"]
    assert summary["calls"] == 3 and summary["sampled_calls"] == 1 and summary["greedy_calls"] == summary["greedy_equal"] == 2
    assert summary["graph_stats"]["replays"] > 0 and summary["max_pooled_caches_seen"] <= 3
    assert json.loads((tmp_path / "soak.json").read_text())["calls"] == 3
    options = OffloadOptions(device="cpu", reserve="16MiB", cost_model=COSTS)
    summary = soak.main(["--model", path, "--gpu-memory", "0.3", "--sampled-share", "0", *SMALL], options=options)
    assert summary["ok"], summary["failed_checks"]
    assert summary["greedy_calls"] == 3 and summary["budget"] > 0
