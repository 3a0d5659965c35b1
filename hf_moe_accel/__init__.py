"""hf-moe-accel: fast Mixture-of-Experts inference for Hugging Face Transformers, in one line.

    from hf_moe_accel import accelerate
    model = accelerate(model)
"""

from .api import accelerate, is_accelerated, patch_report, unpatch
from .patches.registry import UnsupportedMoEError, supported_families

__version__ = "0.1.0"

__all__ = ["UnsupportedMoEError", "__version__", "accelerate", "is_accelerated", "patch_report", "supported_families", "unpatch"]
