"""Where the model runs: one GPU, several (pipeline, expert, tensor, data parallel) or CPU offload,
chosen by a performance predictor calibrated on the machine (or stated for another one)."""

from .budget import parse_memory_size
from .eviction import EvictionPolicy, LFUPolicy, LRUPolicy, RoutingStatsPolicy
from .hardware import Hardware, hardware_preset, resolve_hardware
from .miss_cost import MissCostModel
from .offload import OffloadOptions, offload_plan, offload_stats, reset_offload_stats, set_miss_policy
from .offload_stats import LayerOffloadStats, OffloadStats
from .plans import rank_plans
from .predictor import Plan, Prediction, Workload, predict
from .shapes import ModelShape, load_shape, shape_of_model

__all__ = [
    "EvictionPolicy",
    "Hardware",
    "LFUPolicy",
    "LRUPolicy",
    "LayerOffloadStats",
    "MissCostModel",
    "ModelShape",
    "OffloadOptions",
    "OffloadStats",
    "Plan",
    "Prediction",
    "RoutingStatsPolicy",
    "Workload",
    "hardware_preset",
    "load_shape",
    "offload_plan",
    "offload_stats",
    "parse_memory_size",
    "predict",
    "rank_plans",
    "reset_offload_stats",
    "resolve_hardware",
    "set_miss_policy",
    "shape_of_model",
]
