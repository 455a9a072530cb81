import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VQUANT_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden" / "squant_golden.pt"
SAMPLE = SHARED / "data" / "imagenet-sample"
SYNSETS = SHARED / "data" / "imagenet_synsets.txt"


@pytest.fixture(scope="session")
def golden():
    if not GOLDEN.is_file():
        pytest.skip(f"golden file {GOLDEN} not found (set VQUANT_SHARED to the shared folder)")
    return torch.load(GOLDEN)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
