import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from hyperalign.common import shared_data_dir  # noqa: E402  (after the offline setting)

SHARED_DATA = shared_data_dir()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The reference data folder (../shared/data); tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA} (set HYPERALIGN_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """One torch intra-op thread for the test (restored after): the test machine is shared,
    and the tiny diffusion models run much faster on one thread under contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**overrides):
    from reward import HyperAlignConfig

    return HyperAlignConfig(backbone="hyperalign-tiny", pretrained=None, **overrides)


@pytest.fixture(scope="session")
def tiny_model():
    """A tiny random HyperAlign (eval mode, CPU). Do not mutate."""
    from reward import HyperAlign

    torch.manual_seed(0)
    return HyperAlign(tiny_config()).eval()
