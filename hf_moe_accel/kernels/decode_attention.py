"""One-token (decode) attention in one Triton launch, grouped query heads read against their KV head once.

`decode_attention(query, key, value, mask, scale)` computes what
``F.scaled_dot_product_attention(query, repeat_kv(key), repeat_kv(value), attn_mask=mask, scale=scale)``
computes for query [B, Hq, 1, D] and key/value [B, Hkv, K, D] (Hq a multiple of Hkv; query head h
uses KV head h // (Hq // Hkv), `repeat_kv`'s order). Key and value may be strided views (a slice of
a static cache). The mask is None or broadcastable to [B, 1, 1, K]: boolean (True = attend) or an
additive float mask (0 / -inf or a large negative number).

One program per (batch row, KV head) holds that KV head's `groups` query heads as the rows of one
tile, so each key and value byte is read once, and loops over K in BLOCK_K tiles with an online
softmax in float32 (q.k^T and p.v on the tensor cores, fp32 accumulation; p is cast to the value
dtype for p.v, as flash attention does). Keys the mask rules out (False, or -inf) are not loaded
(`skip_masked_keys=False`, a benchmark switch, loads them and zeroes their values).
With few (batch, KV head) pairs for the GPU's SMs (small batches) or long caches a flash-decoding
split is used (`launch_plan`): the K range is cut into `num_splits` pieces, each program writes its
partial (max, sum, unnormalised output) and a second small launch combines them. `use_dot=False` computes the scores
and p.v as float32 broadcast-and-sums instead of tensor-core dots padded to 16 rows (meant for 1-2
query heads a KV head; off by default: `_MAX_ROWS_WITHOUT_DOT`). No host syncs and no data-dependent shapes: the call can be captured in
a CUDA graph. `decode_attention_op` is the same call as a torch custom op (opaque to torch.compile).

Fully masked rows (every key False or -inf): the output is zeros (SDPA gives NaN there). A row
masked with a finite large negative number follows the same arithmetic as SDPA (a softmax over
the sums).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch_options, prologue

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256  # powers of two in between
# The launch plan (`launch_plan`): a program's latency is a few dependent memory round trips an
# iteration, so the keys are cut (flash decoding: `splits` pieces a (batch, KV head) pair, combined by a
# second launch) until each program holds one tile of at most _KEYS_PER_PROGRAM keys, and further, in
# power-of-two pieces down to _MIN_SPLIT_KEYS, while there are fewer programs than half the SMs; never more
# than _PROGRAMS_PER_SM x SMs programs or _MAX_SPLITS pieces. The constants are re-derived at batch 1 with
# `python scripts/bench_decode_attention.py --sweep --batch 1` (results: docs/BENCHMARKS.md).
_KEYS_PER_PROGRAM = 64
_MIN_SPLIT_KEYS = 16
_PROGRAMS_PER_SM = 2
_MAX_SPLITS = 64
# Up to this many query heads a KV head, float32 broadcast-and-sum instead of tensor-core dots padded to
# 16 rows. 0: dots always; raise it only where `python scripts/bench_decode_attention.py --sweep` shows the
# broadcast-and-sum path winning at that many heads.
_MAX_ROWS_WITHOUT_DOT = 0


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, m_ptr, l_ptr,
    kv_len, split_len, scale,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kk, stride_kd,
    stride_vb, stride_vh, stride_vk, stride_vd,
    stride_mb, stride_mk,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    GROUPS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    MASK_KIND: tl.constexpr,  # 0: none, 1: boolean (as uint8), 2: additive float
    SPLIT: tl.constexpr,  # write partials (out_ptr: float32 [B, Hq, splits, D]) instead of the output
    USE_DOT: tl.constexpr,  # tensor-core dots (rows padded to 16), else float32 broadcast-and-sum (few rows)
    INPUT_PRECISION: tl.constexpr,
    SKIP_MASKED_KEYS: tl.constexpr = True,  # keys the mask rules out not loaded (a later load: after the mask's)
    USE_PDL: tl.constexpr = False,
):
    prologue(USE_PDL)
    batch = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    rows = tl.arange(0, BLOCK_G)
    row_ok = rows < GROUPS
    heads = kv_head * GROUPS + rows
    dims = tl.arange(0, HEAD_DIM)

    q = tl.load(q_ptr + batch * stride_qb + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    if not USE_DOT:
        q = q.to(tl.float32)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    mask_base = mask_ptr + batch * stride_mb

    start = split * split_len
    end = tl.minimum(start + split_len, kv_len)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for block_start in range(start, end, BLOCK_K):
        cols = block_start + tl.arange(0, BLOCK_K)
        in_range = cols < end
        col_ok = in_range
        if MASK_KIND == 1:
            col_ok = col_ok & (tl.load(mask_base + cols * stride_mk, mask=in_range, other=0) != 0)
        elif MASK_KIND == 2:
            bias = tl.load(mask_base + cols * stride_mk, mask=in_range, other=float("-inf")).to(tl.float32)
            col_ok = col_ok & (bias != float("-inf"))
        load_ok = col_ok if SKIP_MASKED_KEYS else in_range
        if USE_DOT:
            k = tl.load(k_base + cols[None, :] * stride_kk + dims[:, None] * stride_kd, mask=load_ok[None, :],
                        other=0.0)  # transposed: [HEAD_DIM, BLOCK_K]
        else:
            k = tl.load(k_base + cols[:, None] * stride_kk + dims[None, :] * stride_kd, mask=load_ok[:, None],
                        other=0.0).to(tl.float32)
        # Values loaded with the keys, not after the softmax: one memory round trip an iteration, not two.
        v = tl.load(v_base + cols[:, None] * stride_vk + dims[None, :] * stride_vd, mask=load_ok[:, None], other=0.0)
        if not SKIP_MASKED_KEYS:
            v = tl.where(col_ok[:, None], v, 0.0)  # a masked key's p is 0, but 0 * NaN (unwritten cache) is not
        if USE_DOT:
            s = tl.dot(q, k, input_precision=INPUT_PRECISION) * scale  # [BLOCK_G, BLOCK_K]
        else:
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
        if MASK_KIND == 2:
            s = s + bias[None, :]
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: keep exp() away from -inf - -inf
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if USE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        else:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        m_i = m_new

    o_ptrs = out_ptr + batch * stride_ob + heads[:, None] * stride_oh + split * stride_os + dims[None, :] * stride_od
    if SPLIT:
        tl.store(o_ptrs, acc, mask=row_ok[:, None])
        l_off = batch * stride_lb + heads * stride_lh + split * stride_ls
        tl.store(m_ptr + l_off, m_i, mask=row_ok)
        tl.store(l_ptr + l_off, l_i, mask=row_ok)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # fully masked rows: acc is 0, the output zeros
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _combine_splits_kernel(
    part_ptr, m_ptr, l_ptr, out_ptr, num_splits,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh, stride_ls,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    prologue(USE_PDL)
    batch = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < num_splits
    dims = tl.arange(0, HEAD_DIM)
    l_off = batch * stride_lb + head * stride_lh + splits * stride_ls
    m = tl.load(m_ptr + l_off, mask=split_ok, other=float("-inf"))
    l = tl.load(l_ptr + l_off, mask=split_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.exp(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # 0 for splits that saw no key
    part = tl.load(part_ptr + batch * stride_pb + head * stride_ph + splits[:, None] * stride_ps + dims[None, :],
                   mask=split_ok[:, None], other=0.0)
    denom = tl.sum(w * l, axis=0)
    out = tl.sum(w[:, None] * part, axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + batch * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


def decode_attention_supported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               mask: torch.Tensor | None = None) -> bool:
    """Whether `decode_attention` takes these inputs (else the caller falls back to SDPA); devices not checked."""
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        return False
    batch, heads, q_len, dim = query.shape
    kv_batch, kv_heads, kv_len, key_dim = key.shape
    if (q_len != 1 or kv_batch != batch or key_dim != dim or tuple(value.shape) != tuple(key.shape)
            or kv_heads == 0 or heads % kv_heads):
        return False
    if not (query.dtype == key.dtype == value.dtype and query.dtype in SUPPORTED_DTYPES):
        return False
    if not (MIN_HEAD_DIM <= dim <= MAX_HEAD_DIM and dim & (dim - 1) == 0):
        return False
    if mask is not None:
        if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[0] not in (1, batch):
            return False
        if mask.shape[3] != kv_len or not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
            return False
    return True


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_plan(batch: int, kv_heads: int, kv_len: int, dim: int, sms: int | None,
                splits: int | None = None) -> tuple[int, int, int]:
    """(splits, block_k, num_stages) on a GPU of `sms` SMs (None: Triton's interpreter, one piece); see the
    constants above. `splits` given: the tile size and stages for that many pieces. The caller cuts the
    pieces to whole BLOCK_K tiles, so the splits here are an upper bound."""
    max_block = 64 if dim <= 128 else 32  # [BLOCK_K, D] tiles of keys and values in registers
    kv_len = max(kv_len, 1)
    if splits is None and sms is None:
        splits = 1
    elif splits is None:
        pairs = batch * kv_heads
        splits = triton.cdiv(kv_len, min(_KEYS_PER_PROGRAM, max_block))
        fill = triton.cdiv(sms // 2, pairs)  # pieces a pair for half the SMs' worth of programs
        if fill > 1:
            splits = max(splits, min(1 << (fill.bit_length() - 1), triton.cdiv(kv_len, _MIN_SPLIT_KEYS)))
        splits = max(1, min(splits, triton.cdiv(_PROGRAMS_PER_SM * sms, pairs), _MAX_SPLITS))
    block_k = min(max_block, max(16, triton.next_power_of_2(triton.cdiv(kv_len, splits))))
    num_stages = 1 if splits * block_k >= kv_len else 2  # one tile a program: nothing to pipeline
    return splits, block_k, num_stages


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None,
                     scale: float | None = None, *, num_splits: int | None = None, block_k: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None,
                     use_dot: bool | None = None, skip_masked_keys: bool = True) -> torch.Tensor:
    """SDPA of one-token queries [B, Hq, 1, D] over key/value [B, Hkv, K, D] with `repeat_kv`'s head
    grouping -> [B, Hq, 1, D] contiguous, in query's dtype. See the module docstring for the mask
    and for fully masked rows. The keyword-only arguments override the launch heuristics (benchmarks)."""
    if not decode_attention_supported(query, key, value, mask):  # an assert would vanish under python -O
        raise ValueError(
            f"decode_attention: unsupported inputs q{tuple(query.shape)} {query.dtype} k{tuple(key.shape)} {key.dtype} "
            f"v{tuple(value.shape)} {value.dtype} mask {None if mask is None else (tuple(mask.shape), mask.dtype)}; "
            "check decode_attention_supported() first and use F.scaled_dot_product_attention for the others")
    batch, heads, _, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scale = dim**-0.5 if scale is None else float(scale)
    out = torch.empty((batch, heads, 1, dim), dtype=query.dtype, device=query.device)
    if out.numel() == 0:
        return out

    if mask is None:
        mask_kind, mask_arg, stride_mb, stride_mk = 0, query, 0, 0  # mask_arg is never read
    else:
        mask = mask.expand(batch, 1, 1, kv_len)
        mask_kind = 1 if mask.dtype == torch.bool else 2
        mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        stride_mb, stride_mk = mask_arg.stride(0), mask_arg.stride(3)

    if use_dot is None:
        use_dot = groups > _MAX_ROWS_WITHOUT_DOT
    sms = None  # Triton's interpreter (tests): one piece unless the caller splits
    if query.is_cuda:
        sms = _sm_count(query.device.index if query.device.index is not None else torch.cuda.current_device())
    plan = launch_plan(batch, kv_heads, kv_len, dim, sms, num_splits)
    splits, block_k, num_stages = plan[0], block_k or plan[1], num_stages or plan[2]
    num_warps = num_warps or 4
    splits = max(1, min(splits, triton.cdiv(max(kv_len, 1), block_k)))
    # Whole BLOCK_K tiles a split, and no empty split.
    split_len = triton.cdiv(triton.cdiv(max(kv_len, 1), splits), block_k) * block_k
    splits = triton.cdiv(max(kv_len, 1), split_len)

    pdl = pdl_launch_options(query.device)
    if splits > 1:
        part = torch.empty((batch, heads, splits, dim), dtype=torch.float32, device=query.device)
        m = torch.empty((batch, heads, splits), dtype=torch.float32, device=query.device)
        l = torch.empty_like(m)
        target, stats = part, (m, l, m.stride(0), m.stride(1), m.stride(2))
    else:
        target, stats = out, (out, out, 0, 0, 0)  # never read or written
    _decode_attention_kernel[(batch, kv_heads, splits)](
        query, key, value, mask_arg, target, stats[0], stats[1],
        kv_len, split_len, scale,
        query.stride(0), query.stride(1), query.stride(3),
        key.stride(0), key.stride(1), key.stride(2), key.stride(3),
        value.stride(0), value.stride(1), value.stride(2), value.stride(3),
        stride_mb, stride_mk,
        target.stride(0), target.stride(1), target.stride(2), target.stride(3),
        stats[2], stats[3], stats[4],
        GROUPS=groups, BLOCK_G=triton.next_power_of_2(groups) if not use_dot else max(16, triton.next_power_of_2(groups)),
        HEAD_DIM=dim, BLOCK_K=block_k, MASK_KIND=mask_kind, SPLIT=splits > 1, USE_DOT=use_dot,
        SKIP_MASKED_KEYS=skip_masked_keys,
        INPUT_PRECISION="ieee" if query.dtype == torch.float32 else None,  # exact fp32 (no tf32)
        num_warps=num_warps, num_stages=num_stages, **pdl,
    )
    if splits > 1:
        _combine_splits_kernel[(batch, heads)](
            part, m, l, out, splits,
            part.stride(0), part.stride(1), part.stride(2),
            m.stride(0), m.stride(1), m.stride(2),
            out.stride(0), out.stride(1),
            HEAD_DIM=dim, BLOCK_S=triton.next_power_of_2(splits), num_warps=4, **pdl,
        )
    return out


@torch.library.custom_op("hf_moe_accel::decode_attention", mutates_args=())
def decode_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                        scale: float) -> torch.Tensor:
    """`decode_attention` as one opaque op (for code torch.compile traces; eager code calls it directly)."""
    return decode_attention(query, key, value, mask, scale)


@decode_attention_op.register_fake
def _decode_attention_fake(query, key, value, mask, scale) -> torch.Tensor:
    return torch.empty_like(query, memory_format=torch.contiguous_format)  # [B, Hq, 1, D], query's dtype
