"""hf-moe-accel: fast Mixture-of-Experts inference for Hugging Face Transformers, in one line.

    from hf_moe_accel import accelerate
    model = accelerate(model)
"""

from .api import accelerate, is_accelerated, patch_report, unpatch
from .offload.engine import OffloadOptions, offload_stats, reset_offload_stats
from .parallel.loading import ShardLoadError, load_for_rank
from .patches.registry import UnsupportedMoEError, supported_families

__version__ = "0.1.0"

__all__ = [
    "OffloadOptions", "ShardLoadError", "UnsupportedMoEError", "__version__", "accelerate", "is_accelerated", "load_for_rank",
    "offload_stats", "patch_report",
    "reset_offload_stats", "supported_families", "unpatch",
]
