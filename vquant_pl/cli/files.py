"""Reading a user's tensor files (`.pt`) without running code from them."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..models import UnsafeFile


def load_tensors(path: str | Path, what: str = "file"):
    """`torch.load(path, weights_only=True)` onto the CPU: tensors and plain containers only,
    so no code from the file runs (also under `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`).

    Args:
        path: the file.
        what: what the file is, for the messages (e.g. `--images`).

    Raises:
        FileNotFoundError: no such file.
        UnsafeFile: the file holds other objects, which only a full unpickling could load.

    Example:
        >>> data = load_tensors("runs/recipes/lite0_imagenet-sample.pt", "--images")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeFile(f"{what} {path} holds objects other than tensors and plain containers, which only a "
                         "full unpickling could load, and unpickling runs code from the file; save tensors "
                         f"(torch.save({{'images': x, 'labels': y}}, path)) (first error: "
                         f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})") from err
