"""Up to three linear layers on the same few input rows, in one Triton launch.

At a decode step's few tokens a linear layer is a matrix-vector product: its time is the weight's
bytes over the memory bandwidth plus a fixed few microseconds of launch and ramp-up. cuBLAS spends
those microseconds once per projection (q, k and v are three launches reading one input; GQA's k
and v weights are so small that the fixed cost is all their time). Here one launch reads all
three weights, split into BLOCK_N row tiles that run side by side, each tile reduced over K in
float32 like cuBLAS does. Larger inputs keep `F.linear` (the caller's choice: `DECODE_MAX_ROWS`).

Launch parameters are data, beside the fused-experts configs in `configs/<device>.json`, written
by `scripts/bench_decode_linear.py --write`:

    "decode_linear": {"N=4096+512+512,K=2048": {"1": {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 8},
                                                "4": null}}

per output sizes and hidden size, by row count (the nearest is used); null where cuBLAS times
faster in the tuner. Calls of shapes without data on their GPU keep `F.linear`: the kernel runs only
where the tuned data says it beats cuBLAS. Under Triton's interpreter (tests): DEFAULT_CONFIG.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch_options, prologue
from .tuning import device_config_file, interpreting, load_config_file

# Input rows (tokens) up to which the launch is tried: each row is its own program, reading the
# weight tiles again (from L2 after the first row); at more rows a GEMM reads them once. Tuned
# data decides within this.
DECODE_MAX_ROWS = 4
MAX_LINEARS = 3
# The tuner's first guess, and the interpreter's config: BLOCK_N and num_warps as they win at one row for
# the q/k/v and router shapes of the tuner (re-derive: `python scripts/bench_decode_linear.py --rows 1`).
DEFAULT_CONFIG = {"BLOCK_N": 8, "BLOCK_K": 256, "num_warps": 8}
# The kernel serves CUDA tensors; tests set this to serve CPU tensors too (Triton's interpreter).
SERVE_CPU_TENSORS = False


def decode_linears_reference(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """[F.linear(x, w, b) for each (w, b)]: what the kernel computes."""
    return [torch.nn.functional.linear(x, w, b) for w, b in zip(weights, biases)]


def decode_linears_fit(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> bool:
    """Whether `decode_linears_triton` takes these inputs: at most DECODE_MAX_ROWS rows of x, 1 to 3
    weights [N, K] with K contiguous, one dtype and device for all, and a bias on every linear or none."""
    if not 1 <= len(weights) <= MAX_LINEARS or x.shape[-1] == 0 or x.numel() // x.shape[-1] > DECODE_MAX_ROWS:
        return False
    tensors = [x, *weights, *(b for b in biases if b is not None)]
    if any(t.dtype != x.dtype or t.device != x.device for t in tensors):
        return False
    if any(w.dim() != 2 or w.shape[1] != x.shape[-1] or w.stride(1) != 1 for w in weights):
        return False
    return all(b is None for b in biases) or all(b is not None and b.dim() == 1 and b.stride(0) == 1 for b in biases)


def shape_key(sizes: tuple[int, ...], K: int) -> str:
    return f"N={'+'.join(map(str, sizes))},K={K}"


# Under torch.compile the lookup runs once, as plain Python, while tracing (its inputs are shapes and a
# device), rather than dynamo tracing through the cache wrapper and the file read.
@torch.compiler.assume_constant_result
def decode_linear_config(sizes: tuple[int, ...], K: int, rows: int, device: torch.device) -> dict | None:
    """Launch parameters for linears of output sizes `sizes` over K inputs at `rows` rows; None (keep cuBLAS)
    where the tuned data says cuBLAS is faster or has no entry for this shape and row count."""
    return _tuned_config(sizes, K, rows, device)


@functools.lru_cache(maxsize=1024)
def _tuned_config(sizes: tuple[int, ...], K: int, rows: int, device: torch.device) -> dict | None:
    if interpreting() or device.type != "cuda":
        return DEFAULT_CONFIG
    by_rows = load_config_file(device_config_file(device)).get("decode_linear", {}).get(shape_key(sizes, K))
    if not by_rows:
        return None
    nearest = min(by_rows, key=lambda tuned: abs(int(tuned) - rows))
    return by_rows[nearest] if int(nearest) >= rows else None  # rows past the largest tuned count: not measured


def _config_for(x: torch.Tensor, weights: list[torch.Tensor]) -> dict | None:
    return decode_linear_config(tuple(w.shape[0] for w in weights), x.shape[-1], x.numel() // x.shape[-1], x.device)


def decode_linears_serve(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> bool:
    """Whether callers should launch the kernel: CUDA inputs it fits where no tuned data says cuBLAS is faster,
    and no gradient wanted (it has no backward)."""
    if not (x.is_cuda or SERVE_CPU_TENSORS):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in [x, *weights, *(b for b in biases if b is not None)]):
        return False
    return decode_linears_fit(x, weights, biases) and _config_for(x, weights) is not None


def decode_linears_triton(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                          out_dtype: torch.dtype | None = None, config: dict | None = None) -> list[torch.Tensor]:
    """`decode_linears_reference` in one launch, for inputs `decode_linears_fit` accepts. `out_dtype`: the outputs'
    dtype (default x's), e.g. float32 for F.linear(x.float(), w.float()); `config`: DEFAULT_CONFIG's keys (default:
    the tuned data's, else DEFAULT_CONFIG)."""
    config = config or _config_for(x, weights) or DEFAULT_CONFIG  # a direct call (tests, benchmarks) runs untuned shapes too
    K = x.shape[-1]
    rows = x.reshape(-1, K)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    outs = [torch.empty(rows.shape[0], w.shape[0], dtype=out_dtype or x.dtype, device=x.device) for w in weights]
    if rows.shape[0]:
        # Unused slots repeat the last linear with no tiles: their pointers are never read.
        slots = [*range(len(weights)), *[len(weights) - 1] * (MAX_LINEARS - len(weights))]
        tiles = [triton.cdiv(weights[i].shape[0], config["BLOCK_N"]) if i < len(weights) else 0 for i in range(MAX_LINEARS)]
        has_bias = biases[0] is not None
        ws = [weights[i] for i in slots]
        bs = [biases[i] if has_bias else weights[i] for i in slots]
        os = [outs[i] for i in slots]
        _decode_linears_kernel[(rows.shape[0], sum(tiles))](
            rows, *ws, *bs, *os, *(w.shape[0] for w in ws), K, rows.stride(0), *(w.stride(0) for w in ws),
            *(o.stride(0) for o in os), tiles[0], tiles[1], HAS_BIAS=has_bias, **config,
            **pdl_launch_options(x.device),
        )
    return [out.view(*x.shape[:-1], out.shape[-1]) for out in outs]


@triton.jit
def _decode_linears_kernel(
    x_ptr, w0_ptr, w1_ptr, w2_ptr, b0_ptr, b1_ptr, b2_ptr, o0_ptr, o1_ptr, o2_ptr,
    N0, N1, N2, K, stride_xm, stride_w0, stride_w1, stride_w2, stride_o0, stride_o1, stride_o2,
    TILES0, TILES1, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """out_i[row, tile] = x[row] . w_i[tile rows]^T (+ b_i); program (row, t): the t-th tile over all three linears.

    With PDL the first weight tile is loaded before the wait for the previous kernel: no kernel of a
    decode step writes a weight, so its bytes stream in while that kernel finishes (inductor's kernels
    likewise load what the previous kernel does not write before their wait).
    """
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    if tile < TILES0:
        w_ptr, b_ptr, o_ptr, N, stride_w, stride_o = w0_ptr, b0_ptr, o0_ptr, N0, stride_w0, stride_o0
    elif tile < TILES0 + TILES1:
        w_ptr, b_ptr, o_ptr, N, stride_w, stride_o = w1_ptr, b1_ptr, o1_ptr, N1, stride_w1, stride_o1
        tile -= TILES0
    else:
        w_ptr, b_ptr, o_ptr, N, stride_w, stride_o = w2_ptr, b2_ptr, o2_ptr, N2, stride_w2, stride_o2
        tile -= TILES0 + TILES1
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_w
    k_mask = offs_k < K
    w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
    prologue(USE_PDL)
    x = tl.load(x_ptr + row * stride_xm + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    acc = w.to(tl.float32) * x[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < K
        x = tl.load(x_ptr + row * stride_xm + ks, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + ks[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + row * stride_o + offs_n, out.to(o_ptr.dtype.element_ty), mask=n_mask)
