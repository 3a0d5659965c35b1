"""Run a plan briefly on this machine and time it, to put measured figures beside predicted ones.

One model is built (or loaded) once and moved between plans: `accelerate(...)` places it, the
timing runs, `unpatch` puts it back. One-process plans (single, pipeline, offload) run in a plain
process; expert/tensor/data parallel run under torchrun, every rank calling `measure` alike.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist

from ..api import accelerate, unpatch
from ..costmodel.memory import length_bucket
from ..costmodel.predictor import DISTRIBUTED_KINDS, PlacementPlan, Workload
from ..parallel.distributed import distributed_world
from .routing import uniform_routing
from .timing import time_generate

logger = logging.getLogger("hf_moe_accel")


def why_not_measurable(plan: PlacementPlan) -> str | None:
    """Why `plan` can't be measured in this process, or None when it can."""
    world = distributed_world()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if plan.kind in DISTRIBUTED_KINDS:
        if world is None or world[1] != plan.gpus:
            return f"run under torchrun --nproc-per-node {plan.gpus} to measure"
        return None if gpus else "needs GPUs"
    if world is not None:
        return "one-process plan: run without torchrun to measure"
    if gpus < plan.gpus:
        return f"needs {plan.gpus} GPU{'s' if plan.gpus > 1 else ''}, this machine has {gpus}"
    return None


class PlanMeasurer:
    """Holds one model (a preset with random weights, or a checkpoint) and times plans on it.

    `device` is the GPU of the one-GPU plans (default cuda:0); the CPU stands in for it in tests.
    `uniform_routing`: every plan decodes with the routing the predictor assumes (`bench.routing`),
    not the model's (a random-weight model routes nearly every decode step to the same experts).
    """

    def __init__(self, model_spec: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0, device: torch.device | None = None,
                 uniform_routing: bool = False):
        self.model_spec, self.dtype, self.seed = model_spec, dtype, seed
        self.uniform_routing = uniform_routing
        self.device = device or torch.device("cuda", 0)
        self.model = None

    def _model_on(self, device: torch.device, one_process: bool = False):
        if self.model is None:
            from ..costmodel.presets import PRESETS, build_preset

            if self.model_spec in PRESETS and device.type == "cpu" and one_process and torch.cuda.is_available():
                # Transformers' own init of a 30B model on the CPU takes many minutes; this draws the
                # numbers on the GPU and pins the experts as it goes (where the offload wants them;
                # not for the torchrun plans: every rank would pin a whole copy).
                from .offload import build_preset_on_host

                self.model = build_preset_on_host(self.model_spec, self.dtype, seed=self.seed)
            elif self.model_spec in PRESETS:  # every rank draws the same weights from the same seed
                self.model = build_preset(self.model_spec, device, self.dtype, seed=self.seed)
            elif Path(self.model_spec).is_dir():
                from transformers import AutoModelForCausalLM

                self.model = AutoModelForCausalLM.from_pretrained(self.model_spec, dtype=self.dtype, device_map=str(device)).eval()
            else:
                raise ValueError(f"--model {self.model_spec!r} is neither a preset nor a checkpoint folder")
        elif self.model.device != device:
            self.model.to(device)
        return self.model

    def measure(self, plan: PlacementPlan, workload: Workload, repeats: int = 1, gpu_memory_gib: float | None = None) -> dict:
        """Decode tokens/s, time to first token and peak memory of `plan` on `workload` (this rank's share for dp)."""
        if self.uniform_routing and plan.kind in ("ep", "tp"):  # their experts modules hold one rank's share
            raise ValueError(f"uniform routing is drawn over whole experts modules: not for {plan.kind} plans")
        if plan.kind == "single":
            model = accelerate(self._model_on(self.device), cuda_graphs=plan.cuda_graphs)
        elif plan.kind == "offload":
            from ..offload.engine import OffloadOptions

            # KV room for the static cache graph decode allocates (its length bucket), so zero-copy decode replays graphs
            options = OffloadOptions(
                kv_cache_tokens=workload.batch * length_bucket(workload.max_context),
                prefill_tokens=workload.batch * workload.prompt_len, device=self.device,
            )
            model = accelerate(self._model_on(torch.device("cpu"), one_process=True), gpu_memory=f"{gpu_memory_gib}GiB",
                               offload=options, cuda_graphs=plan.cuda_graphs)
        elif plan.kind == "pp":
            model = accelerate(self._model_on(torch.device("cpu"), one_process=True), devices=list(range(plan.gpus)),
                               parallel="pp", cuda_graphs=False)
        else:
            model = accelerate(self._model_on(torch.device("cpu")), parallel=plan.kind, cuda_graphs=plan.cuda_graphs)
        # Data parallel: every replica decodes the busiest replica's share of the batch.
        batch = math.ceil(workload.batch / plan.gpus) if plan.kind == "dp" else workload.batch
        try:
            ids = self._prompt(batch, workload.prompt_len, model.device)
            # Offload: sampled tokens (random weights' greedy text repeats one token: a perfect cache).
            sampling = {"sample_seed": self.seed} if plan.kind == "offload" else {}
            with uniform_routing(model, self.seed) if self.uniform_routing else contextlib.nullcontext():
                timing = time_generate(model, ids, workload.new_tokens, repeats, **sampling)
        finally:
            unpatch(model)
        result = timing.as_dict()
        if plan.kind == "dp":  # the replicas run side by side: the batch over the slowest replica's step
            step = torch.tensor([batch / timing.decode_tokens_per_s], device=model.device)
            dist.all_reduce(step, op=dist.ReduceOp.MAX)
            result["decode_tokens_per_s"] = workload.batch / step.item()
        return result

    def _prompt(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        vocab = self.model.config.get_text_config().vocab_size
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randint(1, vocab, (batch, length), generator=generator).to(device)
