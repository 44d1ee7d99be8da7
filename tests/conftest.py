import os
import sys

import torch

# Let tests import the shared helpers module next to them.
sys.path.insert(0, os.path.dirname(__file__))

# The tests use tiny tensors: one intra-op thread is fastest and keeps runs deterministic.
torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the device-parametrised tests run on: ``GX_TEST_DEVICE`` (``cpu`` by default;
    ``cuda`` in scripts/accelerator_check.sh), so the same tests run in CI and on an accelerator."""
    name = os.environ.get("GX_TEST_DEVICE", "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"GX_TEST_DEVICE={name} but torch.cuda.is_available() is False (torch {torch.__version__})")
    return dev
