"""Sort the (token, expert) pairs by expert, each expert's segment padded to a multiple of BLOCK_M.

The prefill GEMMs then read BLOCK_M rows at a time that all belong to one expert. Pair p is
token p // top_k's choice p % top_k (the flattened `topk_ids`); pairs with expert id -1 ("no
expert") are left out, so no block is computed for them. Outputs, with sizes that depend only on
(pairs, experts, BLOCK_M) so the step can be captured in a CUDA graph:

    sorted_pair_ids [max_blocks * BLOCK_M] int32: pair ids grouped by expert (stable order within
        an expert), each segment padded with the sentinel `num_pairs`; sentinel past the end too.
    block_expert_ids [max_blocks] int32: the expert of each BLOCK_M block, -1 past the padded total.

The Triton version runs in three launches: per-chunk expert counts, one program that scans them
into each (chunk, expert)'s first output slot, and a scatter. Deterministic: no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Work per program is bounded by keeping [rows, experts] one-hot tiles at about this many elements.
_TILE_ELEMENTS = 8192
# The single scan program holds a [chunks, experts] tile of about this many elements.
_SCAN_ELEMENTS = 16384


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on sum_e cdiv(count_e, BLOCK_M): at most min(pairs, E) experts are non-empty."""
    return (num_pairs + min(num_pairs, num_experts) * (block_m - 1)) // block_m


def align_reference(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch (host-syncing) version of `align_pairs`, the oracle for the tests."""
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    n_blocks = max_blocks(num_pairs, num_experts, block_m)
    counts = torch.bincount(flat + 1, minlength=num_experts + 1)[1:]  # the -1 ("no expert") pairs dropped
    blocks = (counts + block_m - 1) // block_m
    starts = (torch.cumsum(blocks, 0) - blocks) * block_m
    order = torch.argsort(flat, stable=True)
    order = order[flat[order] >= 0]
    rank = torch.arange(order.numel(), device=flat.device) - (torch.cumsum(counts, 0) - counts)[flat[order]]
    sorted_pair_ids = torch.full((n_blocks * block_m,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_pair_ids[starts[flat[order]] + rank] = order.int()
    block_expert_ids = torch.full((n_blocks,), -1, dtype=torch.int32, device=flat.device)
    used = torch.repeat_interleave(torch.arange(num_experts, device=flat.device), blocks)
    block_expert_ids[: used.numel()] = used.int()
    return sorted_pair_ids, block_expert_ids


def align_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_pair_ids, block_expert_ids) for `topk_ids` [T, k] (int32 or int64); see the module doc."""
    flat = topk_ids.reshape(-1)
    num_pairs = flat.numel()
    n_blocks = max_blocks(num_pairs, num_experts, block_m)
    device = flat.device
    sorted_pair_ids = torch.empty(n_blocks * block_m, dtype=torch.int32, device=device)
    block_expert_ids = torch.empty(n_blocks, dtype=torch.int32, device=device)
    if num_pairs == 0:
        return sorted_pair_ids, block_expert_ids

    e_pad = triton.next_power_of_2(num_experts)
    sub = max(16, _TILE_ELEMENTS // e_pad)  # rows per one-hot tile
    max_chunks = max(1, _SCAN_ELEMENTS // e_pad)
    chunk = max(sub, triton.next_power_of_2(triton.cdiv(num_pairs, max_chunks)))
    num_chunks = triton.cdiv(num_pairs, chunk)
    chunk_base = torch.empty(num_chunks, e_pad, dtype=torch.int32, device=device)
    fill_per_chunk = triton.cdiv(n_blocks * block_m, num_chunks)

    _count_kernel[(num_chunks,)](
        flat, chunk_base, sorted_pair_ids, num_pairs, n_blocks * block_m, fill_per_chunk,
        CHUNK=chunk, SUB=sub, E_PAD=e_pad, FILL_BLOCK=1024,
    )
    _scan_kernel[(1,)](
        chunk_base, block_expert_ids, num_chunks, num_experts, n_blocks,
        BLOCK_M=block_m, CHUNKS_PAD=triton.next_power_of_2(num_chunks), E_PAD=e_pad,
        BLOCK_B=max(16, _TILE_ELEMENTS // e_pad), num_warps=8,
    )
    _scatter_kernel[(num_chunks,)](flat, chunk_base, sorted_pair_ids, num_pairs, CHUNK=chunk, SUB=sub, E_PAD=e_pad)
    return sorted_pair_ids, block_expert_ids


@triton.jit(do_not_specialize=["num_pairs", "sorted_len", "fill_per_chunk"])
def _count_kernel(
    ids_ptr, counts_ptr, sorted_ptr, num_pairs, sorted_len, fill_per_chunk,
    CHUNK: tl.constexpr, SUB: tl.constexpr, E_PAD: tl.constexpr, FILL_BLOCK: tl.constexpr,
):
    """counts[c, e] = pairs of chunk c routed to e (-1 ids match no lane); also fills this chunk's
    share of the sentinels."""
    c = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for start in range(c * CHUNK, c * CHUNK + CHUNK, SUB):
        offs = start + tl.arange(0, SUB)
        ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + c * E_PAD + experts, counts)

    fill_end = tl.minimum(c * fill_per_chunk + fill_per_chunk, sorted_len)
    for start in range(c * fill_per_chunk, fill_end, FILL_BLOCK):
        offs = start + tl.arange(0, FILL_BLOCK)
        tl.store(sorted_ptr + offs, tl.full([FILL_BLOCK], 0, tl.int32) + num_pairs, mask=offs < fill_end)


@triton.jit(do_not_specialize=["num_chunks", "n_blocks"])
def _scan_kernel(
    base_ptr, block_expert_ptr, num_chunks, num_experts, n_blocks,
    BLOCK_M: tl.constexpr, CHUNKS_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Per-chunk counts -> each (chunk, expert)'s first slot in sorted_pair_ids, and block experts."""
    chunks = tl.arange(0, CHUNKS_PAD)
    experts = tl.arange(0, E_PAD)
    ptrs = base_ptr + chunks[:, None] * E_PAD + experts[None, :]
    mask = chunks[:, None] < num_chunks
    counts = tl.load(ptrs, mask=mask, other=0)
    before = tl.cumsum(counts, axis=0) - counts  # same-expert pairs in earlier chunks
    totals = tl.sum(counts, axis=0)
    blocks = (totals + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(blocks, axis=0)
    expert_start = (block_end - blocks) * BLOCK_M
    tl.store(ptrs, expert_start[None, :] + before, mask=mask)

    # Block b belongs to the expert whose block range holds it: the number of experts ending at
    # or before b (empty experts end where the previous one does, so they are skipped).
    for b0 in range(0, n_blocks, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        expert = tl.sum((block_end[None, :] <= b[:, None]).to(tl.int32), axis=1)
        expert = tl.where(expert < num_experts, expert, -1)
        tl.store(block_expert_ptr + b, expert, mask=b < n_blocks)


@triton.jit(do_not_specialize=["num_pairs"])
def _scatter_kernel(ids_ptr, base_ptr, sorted_ptr, num_pairs, CHUNK: tl.constexpr, SUB: tl.constexpr, E_PAD: tl.constexpr):
    """sorted_pair_ids[base[c, e] + rank of the pair among chunk c's pairs of e] = pair id."""
    c = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    seen = tl.zeros([E_PAD], dtype=tl.int32)  # pairs of each expert already placed by this chunk
    for start in range(c * CHUNK, c * CHUNK + CHUNK, SUB):
        offs = start + tl.arange(0, SUB)
        ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
        valid = ids >= 0  # past the end, or "no expert": not placed
        one_hot = (ids[:, None] == experts[None, :]).to(tl.int32)
        rank = tl.sum(one_hot * (tl.cumsum(one_hot, axis=0) - 1 + seen[None, :]), axis=1)
        seen += tl.sum(one_hot, axis=0)
        base = tl.load(base_ptr + c * E_PAD + ids, mask=valid, other=0)
        tl.store(sorted_ptr + base + rank, offs.to(tl.int32), mask=valid)
