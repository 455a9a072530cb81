import pytest
import torch

from helpers import GOLDEN


@pytest.fixture(scope="session")
def golden():
    if not GOLDEN.is_file():
        pytest.skip(f"golden file {GOLDEN} not found (set VQUANT_SHARED to the shared folder)")
    return torch.load(GOLDEN)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
