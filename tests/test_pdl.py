"""Programmatic dependent launch (kernels/pdl.py): when it is on, and that it changes no result."""

import pytest
import torch

from hf_moe_accel.kernels import pdl
from hf_moe_accel.kernels.decode_attention import decode_attention
from hf_moe_accel.kernels.decode_linear import decode_linears_triton
from hf_moe_accel.kernels.experts_triton import fused_experts_triton
from hf_moe_accel.kernels.rmsnorm import rmsnorm_triton
from hf_moe_accel.kernels.routing import route_triton
from hf_moe_accel.kernels.spec import ExpertWeights, RoutingSpec


def test_pdl_is_off_on_cpu_and_under_the_switch(monkeypatch):
    assert not pdl.pdl_enabled(torch.device("cpu"))
    assert pdl.pdl_off_reason(torch.device("cpu")) == "off (not a CUDA launch)"
    assert pdl.pdl_launch_options(torch.device("cpu")) == {}
    monkeypatch.setenv(pdl.ENV_SWITCH, "0")
    # The switch is read before anything asks the CUDA driver: this holds on a machine without a GPU.
    assert not pdl.pdl_enabled(torch.device("cuda", 0))
    assert pdl.pdl_off_reason(torch.device("cuda", 0)) == f"off ({pdl.ENV_SWITCH}=0)"
    assert pdl.pdl_launch_options(torch.device("cuda", 0)) == {}


@pytest.mark.parametrize("value,on", [("1", True), ("TRUE", True), ("on", True), ("", True),
                                      ("0", False), ("false", False), ("Off", False), ("no", False)])
def test_switch_values(monkeypatch, value, on):
    monkeypatch.setenv(pdl.ENV_SWITCH, value)
    monkeypatch.setenv(pdl.INDUCTOR_SWITCH, value)
    cuda = torch.device("cuda", 0)
    if on:
        assert pdl.switch_off_reason(pdl.ENV_SWITCH) is None and pdl.switch_off_reason(pdl.INDUCTOR_SWITCH) is None
    else:
        assert pdl.pdl_off_reason(cuda) == f"off ({pdl.ENV_SWITCH}={value})"
        assert pdl.inductor_pdl_off_reason(cuda) == f"off ({pdl.INDUCTOR_SWITCH}={value})"


def test_a_switch_value_it_does_not_take_is_an_error(monkeypatch):
    """A typo must not leave an A/B run on the wrong side: 'flase' is refused, not read as on."""
    monkeypatch.setenv(pdl.ENV_SWITCH, "flase")
    with pytest.raises(ValueError, match="HF_MOE_ACCEL_PDL='flase'"):
        pdl.pdl_off_reason(torch.device("cpu"))
    monkeypatch.delenv(pdl.ENV_SWITCH)
    monkeypatch.setenv(pdl.INDUCTOR_SWITCH, "2")
    with pytest.raises(ValueError, match="HF_MOE_ACCEL_INDUCTOR_PDL='2'"):
        pdl.inductor_pdl_off_reason(torch.device("cuda", 0))


def test_inductor_pdl_follows_pdl_unless_switched_off(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setenv(pdl.INDUCTOR_SWITCH, "0")
    assert pdl.inductor_pdl_off_reason(cuda) == f"off ({pdl.INDUCTOR_SWITCH}=0)"
    assert pdl.inductor_compile_options(cuda) == {}
    monkeypatch.delenv(pdl.INDUCTOR_SWITCH)  # on by default, where our kernels' PDL is
    assert pdl.inductor_pdl_off_reason(torch.device("cpu")) == "off (not a CUDA launch)"
    monkeypatch.setenv(pdl.ENV_SWITCH, "0")  # our kernels' switch turns inductor's off too
    assert pdl.inductor_pdl_off_reason(cuda) == f"off ({pdl.ENV_SWITCH}=0)"
    monkeypatch.delenv(pdl.ENV_SWITCH)
    monkeypatch.setattr(pdl, "pdl_off_reason", lambda device: None)  # as on a Hopper GPU
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config.triton, "enable_pdl"):
        assert pdl.inductor_compile_options(cuda) == {"triton.enable_pdl": True}
    else:
        assert pdl.inductor_pdl_off_reason(cuda) == "off (this torch's inductor has no triton.enable_pdl)"


def test_compiled_step_gets_inductors_pdl_option_only_from_inductor(monkeypatch):
    """enable_graph_decode hands the options to torch.compile for inductor, none for another backend."""
    from hf_moe_accel.graphs import generate

    monkeypatch.setattr(generate, "inductor_compile_options", lambda device: {"triton.enable_pdl": True})
    model = torch.nn.Linear(2, 2)
    assert generate._compile_options(model, generate.GraphBackend("cuda", None, "inductor")) == {"triton.enable_pdl": True}
    assert generate._compile_options(model, generate.GraphBackend("cuda", None, "aot_eager")) is None
    monkeypatch.setattr(generate, "inductor_compile_options", lambda device: {})
    assert generate._compile_options(model, generate.GraphBackend("cuda", None, "inductor")) is None
    from hf_moe_accel.graphs import runner

    calls = []
    monkeypatch.setattr(runner.torch, "compile", lambda module, **kwargs: calls.append(kwargs) or module)
    runner.DecodeGraphs(model, None, compile_backend="inductor", compile_options={"triton.enable_pdl": True})._compiled()
    assert calls == [dict(backend="inductor", dynamic=False, fullgraph=False, options={"triton.enable_pdl": True})]


class _DecodeChain:
    """`layers` decoder-like layers of the kernels PDL launches, each reading the one before's output:
    RMSNorm, a router linear, routing, the decode experts (gate_up, down), three q/k/v-like linears and
    the split decode attention (its combine launch too). Shapes of qwen3-30b-a3b with fewer experts."""

    def __init__(self, layers: int = 4, hidden: int = 2048, inter: int = 768, experts: int = 32, top_k: int = 8,
                 heads: int = 32, kv_heads: int = 4, head_dim: int = 128, keys: int = 1000):
        def randn(*shape, scale=0.02):
            return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * scale

        self.spec = RoutingSpec(top_k, experts, renormalize=True)
        self.layers = [dict(
            norm=1 + randn(hidden, scale=0.1), router=randn(experts, hidden),
            experts=ExpertWeights(randn(experts, 2 * inter, hidden), randn(experts, hidden, inter)),
            q=randn(heads * head_dim, hidden), k=randn(kv_heads * head_dim, hidden), v=randn(kv_heads * head_dim, hidden),
            cache_k=randn(1, kv_heads, keys, head_dim, scale=1.0), cache_v=randn(1, kv_heads, keys, head_dim, scale=1.0),
        ) for _ in range(layers)]
        self.heads, self.head_dim = heads, head_dim
        self.x = randn(1, hidden, scale=1.0)

    def __call__(self) -> torch.Tensor:
        h = self.x
        for layer in self.layers:
            normed = rmsnorm_triton(h, layer["norm"], 1e-6)
            (logits,) = decode_linears_triton(normed, [layer["router"]], [None])
            weights, ids = route_triton(logits, self.spec)
            moe = fused_experts_triton(normed, layer["experts"], ids, weights, path="decode")
            q, k, v = decode_linears_triton(moe, [layer["q"], layer["k"], layer["v"]], [None, None, None])
            layer["cache_k"][0, :, -1] = k.view(-1, self.head_dim)  # the step's key and value, as a cache update
            layer["cache_v"][0, :, -1] = v.view(-1, self.head_dim)
            query = q.view(1, self.heads, 1, self.head_dim)
            attended = decode_attention(query, layer["cache_k"], layer["cache_v"], None, num_splits=4)
            h = h + moe + attended.view(1, -1)[:, : h.shape[1]]
        return h


@pytest.mark.gpu
def test_pdl_decode_chain_in_a_cuda_graph_equals_plain_launches(monkeypatch):
    """The chain captured in a CUDA graph with PDL, replayed on fresh inputs, gives the same bits as
    plain launches: the kernels are the same, only when each may start changes. A kernel that read its
    input before the one writing it had finished would part from it."""
    if not pdl.pdl_enabled(torch.device("cuda")):
        pytest.skip("PDL needs compute capability 9.0 and a Triton with launch_pdl")
    torch.manual_seed(0)
    chain = _DecodeChain()
    chain()  # compile both variants' kernels outside the capture
    monkeypatch.setenv(pdl.ENV_SWITCH, "0")
    chain()
    monkeypatch.delenv(pdl.ENV_SWITCH)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain()  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain()

    monkeypatch.setenv(pdl.ENV_SWITCH, "0")
    for trial in range(20):
        chain.x.copy_(torch.randn_like(chain.x))
        graph.replay()
        replayed = captured.clone()
        expected = chain()
        assert torch.equal(replayed, expected), f"replay {trial} differs by {(replayed - expected).abs().max()}"


def test_env_report_shows_the_switches_and_a_bad_value(monkeypatch, capsys):
    """`hf-moe-accel env` prints both switches, and on a GPU machine reports a value they do not take instead of failing."""
    from hf_moe_accel.cli import main as cli_main

    monkeypatch.setenv(pdl.ENV_SWITCH, "flase")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine, with no device to list
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert cli_main(["env"]) == 0
    out = capsys.readouterr().out
    lines = {line.split("  ")[0]: line.split("  ")[-1].strip() for line in out.splitlines()}
    assert lines[pdl.ENV_SWITCH] == "flase" and lines[pdl.INDUCTOR_SWITCH] == "unset"
    assert lines["programmatic dependent launch"].startswith("error: HF_MOE_ACCEL_PDL='flase'")
