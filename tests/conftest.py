"""Test-session setup.

* Without a GPU, Paiton's Triton kernels run in Triton's interpreter: TRITON_INTERPRET=1 must
  be set before any kernel module is imported (triton.jit decides at decoration time), so it
  is set here, first, and every kernel module is imported here too: a module first imported
  inside a test that sets TRITON_INTERPRET=0 (paiton_testing.use_reference_kernels, for the
  processes a test starts) would otherwise keep GPU-only kernels for the rest of its worker.
  Then the paiton::* ops run the real kernels on CPU tensors, and every CPU test that goes
  through them tests the kernels too.
* Tests marked `gpu` are skipped without CUDA/ROCm.
* Hypothesis: no deadline (compiles take seconds), few examples by default; set
  HYPOTHESIS_PROFILE=thorough for a longer run.
"""

import os
import sys

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

# Test helpers live beside the tests (tests/ is not a package; see ENV_NOTES on import modes).
sys.path.insert(0, os.path.dirname(__file__))

from paiton_testing import kernel_modules  # noqa: E402

kernel_modules()

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=12,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA/ROCm GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch: no compiled code, recompile counts or fusion records
    carried over from another test."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
