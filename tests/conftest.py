import gc
import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; the variable must
# be set before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ../shared/fixtures beside the checkout (CI); HF_MOE_ACCEL_FIXTURES names another folder (the GPU machine).
FIXTURES = Path(os.environ.get("HF_MOE_ACCEL_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
FIXTURE_NAMES = ("tiny-qwen3-moe", "tiny-mixtral")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run with `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(params=FIXTURE_NAMES)
def fixture_path(request) -> Path:
    path = FIXTURES / request.param
    if not path.is_dir():
        pytest.skip(f"trained fixture {request.param} not found at {path} (expects ../shared/fixtures beside the checkout)")
    return path


@pytest.fixture(autouse=True)
def _free_cuda_memory():
    """Transformers' models hold reference cycles: a dropped model's GPU memory comes back only when
    the cycle collector runs. Collect after each test so that GPU tests at real shapes don't pile up."""
    yield
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
