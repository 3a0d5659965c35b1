"""Load one rank's share of a checkpoint: only the tensors it keeps under expert or tensor parallel,
read from the safetensors files straight to its device.

`load_for_rank(path, parallel="ep")`, in every process torchrun starts:

1. joins torchrun's process group if none is up (NCCL for a GPU, gloo for the CPU), with a timeout,
   so that a rank that dies makes the others raise instead of waiting forever;
2. builds the model from its config with parameters on the meta device (no memory), buffers real;
3. asks `shards.shard_layout` (the rule `accelerate()` shards a whole model by) which part of each
   parameter this rank keeps, and maps each parameter to the checkpoint tensors it is made of: the
   same key, or, where Transformers converts on load (one tensor per expert stacked into one
   `gate_up_proj`), the converter's stack and concatenation, taken symbolically;
4. reads each parameter's part with `safe_open(...).get_slice(...)`: a rank reads only its experts'
   tensors, only its rows or columns of the others, and every replicated tensor whole, each piece
   copied into the parameter's final tensor on the device.

A fine-grained FP8 checkpoint (a `quantization_config` with quant_method "fp8", as Transformers'
FineGrainedFP8 quantizer saves one: float8_e4m3fn weights, float32 `*_scale_inv` block scales) is
built as Transformers builds it (its quantizer puts FP8Experts and FP8Linear modules in the skeleton,
and adds the converters that stack the scales as the weights), and read the same way: each block
scale is one more tensor whose part `shard_layout` gives, so a rank reads only its experts' scales,
or only the scale blocks of its columns. The weights keep their stored dtypes; `dtype` applies to
the rest.

A rank therefore holds its share plus the piece being copied. The files are memory-mapped: pages a
read touches count as the process's memory until the mapping closes, so the files are closed (and
reopened on the next read) whenever the pages they mapped pass a window (1/32 of the share, 4 to
256 MiB). Every step that can fail on one rank only (a missing file, a bad tensor) ends in an
exchange of each rank's outcome, so all ranks raise `ShardLoadError` together, naming the problem,
and none is left waiting in a collective.

The model returned is marked as this rank's share: `accelerate(model, parallel=...)` installs the
hooks without slicing again, and refuses another plan or another rank count.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from .distributed import collective_failed, rank_device
from .shards import ShardLayout, TensorSlice, mark_loaded_shard, shard_layout

logger = logging.getLogger("hf_moe_accel")

LOADING_KINDS = ("ep", "tp", "dp")
DEFAULT_TIMEOUT = timedelta(minutes=10)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Pages of a memory-mapped file that reads touched stay in the process's resident memory until the
# mapping closes, and a touch maps the whole page-cache folio around it (up to a huge page), so the
# files are closed whenever what they mapped passes a window: 1/32 of the rank's share, within these
# bounds (each reopen parses the file's header again: a larger window, fewer reopens).
_WINDOW_MIN_BYTES = 4 * 2**20
_WINDOW_MAX_BYTES = 256 * 2**20
_LARGE_FOLIO_BYTES = 2 * 2**20
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

T = TypeVar("T")


class ShardLoadError(ValueError):
    """Loading failed on at least one rank. Raised on every rank alike, naming each rank's problem."""


@dataclass(frozen=True)
class LoadReport:
    """What one `load_for_rank` call read."""

    rank: int
    world: int
    parallel: str
    bytes_read: int  # bytes copied out of the checkpoint's files, in their stored dtype
    checkpoint_bytes: int  # size of the checkpoint's files (headers included)
    tensors: int  # parameters and buffers filled
    file_opens: int
    mapped_window: int  # bytes of mapped file pages after which the files are closed
    seconds: float


_REPORTS: weakref.WeakKeyDictionary[nn.Module, LoadReport] = weakref.WeakKeyDictionary()


def load_report(model: nn.Module) -> LoadReport | None:
    """What `load_for_rank` read for `model`, or None for a model it didn't load."""
    return _REPORTS.get(model)


# ---- the process group -----------------------------------------------------------------------


def join_process_group(device: torch.device | None = None, timeout: timedelta | float = DEFAULT_TIMEOUT) -> tuple[int, int]:
    """(rank, world size). Under torchrun (its WORLD_SIZE, RANK, MASTER_ADDR... set) with no process
    group up, joins one: NCCL for a GPU, gloo for the CPU, with `timeout` for every collective, after
    which a rank waiting on one that died raises. A group already up is used as it is."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    device = torch.device(device) if device is not None else rank_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def _agreed(step: str, rank: int, world: int, what: str, work: Callable[[], T]) -> T:
    """Run `work` on every rank; if it raised on any rank, raise ShardLoadError on every rank."""
    problem: Exception | None = None
    result = None
    try:
        result = work()
    except Exception as error:  # every rank must learn of it, or the others would wait in the next collective
        problem = error
    messages = [None if problem is None else f"{type(problem).__name__}: {problem}"]
    if world > 1:
        gathered: list[str | None] = [None] * world
        try:
            dist.all_gather_object(gathered, messages[0])
        except RuntimeError as error:
            raise collective_failed(f"{what} ({step})", error) from (problem or error)
        messages = gathered
    failed: dict[str, list[int]] = {}
    for index, message in enumerate(messages):
        if message is not None:
            failed.setdefault(message, []).append(rank if world == 1 else index)
    if failed:
        lines = "; ".join(f"{_ranks(ranks, world)}: {message}" for message, ranks in failed.items())
        raise ShardLoadError(f"{what} failed while {step}. {lines}") from problem
    return result


def _ranks(ranks: list[int], world: int) -> str:
    if world == 1:
        return "this process"
    if len(ranks) == world:
        return f"every rank (0-{world - 1})"
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


# ---- the checkpoint's files ------------------------------------------------------------------


@dataclass(frozen=True)
class _Stored:
    """One tensor in a checkpoint file."""

    file: Path
    key: str
    shape: tuple[int, ...]


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder; FileNotFoundError naming any that is missing."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        names = sorted(set(weight_map.values()))
        missing = [name for name in names if not (path / name).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more: {', '.join(missing[1:4])})" if len(missing) > 1 else ""
            raise FileNotFoundError(f"shard file {path / missing[0]} is missing{more}; {INDEX_FILE} names it")
        if not names:
            raise FileNotFoundError(f"{index} names no shard files")
        return [path / name for name in names]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise FileNotFoundError(f"{path} holds no safetensors checkpoint ({SINGLE_FILE} or {INDEX_FILE})")


def _stored_tensors(files: list[Path]) -> dict[str, _Stored]:
    stored: dict[str, _Stored] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                stored[key] = _Stored(file, key, tuple(handle.get_slice(key).get_shape()))
    return stored


# ---- how a parameter is made of stored tensors ------------------------------------------------


@dataclass(frozen=True)
class _Leaf:
    stored: _Stored

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stored.shape


@dataclass(frozen=True)
class _Stack:
    """torch.stack(children, dim): Transformers' MergeModulelist (one tensor per expert)."""

    dim: int
    children: tuple

    @property
    def shape(self) -> tuple[int, ...]:
        inner = self.children[0].shape
        return (*inner[: self.dim], len(self.children), *inner[self.dim :])


@dataclass(frozen=True)
class _Cat:
    """torch.cat(children, dim): Transformers' Concatenate (gate and up into gate_up)."""

    dim: int
    children: tuple

    @property
    def shape(self) -> tuple[int, ...]:
        first = self.children[0].shape
        return (*first[: self.dim], sum(c.shape[self.dim] for c in self.children), *first[self.dim + 1 :])


def _transformers_conversions(model: nn.Module):
    """(renamings, converters, rename function, sort key) of Transformers' load-time conversions for
    this model (with its quantizer's, for a quantized checkpoint), or None where this Transformers has none."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )
    except ImportError:
        return None
    mapping = get_model_conversion_mapping(model, hf_quantizer=getattr(model, "hf_quantizer", None))
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    return renamings, converters, rename_source_key, dot_natural_key


def _assemble(target: str, converter, collected: dict[str, list]) -> object:
    """The node a converter builds `target` from, for the converters that only stack and concatenate."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    state: dict[str, object] = {p: collected[p] for p in converter.source_patterns if p in collected}
    for op in converter.operations:
        if isinstance(op, MergeModulelist):
            state = {p: _Stack(op.dim, tuple(v)) if isinstance(v, list) else v for p, v in state.items()}
        elif isinstance(op, Concatenate):
            parts: list = []
            for value in state.values():
                parts.extend(value if isinstance(value, list) else [value])
            state = {target: _Cat(op.dim, tuple(parts))}
        else:
            raise NotImplementedError(
                f"the checkpoint stores {target} through a {type(op).__name__} conversion, which load_for_rank doesn't "
                "read by parts; load the model with from_pretrained and let accelerate() shard it"
            )
    (node,) = state.values()
    if isinstance(node, list):
        (node,) = node
    return node


def _sources(model: nn.Module, stored: dict[str, _Stored]) -> tuple[dict[str, object], list[str]]:
    """Each model tensor name -> the node it is read from; and the checkpoint keys the model has no
    place for."""
    meta_state = model.state_dict()
    sources: dict[str, object] = {}
    unused: list[str] = []
    conversions = _transformers_conversions(model)
    if conversions is None:  # keys as stored
        sources = {key: _Leaf(item) for key, item in stored.items() if key in meta_state}
        return sources, [key for key in stored if key not in meta_state]
    renamings, converters, rename, sort_key = conversions
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    groups: dict[str, tuple[object, dict[str, list]]] = {}
    prefix = getattr(model, "base_model_prefix", None)
    for key in sorted(stored, key=sort_key):  # experts in index order, as Transformers stacks them
        target, pattern = rename(key, renamings, converters, prefix, meta_state)
        if target not in meta_state and key in meta_state:
            target, pattern = key, None
        if target not in meta_state:
            unused.append(key)
        elif pattern is None:
            sources[target] = _Leaf(stored[key])
        else:
            converter = by_pattern[pattern]
            groups.setdefault(target, (converter, {}))[1].setdefault(pattern, []).append(_Leaf(stored[key]))
    for target, (converter, collected) in groups.items():
        sources[target] = _assemble(target, converter, collected)
    return sources, unused


# ---- reading ---------------------------------------------------------------------------------


class _MappedPages:
    """The process's resident file-backed memory (Linux's /proc/self/statm), which is where the pages
    of a memory-mapped file go as reads touch them; None where it can't be read."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self._fd = None

    def bytes(self) -> int | None:
        if self._fd is None:
            return None
        try:
            return int(os.pread(self._fd, 256, 0).split()[2]) * _PAGE_BYTES
        except (OSError, IndexError, ValueError):
            return None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class _Reader:
    """Open safetensors files, all closed (unmapped) whenever the file pages mapped in since they were
    opened pass `window` bytes."""

    window: int
    handles: dict[Path, object] = field(default_factory=dict)
    pages: _MappedPages = field(default_factory=_MappedPages)
    mapped_at_open: int = 0
    estimate: int = 0  # where statm can't be read: bytes of rows read, plus a large folio at each end
    bytes_read: int = 0
    opens: int = 0

    def copy_into(self, out: torch.Tensor, node, box: tuple[tuple[int, int], ...]) -> None:
        """out[...] = node[box], reading only the stored tensors (and parts) the box covers."""
        if isinstance(node, _Leaf):
            self._copy_leaf(out, node.stored, box)
        elif isinstance(node, _Stack):
            inner = box[: node.dim] + box[node.dim + 1 :]
            start, end = box[node.dim]
            for index in range(start, end):
                self.copy_into(out.select(node.dim, index - start), node.children[index], inner)
        elif isinstance(node, _Cat):
            start, end = box[node.dim]
            offset = 0
            for child in node.children:
                size = child.shape[node.dim]
                low, high = max(start, offset), min(end, offset + size)
                if low < high:
                    child_box = box[: node.dim] + ((low - offset, high - offset),) + box[node.dim + 1 :]
                    self.copy_into(out.narrow(node.dim, low - start, high - low), child, child_box)
                offset += size
        else:
            raise TypeError(f"unknown source node {node!r}")

    def _copy_leaf(self, out: torch.Tensor, item: _Stored, box: tuple[tuple[int, int], ...]) -> None:
        handle = self.handles.get(item.file)
        if handle is None:
            if not self.handles:
                self.mapped_at_open = self.pages.bytes() or 0
            handle = self.handles[item.file] = safe_open(item.file, framework="pt")
            self.opens += 1
        piece = handle.get_slice(item.key)[tuple(slice(a, b) for a, b in box)] if box else handle.get_tensor(item.key)
        out.copy_(piece)
        self.bytes_read += piece.numel() * piece.element_size()
        row_bytes = math.prod(item.shape[1:]) * piece.element_size()
        self.estimate += ((box[0][1] - box[0][0]) if box else 1) * row_bytes + 2 * _LARGE_FOLIO_BYTES
        del piece
        mapped = self.pages.bytes()
        if (mapped - self.mapped_at_open if mapped is not None else self.estimate) >= self.window:
            self.close()

    def close(self) -> None:
        self.handles.clear()  # each file's mapping goes with its last reference
        self.estimate = 0

    def finish(self) -> None:
        self.close()
        self.pages.close()


def _read_part(reader: _Reader, node, part: TensorSlice | None, shape: tuple[int, ...], out: torch.Tensor) -> None:
    if tuple(node.shape) != tuple(shape):
        raise ValueError(f"the checkpoint holds shape {tuple(node.shape)} where the model has {tuple(shape)}")
    whole = tuple((0, size) for size in shape)
    if part is None:
        reader.copy_into(out, node, whole)
    elif part.zeros:
        out.zero_()
    else:
        offset = 0
        for start, end in part.ranges:
            box = whole[: part.axis] + ((start, end),) + whole[part.axis + 1 :]
            reader.copy_into(out.narrow(part.axis, offset, end - start), node, box)
            offset += end - start


# ---- load_for_rank ---------------------------------------------------------------------------


@dataclass
class _Plan:
    model: nn.Module
    layout: ShardLayout | None
    reads: list[tuple[str, object]]  # (tensor name, source node), in the model's order
    tied: dict[str, str]  # tied name -> the name it shares a tensor with
    checkpoint_bytes: int


def _resolve_dtype(config, dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        raise ValueError(f"dtype={dtype!r}; give a torch.dtype, or None / 'auto' for the checkpoint's")
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def _fp8_quantizer(path: Path, config):
    """Transformers' quantizer for `path`'s pre-quantized checkpoint: fine-grained FP8 only, kept in FP8.
    NotImplementedError, naming the checkpoint, for any other quantization."""
    from transformers.quantizers.auto import AutoHfQuantizer

    settings = config.quantization_config
    method = settings.get("quant_method") if isinstance(settings, dict) else getattr(settings, "quant_method", None)
    if str(getattr(method, "value", method)) != "fp8":
        raise NotImplementedError(
            f"{path} is quantized with {method!r}; load_for_rank reads fine-grained FP8 checkpoints (quant_method 'fp8') "
            "and plain ones: load it with from_pretrained"
        )
    quantizer = AutoHfQuantizer.from_config(settings, pre_quantized=True)
    if quantizer.quantization_config.dequantize:
        raise NotImplementedError(f"{path}'s quantization_config asks to dequantize on load, which load_for_rank doesn't "
                                  "do: load it with from_pretrained")
    # Not validate_environment: without a GPU it switches to dequantizing, and the fused kernels (or
    # their plain-torch reference on the CPU) read the FP8 experts as stored.
    return quantizer


def _meta_model(path: Path, dtype) -> nn.Module:
    """The model of `path`'s config with every parameter on the meta device (buffers real); for an FP8
    checkpoint, with Transformers' FP8 modules in place and its quantizer as `model.hf_quantizer`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(path)
    quantizer = _fp8_quantizer(path, config) if getattr(config, "quantization_config", None) else None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=_resolve_dtype(config, dtype))
        if quantizer is not None:
            quantizer.preprocess_model(model=model, dtype=_resolve_dtype(config, dtype), device_map=None)
            model.hf_quantizer = quantizer
    model.tie_weights()  # tied names share one (meta) parameter, so the model's sizes count it once
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: keep the one derived from the config
        pass
    return model.eval()


def _tied_names(model: nn.Module) -> dict[str, str]:
    """Tied parameter name -> the name whose tensor it shares (Transformers' expanded tie map)."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    return dict(expand(all_submodels=True)) if expand is not None else {}


def _plan(path: Path, parallel: str, dtype, rank: int, world: int) -> _Plan:
    files = checkpoint_files(path)
    model = _meta_model(path, dtype)
    layout = shard_layout(model, parallel, rank, world) if parallel != "dp" and world > 1 else None
    stored = _stored_tensors(files)
    sources, unused = _sources(model, stored)
    if unused:
        logger.info("hf_moe_accel: load_for_rank skips %d checkpoint tensors the model has no place for (%s, ...)",
                    len(unused), unused[0])
    tied = {}
    for name, other in _tied_names(model).items():
        if name in sources and other not in sources:  # the checkpoint holds the tie's other name
            name, other = other, name
        if other in sources:
            tied[name] = other
    buffers = {name for name, _ in model.named_buffers()}
    wanted = [name for name in model.state_dict() if name not in tied]
    missing = [name for name in wanted if name not in sources and name not in buffers]
    if missing:
        raise ValueError(f"the checkpoint holds no tensor for {len(missing)} of the model's parameters: {', '.join(missing[:4])}")
    reads = [(name, sources[name]) for name in wanted if name in sources]
    return _Plan(model, layout, reads, tied, sum(file.stat().st_size for file in files))


def _targets(plan: _Plan):
    """(name, module, attribute, current tensor, this rank's part or None) of each tensor to read."""
    for name, node in plan.reads:
        module_name, _, attr = name.rpartition(".")
        module = plan.model.get_submodule(module_name)
        current = module._parameters.get(attr)
        if current is None:
            current = module._buffers[attr]
        part = plan.layout.slices.get(name) if plan.layout is not None else None
        yield name, node, module, attr, current, part


def _share_bytes(plan: _Plan) -> int:
    """Bytes of the tensors this rank will hold, in their loaded dtypes."""
    total = 0
    for _, _, _, _, current, part in _targets(plan):
        shape = part.local_shape(tuple(current.shape)) if part else tuple(current.shape)
        total += math.prod(shape) * current.element_size()
    return total


def _fill(plan: _Plan, device: torch.device) -> _Reader:
    """Read every planned tensor's part into a new tensor on `device`, in place of the meta one."""
    model = plan.model
    reader = _Reader(window=min(max(_share_bytes(plan) // 32, _WINDOW_MIN_BYTES), _WINDOW_MAX_BYTES))
    try:
        for name, node, module, attr, current, part in _targets(plan):
            is_parameter = attr in module._parameters
            shape = tuple(current.shape)
            out = torch.empty(part.local_shape(shape) if part else shape, dtype=current.dtype, device=device)
            try:
                _read_part(reader, node, part, shape, out)
            except Exception as error:
                raise ValueError(f"reading {name}: {type(error).__name__}: {error}") from error
            if is_parameter:
                module._parameters[attr] = nn.Parameter(out, requires_grad=current.requires_grad)
            else:
                module._buffers[attr] = out
    finally:
        reader.finish()
    for name, other in plan.tied.items():
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, model.get_parameter(other))
    for buffer_name, buffer in list(model.named_buffers()):  # buffers not in the checkpoint, as constructed
        if buffer.device != device:
            module_name, _, attr = buffer_name.rpartition(".")
            model.get_submodule(module_name)._buffers[attr] = buffer.to(device)
    return reader


def load_for_rank(
    path: str | os.PathLike,
    parallel: str = "ep",
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    timeout: timedelta | float = DEFAULT_TIMEOUT,
) -> nn.Module:
    """Load the Transformers causal LM at `path` (a folder of safetensors files) with only the tensors
    this rank keeps under `parallel`, straight to `device`; then `accelerate(model, parallel=...)`.

    parallel: "ep" (this rank's experts of every MoE layer, the rest whole), "tp" (this rank's heads
        and expert inner columns, the rest whole), or "dp" (the whole model: one replica per rank).
        Without torchrun (one process) every plan loads the whole model.
    dtype: the parameters' dtype (default: the checkpoint config's); an FP8 checkpoint's float8 weights
        and float32 block scales keep theirs.
    device: where the tensors go (default: cuda:LOCAL_RANK, or the CPU without CUDA).
    timeout: for a process group this call starts (torchrun's variables set, none up yet): a rank
        left waiting this long on another (one that died) raises instead of hanging.

    Peak host memory: the tensors this rank keeps (none of them on the host when `device` is a GPU),
    plus one tensor being read, plus a small constant: the model's skeleton, the file headers, and
    mapped file pages up to 1/32 of the share, 4 to 256 MiB (`load_report(model).mapped_window`).
    Raises ShardLoadError on every rank when any rank fails (a missing shard file, a model the plan
    can't split, a checkpoint that doesn't match its config).
    """
    if parallel not in LOADING_KINDS:
        raise ValueError(f"parallel={parallel!r}; load_for_rank loads for {', '.join(map(repr, LOADING_KINDS))}")
    started = time.perf_counter()
    path = Path(path)
    device = torch.device(device) if device is not None else rank_device()
    rank, world = join_process_group(device, timeout)
    what = f"load_for_rank({str(path)!r}, parallel={parallel!r}) on rank {rank} of {world}"
    plan = _agreed("reading the config and file headers", rank, world, what, lambda: _plan(path, parallel, dtype, rank, world))
    reader = _agreed("reading tensors", rank, world, what, lambda: _fill(plan, device))
    model = plan.model
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.postprocess_model(model)  # as from_pretrained leaves a quantized model
    if plan.layout is not None:
        mark_loaded_shard(model, plan.layout)
    report = LoadReport(rank, world, parallel, reader.bytes_read, plan.checkpoint_bytes, len(plan.reads), reader.opens,
                        reader.window, time.perf_counter() - started)
    _REPORTS[model] = report
    logger.info("hf_moe_accel: rank %d of %d read %.1f MiB of the checkpoint's %.1f MiB for parallel=%r in %.1f s",
                rank, world, report.bytes_read / 2**20, report.checkpoint_bytes / 2**20, parallel, report.seconds)
    return model
