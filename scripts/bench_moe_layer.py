"""One MoE layer (router + experts), ours against stock Transformers, on this GPU; bf16 random weights.

    python scripts/bench_moe_layer.py --shapes olmoe-1b-7b,qwen3-30b-a3b,mixtral-8x7b \
        --tokens 1,4,16,64,256,1024,4096 --json moe_layer.json

Ours: router linear + `hf_moe_accel.kernels.route` + `fused_experts_triton`, eager and replayed
from a CUDA graph. Stock: the family's real sparse-MoE block from Transformers with
`_experts_implementation` "grouped_mm" (eager) and "batched_mm" (eager and graph; skipped where
its per-pair weight copies would pass --batched-mm-limit-gb). Every figure cycles over 4 copies of
the layer's weights (one graph holds the 4 calls) so L2 does not hold them, median per call.
The HBM limit is (distinct experts touched) x 3 x H x I x 2 bytes over the measured copy
bandwidth (read + write bytes counted) and over 3.35 TB/s (the MoE-layer bar of docs/BENCHMARKS.md). Our output is
checked against stock's on the same weights and inputs before any timing.

`--fp8` adds a row per (shape, tokens) with the same weights block-quantized to FP8 as Transformers' fine-grained
FP8 quantizer stores them (float8_e4m3fn, one float32 scale per 128x128 block): ours on FP8 weights, eager and
graph, beside ours on the bf16 weights timed in the same row. Its HBM limit counts FP8 bytes: (distinct experts
touched) x (3 x H x I bytes + the experts' float32 block scales). The FP8 output is checked against the FP8
reference (dequantized weights, same routing) before timing; its distance from stock bf16 (the quantization
error) is reported. `--fp8-only` skips the bf16 rows (and stock):

    python scripts/bench_moe_layer.py --shapes qwen3-30b-a3b --tokens 1,4,16,32,64 --fp8-only --json moe_fp8.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hf_moe_accel.kernels import tuning
from hf_moe_accel.kernels.experts_fp8_reference import (
    FP8_DTYPE,
    experts_fp8_reference,
    quantize_expert_weights,
)
from hf_moe_accel.kernels.experts_triton import fused_experts_triton
from hf_moe_accel.kernels.spec import Activation, ExpertWeights, RoutingSpec

try:
    from hf_moe_accel.kernels import route
    from hf_moe_accel.kernels.routing import route_triton  # noqa: F401  (an availability probe)

    ROUTE_IMPL = "route_triton"
except ImportError:
    from hf_moe_accel.kernels.routing_reference import route_reference as route

    ROUTE_IMPL = "route_reference"
    print("note: hf_moe_accel.kernels.routing.route_triton not found; ours uses route_reference (plain torch)")

COPIES = 4
PROTOCOL_BANDWIDTH = 3.35e12  # bytes/s, H100 80GB HBM3 spec, the bar of docs/BENCHMARKS.md
MAX_REL_ERROR = 2e-2
FP8_BLOCK = (128, 128)  # Transformers' FineGrainedFP8Config default weight_block_size
# FP8 against stock bf16: e4m3 keeps 3 mantissa bits, so a few percent is expected; far more means a broken kernel.
FP8_MAX_QUANTIZATION_ERROR = 0.15

# Public dimensions of the benchmark presets (docs/BENCHMARKS.md) (routed experts only). `family` names the
# Transformers MoE block the stock side is built from (None: tuning only, no stock builder here).
SHAPES = {
    "olmoe-1b-7b": dict(family="olmoe", E=64, k=8, H=2048, I=1024, renormalize=False),
    "qwen3-30b-a3b": dict(family="qwen3_moe", E=128, k=8, H=2048, I=768, renormalize=True),
    "mixtral-8x7b": dict(family="mixtral", E=8, k=2, H=4096, I=14336, renormalize=True),
    "deepseek-v2-lite": dict(family=None, E=64, k=6, H=2048, I=1408, renormalize=False),
    "gpt-oss-20b": dict(family=None, E=32, k=4, H=2880, I=2880, renormalize=False, gpt_oss=True),
}
for _shape in SHAPES.values():
    _shape.setdefault("gpt_oss", False)
    _shape["transposed"] = _shape["gpt_oss"]  # GPT-OSS: [E, H, 2I] interleaved, biases, clamped SwiGLU


def make_expert_weights(shape: dict, seed: int = 0, std: float = 0.02, device: str = "cuda") -> ExpertWeights:
    """Random bf16 expert weights of a preset, in the preset's layout."""
    g = torch.Generator(device=device).manual_seed(seed)
    E, H, I = shape["E"], shape["H"], shape["I"]

    def randn(*size):
        return torch.randn(*size, generator=g, device=device, dtype=torch.bfloat16) * std

    if shape["gpt_oss"]:
        return ExpertWeights(randn(E, H, 2 * I), randn(E, I, H), randn(E, 2 * I), randn(E, H),
                             transposed=True, interleaved=True, activation=Activation("swiglu_oai"))
    return ExpertWeights(randn(E, 2 * I, H), randn(E, H, I))


def random_routing(tokens: int, experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, ids [T, k] int64): k distinct uniformly random experts per token."""
    ids = torch.rand(tokens, experts, device="cuda").topk(top_k, dim=-1).indices
    return torch.softmax(torch.randn(tokens, top_k, device="cuda"), dim=-1), ids


def _median_us(events: list, calls: int) -> float:
    torch.cuda.synchronize()
    return statistics.median(b.elapsed_time(e) for b, e in events) * 1000 / calls


def _reps(seconds_per_rep: float, min_reps: int, max_reps: int, budget_s: float) -> int:
    return max(min_reps, min(max_reps, int(budget_s / max(seconds_per_rep, 1e-6))))


def time_eager(fns: list, min_reps: int = 10, max_reps: int = 40, budget_s: float = 0.3) -> float:
    """Median microseconds per call of running all of `fns` back to back, eagerly."""
    for _ in range(3):
        for fn in fns:
            fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(_reps(time.perf_counter() - start, min_reps, max_reps, budget_s))]
    for begin, end in events:
        begin.record()
        for fn in fns:
            fn()
        end.record()
    return _median_us(events, len(fns))


def time_graph(fns: list, min_reps: int = 5, max_reps: int = 40, budget_s: float = 0.2) -> tuple[float, list]:
    """(median microseconds per call, the captured outputs): one CUDA graph holding all `fns`, replayed."""
    for fn in fns:  # compile and warm up outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = [fn() for fn in fns]
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(_reps(time.perf_counter() - start, min_reps, max_reps, budget_s))]
    for begin, end in events:
        begin.record()
        graph.replay()
        end.record()
    return _median_us(events, len(fns)), outputs


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, read + write bytes counted."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    micros = time_eager([lambda: dst.copy_(src)], min_reps=10, max_reps=20)
    return 2 * nbytes / (micros * 1e-6)


def build_stock_blocks(shape: dict, device: str = "cuda") -> list[torch.nn.Module]:
    """COPIES identical (same values, separate memory) Transformers MoE blocks, bf16."""
    family, E, k, H, I = shape["family"], shape["E"], shape["k"], shape["H"], shape["I"]
    if family == "olmoe":
        from transformers.models.olmoe.configuration_olmoe import OlmoeConfig as Config
        from transformers.models.olmoe.modeling_olmoe import (
            OlmoeSparseMoeBlock as Block,
        )

        config = Config(hidden_size=H, intermediate_size=I, num_experts=E, num_experts_per_tok=k,
                        norm_topk_prob=shape["renormalize"])
    elif family == "qwen3_moe":
        from transformers.models.qwen3_moe.configuration_qwen3_moe import (
            Qwen3MoeConfig as Config,
        )
        from transformers.models.qwen3_moe.modeling_qwen3_moe import (
            Qwen3MoeSparseMoeBlock as Block,
        )

        config = Config(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k,
                        norm_topk_prob=shape["renormalize"])
    elif family == "mixtral":
        from transformers.models.mixtral.configuration_mixtral import (
            MixtralConfig as Config,
        )
        from transformers.models.mixtral.modeling_mixtral import (
            MixtralSparseMoeBlock as Block,
        )

        config = Config(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k)
    else:
        raise SystemExit(f"no stock Transformers builder for this shape (family {family!r}); it is for tuning only")
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            block = Block(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.02)  # std 0.02: router logits of std ~1, non-degenerate routing
    return [block] + [copy.deepcopy(block) for _ in range(COPIES - 1)]


def set_experts_implementation(blocks: list[torch.nn.Module], name: str) -> None:
    for block in blocks:
        block.experts.config._experts_implementation = name


def routing_spec(shape: dict) -> RoutingSpec:
    # Mixtral's router keeps float32 weights; OLMoE's and Qwen3's cast them to the logits' dtype.
    weights_dtype = None if shape["family"] == "mixtral" else torch.bfloat16
    return RoutingSpec(top_k=shape["k"], num_experts=shape["E"], scoring="softmax",
                       renormalize=shape["renormalize"], weights_dtype=weights_dtype)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def block_experts(blocks: list) -> list[ExpertWeights]:
    """Each stock block's expert weights, in place (no copy)."""
    return [ExpertWeights(b.experts.gate_up_proj, b.experts.down_proj) for b in blocks]


def fp8_expert_bytes(shape: dict) -> int:
    """Bytes of one expert in FP8: 3 x H x I e4m3 values plus the float32 scales of gate_up and down."""
    H, I = shape["H"], shape["I"]
    blocks = -(-2 * I // FP8_BLOCK[0]) * -(-H // FP8_BLOCK[1]) + -(-H // FP8_BLOCK[0]) * -(-I // FP8_BLOCK[1])
    return 3 * H * I + 4 * blocks


def layer_inputs(shape: dict, tokens: int):
    """The layer's routing spec, its input (drawn from seed `tokens`) and ours(block, weights): our routing
    over the block's router, then the fused experts on `weights`."""
    spec = routing_spec(shape)
    torch.manual_seed(tokens)
    x = torch.randn(tokens, shape["H"], device="cuda", dtype=torch.bfloat16)

    def ours(block, weights):
        topk_weights, topk_ids = route(F.linear(x, block.gate.weight), spec)
        return fused_experts_triton(x, weights, topk_ids, topk_weights)

    return spec, x, ours


def bench_row(name: str, shape: dict, blocks: list, tokens: int, bandwidth: float, limit_gb: float) -> dict:
    E, k, H, I = shape["E"], shape["k"], shape["H"], shape["I"]
    experts = block_experts(blocks)
    spec, x, ours = layer_inputs(shape, tokens)
    ours_fns = [lambda b=b, w=w: ours(b, w) for b, w in zip(blocks, experts)]
    stock_fns = [lambda b=b: b(x.view(1, tokens, H)).view(tokens, H) for b in blocks]
    path = "decode" if tuning.use_decode_path(E, I, H, tokens, k, torch.bfloat16, x.device) else "prefill"
    _, ids = route(F.linear(x, blocks[0].gate.weight), spec)
    distinct = ids.unique().numel()
    expert_bytes = distinct * 3 * H * I * 2
    row = dict(shape=name, tokens=tokens, path=path, distinct_experts=distinct,
               hbm_limit_us=expert_bytes / bandwidth * 1e6, hbm_limit_us_protocol=expert_bytes / PROTOCOL_BANDWIDTH * 1e6)

    set_experts_implementation(blocks, "grouped_mm")
    stock_out = stock_fns[0]()
    row["max_rel_error"] = rel_error(ours_fns[0](), stock_out)
    if row["max_rel_error"] > MAX_REL_ERROR:
        print(f"!!!!! {name} tokens={tokens}: ours differs from stock by {row['max_rel_error']:.2e} "
              f"(> {MAX_REL_ERROR}): row not timed !!!!!", flush=True)
        return row

    row["ours_eager_us"] = time_eager(ours_fns)
    row["ours_graph_us"], graph_outputs = time_graph(ours_fns)
    row["max_rel_error_graph"] = rel_error(graph_outputs[0], stock_out)
    if row["max_rel_error_graph"] > MAX_REL_ERROR:
        print(f"!!!!! {name} tokens={tokens}: ours replayed from a CUDA graph differs from stock by "
              f"{row['max_rel_error_graph']:.2e} !!!!!", flush=True)
    del graph_outputs
    row["stock_grouped_mm_us"] = time_eager(stock_fns)
    set_experts_implementation(blocks, "batched_mm")
    if tokens * k * 3 * H * I * 2 > limit_gb * 1e9:
        print(f"  {name} tokens={tokens}: stock batched_mm skipped (memory)")
        row["stock_batched_mm"] = "skipped (memory)"
    else:
        row["stock_batched_mm_eager_us"] = time_eager(stock_fns)
        try:
            row["stock_batched_mm_graph_us"], _ = time_graph(stock_fns)
        except Exception as error:  # report, don't abort the run
            row["stock_batched_mm_graph"] = f"capture failed: {type(error).__name__}: {error}"[:200]
            print(f"  {name} tokens={tokens}: stock batched_mm {row['stock_batched_mm_graph']}")
    set_experts_implementation(blocks, "grouped_mm")
    torch.cuda.empty_cache()

    stock = [row.get(key) for key in ("stock_grouped_mm_us", "stock_batched_mm_eager_us", "stock_batched_mm_graph_us")]
    row["stock_best_us"] = min(t for t in stock if t is not None)
    row["pct_hbm_limit"] = 100 * row["hbm_limit_us"] / row["ours_graph_us"]
    row["pct_hbm_limit_protocol"] = 100 * row["hbm_limit_us_protocol"] / row["ours_graph_us"]
    row["speedup_vs_stock_best"] = row["stock_best_us"] / row["ours_graph_us"]
    return row


def bench_fp8_row(name: str, shape: dict, blocks: list, fp8_experts: list[ExpertWeights], tokens: int,
                  bandwidth: float) -> dict:
    """Ours on FP8 weights (`fp8_experts`, the blocks' weights quantized) and on the bf16 ones, same inputs."""
    E, k, H, I = shape["E"], shape["k"], shape["H"], shape["I"]
    experts = block_experts(blocks)
    spec, x, ours = layer_inputs(shape, tokens)
    fp8_fns = [lambda b=b, w=w: ours(b, w) for b, w in zip(blocks, fp8_experts)]
    bf16_fns = [lambda b=b, w=w: ours(b, w) for b, w in zip(blocks, experts)]
    path = "decode" if tuning.use_decode_path(E, I, H, tokens, k, FP8_DTYPE, x.device) else "prefill"
    topk_weights, ids = route(F.linear(x, blocks[0].gate.weight), spec)
    distinct = ids.unique().numel()
    expert_bytes = distinct * fp8_expert_bytes(shape)
    row = dict(shape=name, tokens=tokens, path=path, distinct_experts=distinct, fp8_bytes=expert_bytes,
               hbm_limit_us=expert_bytes / bandwidth * 1e6, hbm_limit_us_protocol=expert_bytes / PROTOCOL_BANDWIDTH * 1e6)

    reference = experts_fp8_reference(x, fp8_experts[0], ids, topk_weights)
    out = fp8_fns[0]()
    row["max_rel_error"] = rel_error(out, reference)
    set_experts_implementation(blocks, "grouped_mm")
    stock = blocks[0](x.view(1, tokens, H)).view(tokens, H)
    row["rel_error_vs_stock_bf16"] = rel_error(out, stock)
    if row["max_rel_error"] > MAX_REL_ERROR or row["rel_error_vs_stock_bf16"] > FP8_MAX_QUANTIZATION_ERROR:
        print(f"!!!!! {name} tokens={tokens} FP8: ours differs from the FP8 reference by {row['max_rel_error']:.2e} "
              f"(> {MAX_REL_ERROR}?) and from stock bf16 by {row['rel_error_vs_stock_bf16']:.2e} "
              f"(> {FP8_MAX_QUANTIZATION_ERROR}?): row not timed !!!!!", flush=True)
        return row

    row["ours_fp8_eager_us"] = time_eager(fp8_fns)
    row["ours_fp8_graph_us"], graph_outputs = time_graph(fp8_fns)
    row["max_rel_error_graph"] = rel_error(graph_outputs[0], reference)
    if row["max_rel_error_graph"] > MAX_REL_ERROR:
        print(f"!!!!! {name} tokens={tokens} FP8: ours replayed from a CUDA graph differs from the reference by "
              f"{row['max_rel_error_graph']:.2e} !!!!!", flush=True)
    del graph_outputs
    row["ours_bf16_graph_us"], _ = time_graph(bf16_fns)
    torch.cuda.empty_cache()
    row["pct_hbm_limit"] = 100 * row["hbm_limit_us"] / row["ours_fp8_graph_us"]
    row["pct_hbm_limit_protocol"] = 100 * row["hbm_limit_us_protocol"] / row["ours_fp8_graph_us"]
    row["speedup_vs_ours_bf16"] = row["ours_bf16_graph_us"] / row["ours_fp8_graph_us"]
    return row


def us(row: dict, key: str) -> str:
    """A table cell: the row's microseconds to one decimal, "-" where it has none."""
    value = row.get(key)
    return f"{value:.1f}" if isinstance(value, float) else "-"


def markdown_fp8(rows: list[dict]) -> str:
    lines = [
        "| shape | tokens | path | FP8 HBM limit us (measured / 3.35 TB/s) | ours bf16 graph us | ours FP8 eager us "
        "| ours FP8 graph us | % of FP8 HBM limit (measured / 3.35 TB/s) | FP8 speedup vs our bf16 | rel error vs stock bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "ours_fp8_graph_us" not in r:
            lines.append(f"| {r['shape']} | {r['tokens']} | MISMATCH: rel error {r['max_rel_error']:.2e} "
                         f"(vs stock bf16 {r['rel_error_vs_stock_bf16']:.2e}) |||||||")
            continue
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['path']} | {us(r, 'hbm_limit_us')} / {us(r, 'hbm_limit_us_protocol')} "
            f"| {us(r, 'ours_bf16_graph_us')} | {us(r, 'ours_fp8_eager_us')} | {us(r, 'ours_fp8_graph_us')} "
            f"| {r['pct_hbm_limit']:.0f}% / {r['pct_hbm_limit_protocol']:.0f}% | {r['speedup_vs_ours_bf16']:.2f}x "
            f"| {r['rel_error_vs_stock_bf16']:.3f} |"
        )
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| shape | tokens | path | HBM limit us (measured / 3.35 TB/s) | stock grouped_mm us | stock batched_mm us "
        "(eager / graph) | ours eager us | ours graph us | % of HBM limit (measured / 3.35 TB/s) | speedup vs stock best |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "ours_graph_us" not in r:
            lines.append(f"| {r['shape']} | {r['tokens']} | MISMATCH: rel error {r['max_rel_error']:.2e} |||||||")
            continue
        batched = r.get("stock_batched_mm") or f"{us(r, 'stock_batched_mm_eager_us')} / {us(r, 'stock_batched_mm_graph_us')}"
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['path']} | {us(r, 'hbm_limit_us')} / {us(r, 'hbm_limit_us_protocol')} "
            f"| {us(r, 'stock_grouped_mm_us')} | {batched} | {us(r, 'ours_eager_us')} | {us(r, 'ours_graph_us')} "
            f"| {r['pct_hbm_limit']:.0f}% / {r['pct_hbm_limit_protocol']:.0f}% | {r['speedup_vs_stock_best']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="olmoe-1b-7b,qwen3-30b-a3b,mixtral-8x7b")
    parser.add_argument("--tokens", default="1,4,16,64,256,1024,4096")
    parser.add_argument("--json", type=Path, help="write the rows and the run's metadata here")
    parser.add_argument("--batched-mm-limit-gb", type=float, default=20.0)
    parser.add_argument("--fp8", action="store_true", help="add rows with the weights block-quantized to FP8")
    parser.add_argument("--fp8-only", action="store_true", help="FP8 rows only (no bf16 rows, no stock timings)")
    args = parser.parse_args()
    args.fp8 = args.fp8 or args.fp8_only
    names = args.shapes.split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; known: {sorted(SHAPES)}")
    token_counts = [int(t) for t in args.tokens.split(",")]

    start = time.perf_counter()
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); routing: {ROUTE_IMPL}")
    rows, fp8_rows = [], []
    for name in names:
        blocks = build_stock_blocks(SHAPES[name])
        with torch.inference_mode():
            fp8_experts = [quantize_expert_weights(w, FP8_BLOCK) for w in block_experts(blocks)] if args.fp8 else None
            for tokens in token_counts:
                print(f"[{time.perf_counter() - start:5.0f}s] {name} tokens={tokens}", flush=True)
                if not args.fp8_only:
                    rows.append(bench_row(name, SHAPES[name], blocks, tokens, bandwidth, args.batched_mm_limit_gb))
                if args.fp8:
                    fp8_rows.append(bench_fp8_row(name, SHAPES[name], blocks, fp8_experts, tokens, bandwidth))
        del blocks, fp8_experts
        torch.cuda.empty_cache()

    table = markdown(rows) if rows else ""
    fp8_table = markdown_fp8(fp8_rows) if fp8_rows else ""
    print(f"\n{table}\n\n{fp8_table}\n\n{time.perf_counter() - start:.0f}s in all")
    if args.json:
        import transformers
        import triton

        meta = dict(device=torch.cuda.get_device_name(), copy_bandwidth_bytes_per_s=bandwidth,
                    protocol_bandwidth_bytes_per_s=PROTOCOL_BANDWIDTH, routing=ROUTE_IMPL, copies=COPIES,
                    torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__)
        meta["fp8_block_size"] = list(FP8_BLOCK)
        report = {"meta": meta, "rows": rows, "table": table, "fp8_rows": fp8_rows, "fp8_table": fp8_table}
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    if any("ours_graph_us" not in r for r in rows) or any("ours_fp8_graph_us" not in r for r in fp8_rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
