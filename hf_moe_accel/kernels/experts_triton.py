"""Fused MoE experts in Triton: sum_k w[t, k] * down(act(gate_up(x[t]))) for each token's k experts.

Two paths, picked per call by `tuning.use_decode_path` (token count against tuned data):

- prefill: the (token, expert) pairs are sorted by expert into BLOCK_M-row blocks (`align.py`);
  one grouped GEMM computes gate and up for a block and applies the activation, one grouped GEMM
  computes down, scales each row by its routing weight and stores it in its own row of a float32
  [T, k * SPLIT_K, H] buffer, which one reduction sums over k in a fixed order (the top-k sum).
  No atomics: the result is the same from run to run, so greedy decoding is reproducible and a
  graph replay gives what the eager step gives. Blocks past the padded total exit at once.
- decode (a few tokens, bound by reading the experts' weights): no sort; GEMV-style programs per
  (pair, N block) for gate_up + activation, and per (token, N block) for down, which sums the
  token's k pairs in registers and writes the output directly.

An expert id of -1 means "no expert" (a threshold dropped it, or another device or the CPU serves
it): the pair adds nothing and its weight is ignored. Its weights are never read: the sort leaves
it out (prefill), its gate_up program exits at once and the down kernel masks its loads (decode).

Weights are read in place through their strides (transposed or not), gate/up concatenated
(gate row j, up row I + j) or interleaved (rows 2j, 2j + 1: one tile of 2 * BLOCK_N rows, split
after the GEMM). All arithmetic accumulates in float32; the intermediate is stored in the
weights' dtype, like the reference. Every size depends only on T, k, E and the config, and
nothing syncs with the host, so a call can be captured in a CUDA graph.

Block-scaled (FP8) weights (`ExpertWeights.scales`) run the same four kernels with BLOCK_SCALED
set: each weight tile is loaded in its stored dtype, multiplied in float32 by its rows' block
scales (one scale per weight row per K tile: BLOCK_K is cut to divide the scale block's K extent,
`fit_scale_blocks`, so a K tile never straddles two blocks), and then used as the bf16 path uses
its tile: cast to the activations' dtype for the prefill dots, kept in float32 by the decode GEMVs.
Activations stay in their dtype and the intermediate is stored in it (weight-only FP8, as
`experts_fp8_reference`). Without scales the switch is off at compile time: the bf16 kernels are
compiled exactly as before, with no scale argument. Experts by address (BY_ADDRESS) find their scales
the way they find their weights: through a table of each expert's scale address.

MXFP4 weights (`ExpertWeights.mx_scales`, packed e2m1 nibbles with an e8m0 scale per 32 values) run the
same four kernels with MXFP4 set: each weight tile is gathered byte by byte along K (value k in byte
k // 2, low nibble first), decoded to float32 in registers by building the float's bits (exact: every
e2m1 value and e8m0 scale is a power of two times at most two mantissa bits), scaled by its row's scale
for k // 32, then used as the block-scaled path uses its dequantized tiles. Off by default, so the other
kernels compile as before. Not served by address.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .align import align_pairs
from .experts_fp8_reference import check_block_scales
from .experts_mxfp4_reference import check_mx_scales
from .pdl import pdl_launch_options, prologue
from .spec import CLAMPED_SWIGLUS, ExpertAddresses, ExpertWeights
from .tuning import KernelPath, get_config, use_decode_path


def fused_experts_triton(
    hidden_states: torch.Tensor,
    weights: ExpertWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    path: KernelPath | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """hidden_states [T, H], topk_ids [T, k] (int32/int64), topk_weights [T, k] -> [T, H].

    Equal to `experts_reference` up to float32 rounding (`experts_fp8_reference` for block-scaled
    weights). `path` forces "decode" or "prefill" (default: from the tuning data); `config` overrides
    the launch parameters entirely (the tuner's hook; same format as `tuning.get_config`; with
    block-scaled weights its BLOCK_K is cut as `fit_scale_blocks` says).
    """
    num_tokens, hidden = hidden_states.shape
    if not weights.has_gate and weights.activation.kind in CLAMPED_SWIGLUS:
        raise ValueError(f"the {weights.activation.kind} activation needs a gate")
    if weights.scales is not None:
        check_block_scales(weights)
    if weights.mx_scales is not None:
        check_mx_scales(weights)
    if num_tokens == 0:
        return hidden_states.new_empty((0, hidden))
    top_k = topk_ids.shape[1]
    if config is None:
        layer = (weights.num_experts, weights.intermediate_size, hidden, num_tokens, top_k, weights.gate_up.dtype,
                 hidden_states.device, weights.transposed)
        config = get_config(path or ("decode" if use_decode_path(*layer) else "prefill"), *layer)
    if weights.scales is not None:
        config = fit_scale_blocks(config, weights)
    run = _decode if config["path"] == "decode" else _prefill
    return run(hidden_states, weights, topk_ids.reshape(-1), topk_weights.reshape(-1), top_k, config)


def fit_scale_blocks(config: dict, weights: ExpertWeights) -> dict:
    """`config` with both kernels' BLOCK_K cut to at most the largest power of two that divides the
    scale block's K extent (the reduction axis: the block's columns, its rows when transposed), so
    that every K tile lies in one scale block. A new dict; `config` is left as it is."""
    block_k = weights.scales.block_size[0 if weights.transposed else 1]
    limit = block_k & -block_k
    if limit < 16:  # tl.dot's smallest K tile
        raise ValueError(f"block-scaled weights need a scale block whose K extent is a multiple of 16, got {block_k}")
    fitted = {kernel: {**config[kernel], "BLOCK_K": min(config[kernel]["BLOCK_K"], limit)}
              for kernel in ("gate_up", "down")}
    return {**config, **fitted}


def _scale_args(weights: ExpertWeights, scale: torch.Tensor | None, table: torch.Tensor | None) -> dict:
    """The BLOCK_SCALED kernels' scale arguments ((expert, N, K) strides and block extents, as
    constexprs; `table`: each expert's scale address, for experts by address); none without scales,
    so the unscaled kernels launch exactly as before."""
    if scale is None:
        return {}
    rows, cols = weights.scales.block_size
    if weights.transposed:  # stored [E, K, N]: the block's rows run along K
        stride_se, stride_sk, stride_sn = scale.stride()
        block_n, block_k = cols, rows
    else:
        stride_se, stride_sn, stride_sk = scale.stride()
        block_n, block_k = rows, cols
    return dict(scale_ptr=scale, scale_table_ptr=table, BLOCK_SCALED=True, STRIDE_SE=stride_se, STRIDE_SN=stride_sn,
                STRIDE_SK=stride_sk, SCALE_BN=block_n, SCALE_BK=block_k)


def _mx_args(scale: torch.Tensor | None) -> dict:
    """The MXFP4 kernels' scale arguments (scales [E, N, K // 32]: their strides, as constexprs); none
    without MXFP4, so the other kernels launch exactly as before."""
    if scale is None:
        return {}
    stride_e, stride_n, stride_k = scale.stride()
    return {"mx_scale_ptr": scale, "MXFP4": True, "STRIDE_MXE": stride_e, "STRIDE_MXN": stride_n, "STRIDE_MXK": stride_k}


def _compute_dtype(x: torch.Tensor, weights: ExpertWeights) -> torch.dtype:
    """The dtype the GEMMs' inputs and the intermediate take: the weights' (bf16 path), or the
    activations' when the weights are block-scaled or MXFP4 (dequantized to it)."""
    return x.dtype if weights.scales is not None or weights.mx_scales is not None else weights.gate_up.dtype


def _weight_strides(weight: torch.Tensor, transposed: bool) -> tuple[int, int, int]:
    """(expert, N, K) strides: weights are [E, N, K], or [E, K, N] when transposed."""
    return (weight.stride(0), weight.stride(2), weight.stride(1)) if transposed else tuple(weight.stride())


def _bias_args(bias: torch.Tensor | None, weight: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(pointer, expert stride, N stride); the weight stands in as an unused pointer without bias."""
    return (weight, 0, 0) if bias is None else (bias, bias.stride(0), bias.stride(1))


def _gate_up_args(x: torch.Tensor, weights: ExpertWeights, addresses: ExpertAddresses | None = None) -> dict:
    """Arguments shared by both paths' gate_up kernels."""
    w = weights.gate_up
    stride_we, stride_wn, stride_wk = _weight_strides(w, weights.transposed)
    bias, stride_be, stride_bn = _bias_args(weights.gate_up_bias, w)
    return dict(
        x_ptr=x, w_ptr=w, bias_ptr=bias, N=weights.intermediate_size, K=x.shape[1],
        stride_xt=x.stride(0), stride_xk=x.stride(1),
        stride_we=stride_we, stride_wn=stride_wn, stride_wk=stride_wk, stride_be=stride_be, stride_bn=stride_bn,
        alpha=weights.activation.alpha, limit=weights.activation.limit,
        HAS_BIAS=weights.gate_up_bias is not None, HAS_GATE=weights.has_gate,
        INTERLEAVED=weights.has_gate and weights.interleaved, ACT=weights.activation.kind,
        **_scale_args(weights, weights.scales.gate_up if weights.scales is not None else None,
                      addresses.gate_up_scale if addresses is not None else None),
        **_mx_args(weights.mx_scales.gate_up if weights.mx_scales is not None else None),
    )


def _down_args(weights: ExpertWeights, addresses: ExpertAddresses | None = None) -> dict:
    w = weights.down
    stride_we, stride_wn, stride_wk = _weight_strides(w, weights.transposed)
    bias, stride_be, stride_bn = _bias_args(weights.down_bias, w)
    return dict(
        w_ptr=w, bias_ptr=bias, N=weights.hidden_size, K=weights.intermediate_size,
        stride_we=stride_we, stride_wn=stride_wn, stride_wk=stride_wk, stride_be=stride_be, stride_bn=stride_bn,
        HAS_BIAS=weights.down_bias is not None,
        **_scale_args(weights, weights.scales.down if weights.scales is not None else None,
                      addresses.down_scale if addresses is not None else None),
        **_mx_args(weights.mx_scales.down if weights.mx_scales is not None else None),
    )


def _dot_precision(dtype: torch.dtype) -> str | None:
    # float32 weights get full-precision dots (TF32 would miss the reference by ~1e-3).
    return "ieee" if dtype == torch.float32 else None


def _prefill(x, weights: ExpertWeights, ids, routing, top_k: int, config: dict,
             addresses: ExpertAddresses | None = None) -> torch.Tensor:
    """The prefill path; with `addresses`, as `_decode` (each expert's weights read once per block of
    its pairs, however many tokens share it)."""
    num_tokens, hidden = x.shape
    num_pairs, inter_size = ids.numel(), weights.intermediate_size
    block_m, gate_up, down = config["BLOCK_M"], config["gate_up"], config["down"]
    by_address = addresses is not None
    num_experts = addresses.num_experts if by_address else weights.num_experts
    sorted_pairs, block_experts = align_pairs(ids, num_experts, block_m)
    num_blocks = block_experts.numel()
    compute_dtype = _compute_dtype(x, weights)
    precision = _dot_precision(compute_dtype)

    inter = torch.empty(num_pairs, inter_size, dtype=compute_dtype, device=x.device)
    _prefill_gate_up_kernel[(num_blocks * triton.cdiv(inter_size, gate_up["BLOCK_N"]),)](
        **_gate_up_args(x, weights, addresses), out_ptr=inter, stride_op=inter.stride(0),
        sorted_ptr=sorted_pairs, block_expert_ptr=block_experts, num_pairs=num_pairs, num_blocks=num_blocks,
        w_table_ptr=addresses.gate_up if by_address else block_experts, BY_ADDRESS=by_address,
        TOP_K=top_k, DOT_PRECISION=precision, BLOCK_M=block_m, **gate_up,
    )
    # One float32 row per (pair, K split), zero where no block writes (pairs with expert -1).
    partial = torch.zeros(num_pairs * down["SPLIT_K"], hidden, dtype=torch.float32, device=x.device)
    _prefill_down_kernel[(num_blocks * triton.cdiv(hidden, down["BLOCK_N"]), down["SPLIT_K"])](
        **_down_args(weights, addresses), a_ptr=inter, stride_ap=inter.stride(0), stride_ak=inter.stride(1),
        out_ptr=partial, stride_ot=partial.stride(0), stride_on=partial.stride(1), topk_weights_ptr=routing,
        sorted_ptr=sorted_pairs, block_expert_ptr=block_experts, num_pairs=num_pairs, num_blocks=num_blocks,
        w_table_ptr=addresses.down if by_address else block_experts, BY_ADDRESS=by_address,
        TOP_K=top_k, DOT_PRECISION=precision, BLOCK_M=block_m, **down,
    )
    return partial.view(num_tokens, -1, hidden).sum(dim=1).to(x.dtype)


def _decode(x, weights: ExpertWeights, ids, routing, top_k: int, config: dict,
            addresses: ExpertAddresses | None = None) -> torch.Tensor:
    """The decode path; with `addresses`, each expert's weights are read where its address says, in the
    per-expert layout of `weights` (whose first dimension is then unused)."""
    num_tokens, hidden = x.shape
    num_pairs, inter_size = ids.numel(), weights.intermediate_size
    gate_up, down = config["gate_up"], config["down"]
    by_address = addresses is not None
    gate_up_table = addresses.gate_up if by_address else ids  # an unused pointer without addresses
    down_table = addresses.down if by_address else ids
    pdl = pdl_launch_options(x.device)

    inter = torch.empty(num_pairs, inter_size, dtype=_compute_dtype(x, weights), device=x.device)
    _decode_gate_up_kernel[(num_pairs, triton.cdiv(inter_size, gate_up["BLOCK_N"]))](
        **_gate_up_args(x, weights, addresses), out_ptr=inter, stride_op=inter.stride(0), ids_ptr=ids,
        w_table_ptr=gate_up_table,
        TOP_K=top_k, BY_ADDRESS=by_address, **gate_up, **pdl,
    )
    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
    _decode_down_kernel[(num_tokens, triton.cdiv(hidden, down["BLOCK_N"]))](
        **_down_args(weights, addresses), a_ptr=inter, stride_ap=inter.stride(0), stride_ak=inter.stride(1),
        out_ptr=out, stride_ot=out.stride(0), stride_on=out.stride(1), ids_ptr=ids, topk_weights_ptr=routing,
        w_table_ptr=down_table, TOP_K=top_k, BY_ADDRESS=by_address, **down, **pdl,
    )
    return out


def fused_experts_at_triton(hidden_states: torch.Tensor, layout: ExpertWeights, addresses: ExpertAddresses,
                            topk_ids: torch.Tensor, topk_weights: torch.Tensor, path: KernelPath) -> torch.Tensor:
    """`fused_experts_triton` with each expert's weights wherever `addresses` says, on the given path:
    "decode" reads an expert's weights once per (token, expert) pair, "prefill" once per block of its
    pairs (once per forward below BLOCK_M tokens an expert)."""
    if layout.gate_up_bias is not None or layout.down_bias is not None:
        raise ValueError("experts by address take no biases")
    if layout.mx_scales is not None:
        raise ValueError("experts by address don't serve MXFP4 weights")
    if layout.scales is not None:
        check_block_scales(layout)
        if addresses.gate_up_scale is None or addresses.down_scale is None:
            raise ValueError("experts by address with block-scaled (FP8) weights need their scales' addresses")
    if not layout.has_gate and layout.activation.kind in CLAMPED_SWIGLUS:
        raise ValueError(f"the {layout.activation.kind} activation needs a gate")
    num_tokens, hidden = hidden_states.shape
    if num_tokens == 0:
        return hidden_states.new_empty((0, hidden))
    top_k = topk_ids.shape[1]
    config = get_config(path, addresses.num_experts, layout.intermediate_size, hidden, num_tokens, top_k,
                        layout.gate_up.dtype, hidden_states.device, layout.transposed)
    if layout.scales is not None:
        config = fit_scale_blocks(config, layout)
    run = _decode if path == "decode" else _prefill
    return run(hidden_states, layout, topk_ids.reshape(-1), topk_weights.reshape(-1), top_k, config, addresses)


# ---------------------------------------------------------------------------------------------
# Shared device helpers


@triton.jit
def _expert_base(w_ptr, table_ptr, expert, stride_we, BY_ADDRESS: tl.constexpr):
    """Where `expert`'s weights (or block scales) start: row `expert` of w_ptr, or (BY_ADDRESS) the byte
    address the table holds for it, with w_ptr's element type."""
    if BY_ADDRESS:
        base = tl.load(table_ptr + expert).to(w_ptr.dtype, bitcast=True)
    else:
        base = w_ptr + expert * stride_we
    return base


@triton.jit
def _dequantize(w, scale_base, k0, rows, row_mask, dtype: tl.constexpr,
                STRIDE_SN: tl.constexpr, STRIDE_SK: tl.constexpr, SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr):
    """A [BLOCK_K, rows] tile of stored weights (K from k0, inside one scale block) times each row's
    block scale, in float32, returned in `dtype`. `scale_base`: where the expert's scales start
    (`_expert_base` over the scales). Masked-off rows get scale 0 (their weights are masked to 0 too)."""
    scale_ptrs = scale_base + (k0 // SCALE_BK) * STRIDE_SK + (rows // SCALE_BN) * STRIDE_SN
    scale = tl.load(scale_ptrs, mask=row_mask, other=0.0)
    return (w.to(tl.float32) * scale[None, :]).to(dtype)


@triton.jit
def _mxfp4_tile(w_base, scale_base, k0, BLOCK_K: tl.constexpr, rows, mask, stride_wn, stride_wk, dtype: tl.constexpr,
                STRIDE_MXN: tl.constexpr, STRIDE_MXK: tl.constexpr):
    """A [BLOCK_K, rows] tile of MXFP4 weights for values k0 .. k0 + BLOCK_K of each row, in `dtype`.
    `w_base`/`scale_base`: where the expert's packed bytes/scales start. Value k sits in byte k // 2 (low
    nibble for even k); e2m1 nibble s|e e|m is (-1)^s * (e ? (1 + m/2) 2^(e-1) : m/2), built as float32
    bits; the e8m0 scale byte b is 2^(b - 127) (b = 0: the float32 subnormal 2^-127). Masked-off
    entries read 0."""
    ks = k0 + tl.arange(0, BLOCK_K)
    offsets = rows[None, :] * stride_wn + (ks // 2)[:, None] * stride_wk
    byte = tl.load(w_base + offsets, mask=mask, other=0).to(tl.int32)
    nibble = (byte >> ((ks % 2) * 4)[:, None]) & 0xF
    exponent = (nibble >> 1) & 3
    mantissa = nibble & 1
    bits = tl.where(exponent == 0, mantissa * (126 << 23), ((exponent + 126) << 23) | (mantissa << 22))
    bits = bits | ((nibble >> 3) << 31)
    scale = tl.load(scale_base + rows[None, :] * STRIDE_MXN + (ks // 32)[:, None] * STRIDE_MXK, mask=mask,
                    other=0).to(tl.int32)
    scale_bits = tl.where(scale == 0, 1 << 22, scale << 23)
    return (bits.to(tl.float32, bitcast=True) * scale_bits.to(tl.float32, bitcast=True)).to(dtype)


@triton.jit
def _activate(gate, up, alpha, limit, ACT: tl.constexpr, HAS_GATE: tl.constexpr):
    """float32 act(gate) * up, the clamped SwiGLUs (spec.CLAMPED_SWIGLUS), or act(up) without a gate."""
    if ACT == "swiglu_oai":
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        out = (up + 1) * gate * tl.sigmoid(alpha * gate)
    elif ACT == "swiglu_clamped":
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        out = gate * tl.sigmoid(gate) * up
    elif ACT == "swiglu_post_clamped":
        up = tl.minimum(tl.maximum(up, -limit), limit)
        out = tl.minimum(gate * tl.sigmoid(gate), limit) * up
    else:
        h = gate if HAS_GATE else up
        if ACT == "silu":
            h = h * tl.sigmoid(h)
        elif ACT == "gelu":
            h = 0.5 * h * (1 + tl.erf(h * 0.7071067811865476))
        elif ACT == "gelu_tanh":
            # 0.5 * (1 + tanh(y)) == sigmoid(2y), y = sqrt(2 / pi) * (h + 0.044715 h^3)
            h = h * tl.sigmoid(1.5957691216057308 * (h + 0.044715 * h * h * h))
        elif ACT == "relu2":
            h = tl.maximum(h, 0.0)
            h = h * h
        else:  # relu
            h = tl.maximum(h, 0.0)
        out = h * up if HAS_GATE else h
    return out


@triton.jit
def _gate_up_columns(pid_n, N, BLOCK_N: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Rows of the gate_up weight (along its N axis) that one BLOCK_N tile of the output needs.

    Interleaved: the 2 * BLOCK_N consecutive rows holding gate and up of those outputs.
    Otherwise: the BLOCK_N gate rows (or up rows without a gate); the up rows sit N further.
    """
    if INTERLEAVED:
        cols = pid_n * (2 * BLOCK_N) + tl.arange(0, 2 * BLOCK_N)
        mask = cols < 2 * N
    else:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = cols < N
    return cols, mask


@triton.jit
def _finish_gate_up(acc, acc_up, bias_ptrs, cols, col_mask, N, stride_bn, alpha, limit,
                    HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, INTERLEAVED: tl.constexpr,
                    ACT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Biases, gate/up split and activation: [rows, cols] accumulators -> [rows, BLOCK_N] float32."""
    if HAS_BIAS:
        acc += tl.load(bias_ptrs + cols * stride_bn, mask=col_mask, other=0.0).to(tl.float32)
        if HAS_GATE and not INTERLEAVED:
            acc_up += tl.load(bias_ptrs + (cols + N) * stride_bn, mask=col_mask, other=0.0).to(tl.float32)
    if INTERLEAVED:
        gate, up = tl.split(tl.reshape(acc, [acc.shape[0], BLOCK_N, 2]))
    elif HAS_GATE:
        gate, up = acc, acc_up
    else:
        gate, up = acc, acc
    return _activate(gate, up, alpha, limit, ACT, HAS_GATE)


@triton.jit
def _tile_ids(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program id -> (M block, N block), GROUP_M M blocks sweeping N together (L2 reuse)."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


# ---------------------------------------------------------------------------------------------
# Prefill: grouped GEMMs over expert-sorted blocks


@triton.jit(do_not_specialize=["num_pairs", "num_blocks"])  # one compile for all token counts
def _prefill_gate_up_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, sorted_ptr, block_expert_ptr, w_table_ptr,
    num_pairs, N, K, num_blocks,
    stride_xt, stride_xk, stride_we, stride_wn, stride_wk, stride_be, stride_bn, stride_op,
    alpha, limit,
    TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, INTERLEAVED: tl.constexpr,
    ACT: tl.constexpr, DOT_PRECISION: tl.constexpr, BY_ADDRESS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    scale_ptr=None, scale_table_ptr=None, BLOCK_SCALED: tl.constexpr = False, STRIDE_SE: tl.constexpr = 0,
    STRIDE_SN: tl.constexpr = 0, STRIDE_SK: tl.constexpr = 0, SCALE_BN: tl.constexpr = 1, SCALE_BK: tl.constexpr = 1,
    mx_scale_ptr=None, MXFP4: tl.constexpr = False, STRIDE_MXE: tl.constexpr = 0, STRIDE_MXN: tl.constexpr = 0,
    STRIDE_MXK: tl.constexpr = 0,
):
    """inter[pair, n-tile] = act(x[token] @ gate^T, x[token] @ up^T) for one block of an expert's pairs."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_blocks, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    tokens = (pairs // TOP_K).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    cols, col_mask = _gate_up_columns(pid_n, N, BLOCK_N, INTERLEAVED)

    x_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xk
    w_ptrs = _expert_base(w_ptr, w_table_ptr, expert, stride_we, BY_ADDRESS) + cols[None, :] * stride_wn \
        + offs_k[:, None] * stride_wk
    if BLOCK_SCALED:
        scale_base = _expert_base(scale_ptr, scale_table_ptr, expert, STRIDE_SE, BY_ADDRESS)
    if MXFP4:
        w_base = w_ptr + expert * stride_we
        mx_base = mx_scale_ptr + expert * STRIDE_MXE
    up_offset = N * stride_wn
    acc = tl.zeros([BLOCK_M, cols.shape[0]], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        if BLOCK_SCALED or MXFP4:  # the dots run in the activations' dtype, on dequantized tiles
            x = tl.load(x_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0).to(w_ptr.dtype.element_ty)
        w_mask = k_mask[:, None] & col_mask[None, :]
        if MXFP4:
            w = _mxfp4_tile(w_base, mx_base, k0, BLOCK_K, cols, w_mask, stride_wn, stride_wk, x.dtype,
                            STRIDE_MXN, STRIDE_MXK)
        else:
            w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        if BLOCK_SCALED:
            w = _dequantize(w, scale_base, k0, cols, col_mask, x.dtype, STRIDE_SN, STRIDE_SK, SCALE_BN, SCALE_BK)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        if HAS_GATE and not INTERLEAVED:
            if MXFP4:
                w_up = _mxfp4_tile(w_base, mx_base, k0, BLOCK_K, cols + N, w_mask, stride_wn, stride_wk, x.dtype,
                                   STRIDE_MXN, STRIDE_MXK)
            else:
                w_up = tl.load(w_ptrs + up_offset, mask=w_mask, other=0.0)
            if BLOCK_SCALED:
                w_up = _dequantize(w_up, scale_base, k0, cols + N, col_mask, x.dtype,
                                   STRIDE_SN, STRIDE_SK, SCALE_BN, SCALE_BK)
            acc_up = tl.dot(x, w_up, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    h = _finish_gate_up(acc, acc_up, bias_ptr + expert * stride_be, cols[None, :], col_mask[None, :], N, stride_bn,
                        alpha, limit, HAS_BIAS, HAS_GATE, INTERLEAVED, ACT, BLOCK_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ptrs = out_ptr + pairs.to(tl.int64)[:, None] * stride_op + offs_n[None, :]
    tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n < N)[None, :])


@triton.jit(do_not_specialize=["num_pairs", "num_blocks"])  # one compile for all token counts
def _prefill_down_kernel(
    a_ptr, w_ptr, bias_ptr, out_ptr, topk_weights_ptr, sorted_ptr, block_expert_ptr, w_table_ptr,
    num_pairs, N, K, num_blocks,
    stride_ap, stride_ak, stride_we, stride_wn, stride_wk, stride_be, stride_bn, stride_ot, stride_on,
    TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BY_ADDRESS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    scale_ptr=None, scale_table_ptr=None, BLOCK_SCALED: tl.constexpr = False, STRIDE_SE: tl.constexpr = 0,
    STRIDE_SN: tl.constexpr = 0, STRIDE_SK: tl.constexpr = 0, SCALE_BN: tl.constexpr = 1, SCALE_BK: tl.constexpr = 1,
    mx_scale_ptr=None, MXFP4: tl.constexpr = False, STRIDE_MXE: tl.constexpr = 0, STRIDE_MXN: tl.constexpr = 0,
    STRIDE_MXK: tl.constexpr = 0,
):
    """out[pair * SPLIT_K + split] = routing weight * (inter[pair] @ down^T + bias) over one K split of one block."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_blocks, tl.cdiv(N, BLOCK_N), GROUP_M)
    split = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = split * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    offs_k = k_start + tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + pairs.to(tl.int64)[:, None] * stride_ap + offs_k[None, :] * stride_ak
    w_ptrs = _expert_base(w_ptr, w_table_ptr, expert, stride_we, BY_ADDRESS) + offs_n[None, :] * stride_wn \
        + offs_k[:, None] * stride_wk
    if BLOCK_SCALED:
        scale_base = _expert_base(scale_ptr, scale_table_ptr, expert, STRIDE_SE, BY_ADDRESS)
    if MXFP4:
        w_base = w_ptr + expert * stride_we
        mx_base = mx_scale_ptr + expert * STRIDE_MXE
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_mask = offs_k < k_end - (k0 - k_start)
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        if MXFP4:  # this step's values are k0 + arange(BLOCK_K)
            w = _mxfp4_tile(w_base, mx_base, k0, BLOCK_K, offs_n, k_mask[:, None] & n_mask[None, :], stride_wn,
                            stride_wk, a.dtype, STRIDE_MXN, STRIDE_MXK)
        else:
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if BLOCK_SCALED:
            w = _dequantize(w, scale_base, k0, offs_n, n_mask, a.dtype, STRIDE_SN, STRIDE_SK, SCALE_BN, SCALE_BK)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        if split == 0:  # added once, by the first split
            bias = tl.load(bias_ptr + expert * stride_be + offs_n * stride_bn, mask=n_mask, other=0.0)
            acc += bias.to(tl.float32)[None, :]
    routing = tl.load(topk_weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
    rows = pairs.to(tl.int64) * SPLIT_K + split
    out_ptrs = out_ptr + rows[:, None] * stride_ot + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc * routing[:, None], mask=valid[:, None] & n_mask[None, :])


# ---------------------------------------------------------------------------------------------
# Decode: GEMV per pair, no sort. Weight tiles are [BLOCK_K, columns]: products accumulate in a
# float32 tile of that shape and are reduced over K once, after the loop. The compiler lays each
# tile out along whichever axis has stride 1 (K in the default layout, N when transposed: Triton
# specialises stride-1 arguments), so the loads are wide and coalesced in both layouts.


@triton.jit
def _decode_gate_up_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, ids_ptr, w_table_ptr,
    N, K,
    stride_xt, stride_xk, stride_we, stride_wn, stride_wk, stride_be, stride_bn, stride_op,
    alpha, limit,
    TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, INTERLEAVED: tl.constexpr,
    ACT: tl.constexpr, BY_ADDRESS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr = False,
    scale_ptr=None, scale_table_ptr=None, BLOCK_SCALED: tl.constexpr = False, STRIDE_SE: tl.constexpr = 0,
    STRIDE_SN: tl.constexpr = 0, STRIDE_SK: tl.constexpr = 0, SCALE_BN: tl.constexpr = 1, SCALE_BK: tl.constexpr = 1,
    mx_scale_ptr=None, MXFP4: tl.constexpr = False, STRIDE_MXE: tl.constexpr = 0, STRIDE_MXN: tl.constexpr = 0,
    STRIDE_MXK: tl.constexpr = 0,
):
    """inter[pair, n-tile] = act(gate . x[token], up . x[token]) for one (token, expert) pair."""
    prologue(USE_PDL)
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    if expert < 0:  # "no expert": the down kernel skips this pair's row
        return
    token = pair // TOP_K
    offs_k = tl.arange(0, BLOCK_K)
    cols, col_mask = _gate_up_columns(pid_n, N, BLOCK_N, INTERLEAVED)

    x_ptrs = x_ptr + token * stride_xt + offs_k * stride_xk
    w_ptrs = _expert_base(w_ptr, w_table_ptr, expert, stride_we, BY_ADDRESS) + cols[None, :] * stride_wn \
        + offs_k[:, None] * stride_wk
    if BLOCK_SCALED:
        scale_base = _expert_base(scale_ptr, scale_table_ptr, expert, STRIDE_SE, BY_ADDRESS)
    up_offset = N * stride_wn
    acc = tl.zeros([BLOCK_K, cols.shape[0]], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        x = tl.load(x_ptrs, mask=k_mask, other=0.0).to(tl.float32)[:, None]
        w_mask = k_mask[:, None] & col_mask[None, :]
        if MXFP4:
            acc += _mxfp4_tile(w_ptr + expert * stride_we, mx_scale_ptr + expert * STRIDE_MXE, k0, BLOCK_K, cols,
                               w_mask, stride_wn, stride_wk, tl.float32, STRIDE_MXN, STRIDE_MXK) * x
            if HAS_GATE and not INTERLEAVED:
                acc_up += _mxfp4_tile(w_ptr + expert * stride_we, mx_scale_ptr + expert * STRIDE_MXE, k0, BLOCK_K,
                                      cols + N, w_mask, stride_wn, stride_wk, tl.float32, STRIDE_MXN, STRIDE_MXK) * x
        elif BLOCK_SCALED:
            w = _dequantize(tl.load(w_ptrs, mask=w_mask, other=0.0), scale_base, k0, cols, col_mask,
                            tl.float32, STRIDE_SN, STRIDE_SK, SCALE_BN, SCALE_BK)
            acc += w * x
            if HAS_GATE and not INTERLEAVED:
                w_up = _dequantize(tl.load(w_ptrs + up_offset, mask=w_mask, other=0.0), scale_base, k0,
                                   cols + N, col_mask, tl.float32, STRIDE_SN, STRIDE_SK, SCALE_BN, SCALE_BK)
                acc_up += w_up * x
        else:
            acc += tl.load(w_ptrs, mask=w_mask, other=0.0).to(tl.float32) * x
            if HAS_GATE and not INTERLEAVED:
                acc_up += tl.load(w_ptrs + up_offset, mask=w_mask, other=0.0).to(tl.float32) * x
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    h = _finish_gate_up(tl.sum(acc, axis=0)[None, :], tl.sum(acc_up, axis=0)[None, :], bias_ptr + expert * stride_be,
                        cols[None, :], col_mask[None, :], N, stride_bn, alpha, limit,
                        HAS_BIAS, HAS_GATE, INTERLEAVED, ACT, BLOCK_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ptrs = out_ptr + pair.to(tl.int64) * stride_op + offs_n[None, :]
    tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=(offs_n < N)[None, :])


@triton.jit
def _decode_down_kernel(
    a_ptr, w_ptr, bias_ptr, out_ptr, ids_ptr, topk_weights_ptr, w_table_ptr,
    N, K,
    stride_ap, stride_ak, stride_we, stride_wn, stride_wk, stride_be, stride_bn, stride_ot, stride_on,
    TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, BY_ADDRESS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr = False,
    scale_ptr=None, scale_table_ptr=None, BLOCK_SCALED: tl.constexpr = False, STRIDE_SE: tl.constexpr = 0,
    STRIDE_SN: tl.constexpr = 0, STRIDE_SK: tl.constexpr = 0, SCALE_BN: tl.constexpr = 1, SCALE_BK: tl.constexpr = 1,
    mx_scale_ptr=None, MXFP4: tl.constexpr = False, STRIDE_MXE: tl.constexpr = 0, STRIDE_MXN: tl.constexpr = 0,
    STRIDE_MXK: tl.constexpr = 0,
):
    """out[token, n-tile] = sum over the token's k pairs of routing weight * (down . inter[pair] + bias).

    The pairs are the inner, unrolled loop so that each K step has k weight tiles in flight; the
    routing weight scales the activations, so one accumulator serves all k pairs. A pair with
    expert -1 has its loads masked off (no weight bytes read; its unwritten row of `inter` and its
    weight are never used).
    """
    prologue(USE_PDL)
    token = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    first_pair = token * TOP_K
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        for j in tl.static_range(TOP_K):
            expert = tl.load(ids_ptr + first_pair + j).to(tl.int64)
            used = expert >= 0
            routing = tl.where(used, tl.load(topk_weights_ptr + first_pair + j).to(tl.float32), 0.0)
            k_mask = ks < tl.where(used, K, 0)  # all off for "no expert" (a scalar select, not a branch)
            a = tl.load(a_ptr + (first_pair + j).to(tl.int64) * stride_ap + ks * stride_ak, mask=k_mask, other=0.0)
            # expert -1 reads row 0's address, never dereferenced: its loads are masked off
            w_ptrs = _expert_base(w_ptr, w_table_ptr, tl.maximum(expert, 0), stride_we, BY_ADDRESS) \
                + offs_n[None, :] * stride_wn + ks[:, None] * stride_wk
            if MXFP4:  # "no expert" masks its bytes and scales off (k_mask)
                w = _mxfp4_tile(w_ptr + tl.maximum(expert, 0) * stride_we, mx_scale_ptr + tl.maximum(expert, 0)
                                * STRIDE_MXE, k0, BLOCK_K, offs_n, k_mask[:, None] & n_mask[None, :], stride_wn,
                                stride_wk, tl.float32, STRIDE_MXN, STRIDE_MXK)
            else:
                w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if BLOCK_SCALED:  # "no expert" masks its scales off too
                scale_mask = offs_n < tl.where(used, N, 0)
                scale_base = _expert_base(scale_ptr, scale_table_ptr, tl.maximum(expert, 0), STRIDE_SE, BY_ADDRESS)
                w = _dequantize(w, scale_base, k0, offs_n, scale_mask, tl.float32,
                                STRIDE_SN, STRIDE_SK, SCALE_BN, SCALE_BK)
            acc += w.to(tl.float32) * (a.to(tl.float32) * routing)[:, None]
    out = tl.sum(acc, axis=0)
    if HAS_BIAS:
        for j in tl.static_range(TOP_K):
            expert = tl.load(ids_ptr + first_pair + j).to(tl.int64)
            used = expert >= 0
            routing = tl.where(used, tl.load(topk_weights_ptr + first_pair + j).to(tl.float32), 0.0)
            bias_mask = offs_n < tl.where(used, N, 0)
            bias = tl.load(bias_ptr + expert * stride_be + offs_n * stride_bn, mask=bias_mask, other=0.0)
            out += routing * bias.to(tl.float32)
    tl.store(out_ptr + token * stride_ot + offs_n * stride_on, out.to(out_ptr.dtype.element_ty), mask=n_mask)
