"""NVIDIA pytorch-quantization's `utils` names (2.2.1 semantics)."""
from __future__ import annotations

import torch
from torch import Tensor


def reduce_amax(input: Tensor, axis: int | tuple[int, ...] | list[int] | None = None,  # noqa: A002 (NVIDIA's name)
                keepdims: bool = True) -> Tensor:
    """`max |input|` over the dims in `axis` (numpy style: the dims that are *reduced*),
    without gradient.

    Args:
        input: the tensor.
        axis: None (all dims, a 0-dim result), an int, or a tuple / list of ints.
        keepdims: keep the reduced dims with length 1. With a tuple / list axis the result
            is squeezed (every length-1 dim) when `keepdims` is False or it holds one value.

    Raises:
        ValueError: a tuple axis longer than `input.dim()`.

    Example:
        >>> reduce_amax(torch.tensor([[1.0, -3.0], [2.0, 0.5]]), axis=1).flatten().tolist()
        [3.0, 2.0]
    """
    with torch.no_grad():
        output = input.abs()
        if axis is None:
            return torch.max(output)
        if isinstance(axis, int):
            return torch.max(output, dim=axis, keepdim=keepdims)[0]
        if isinstance(axis, tuple) and len(axis) > input.dim():
            raise ValueError(f"Cannot reduce more axes than tensor's dim: axis={axis}, dim={input.dim()}")
        for dim in axis:
            output = torch.max(output, dim=dim, keepdim=True)[0]
        if not keepdims or output.numel() == 1:
            output.squeeze_()
        return output
