"""Shared test helpers: paths of the optional reference data in ../shared, small models."""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("VQUANT_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden" / "squant_golden.pt"
SAMPLE = SHARED / "data" / "imagenet-sample"
SYNSETS = SHARED / "data" / "imagenet_synsets.txt"
