"""Quantization state kept on the modules themselves, as `torch.nn.utils.prune` does.

A quantized layer carries three things, all plain picklable objects (no closures), so a
`copy.deepcopy`, a `torch.save`/`torch.load` or a DDP broadcast of the model carries them
and stays restorable; `state_dict` keys do not change:

- ``module._vquant_originals``: ``{name: float original}`` of every parameter or buffer the
  run changed (weights, and whatever a pre-quantization transform touched);
- ``module._vquant_layer``: a `LayerState` (its report row and the run it belongs to);
- an `InputQuantizer` among ``module._forward_pre_hooks``.

A tensor shared by several modules -- one Parameter object, or two Parameters viewing the
same storage (a tied checkpoint loaded with ``assign=True``) -- is saved (and restored)
once: within one run, `save_original` remembers which storage views it already saved.

A tensor in shared memory (``model.share_memory()``, ddp_spawn on CPU, Hogwild; every CUDA
tensor counts, as `Tensor.is_shared` says) is never written: `save_original` keeps that very
storage as the original and moves the tensor to a private copy, which the run then changes;
restoring (or undoing a failed run) gives the storage back, so `data_ptr()` and
`is_shared()` are as before.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .config import QuantConfig
from .input_quantizer import InputQuantizer
from .report import LayerReport

ORIGINALS = "_vquant_originals"
LAYER = "_vquant_layer"

#: `save(module, name)`: called by a transform before it changes `module.<name>`.
SaveFn = Callable[[nn.Module, str], object]

_RUN_SAVED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("vquant_run_saved", default=None)


@dataclass
class RunInfo:
    """What one `quantize_model` call did, shared by its layers' states."""

    config: QuantConfig
    backend: str
    probe: dict | None = None  # {"seed": ..., "shape": [...]} or {"tensor": shape} for a given probe
    weight_time_s: float = 0.0
    probe_time_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    bit_budget: dict | None = None  # mixed_precision: the averages reached (QuantReport.bit_budget)


@dataclass
class LayerState:
    """The quantization state of one layer: its report row and its run."""

    row: LayerReport
    run: RunInfo


def storage_key(tensor: Tensor) -> tuple:
    """What identifies the memory a tensor views: equal for two Parameters over one storage."""
    return (*storage_of(tensor), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))


def storage_of(tensor: Tensor) -> tuple:
    """(device, data pointer) of the storage a tensor views: equal for any two views of it."""
    return tensor.device, tensor.untyped_storage().data_ptr()


def byte_range(tensor: Tensor) -> tuple[int, int]:
    """`[first, end)` bytes of its storage that a tensor views."""
    start = tensor.storage_offset()
    end = start + 1 + sum((n - 1) * abs(st) for n, st in zip(tensor.shape, tensor.stride())) if tensor.numel() else start
    return start * tensor.element_size(), end * tensor.element_size()


def in_shared_memory(tensor: Tensor) -> bool:
    """A CPU tensor in shared memory (`share_memory()`, ddp_spawn); CUDA tensors always say
    `is_shared()`, and their storage is the module's own."""
    return tensor.device.type == "cpu" and tensor.is_shared()


@dataclass
class _Run:
    saved: dict = field(default_factory=dict)  # storage key -> the tensor saved
    changed: list = field(default_factory=list)  # (module, name) saved by this run, in order
    kept: dict = field(default_factory=dict)  # (id, name) -> (module, name, value at the run's start) of a
    # tensor saved before the run (a user's own transform): `undo_run` puts that value back


@contextlib.contextmanager
def run_scope() -> Iterator[None]:
    """Within one quantization run, a tensor shared by several modules is saved once, and
    `undo_run` can put back exactly what the run changed."""
    token = _RUN_SAVED.set(_Run())
    try:
        yield
    finally:
        _RUN_SAVED.reset(token)


def save_original(module: nn.Module, name: str) -> bool:
    """Keep the current value of `module.<name>` (a parameter or buffer) so that
    `restore_model` can put it back exactly. Call it before changing the tensor.

    A tensor in shared memory is not copied: its storage is kept as the original and the
    tensor moves to a private copy (so nothing writes the shared storage); within a run,
    another tensor over that same storage view is moved to the same private copy.

    Returns False (and keeps no new copy) when that value is already saved, on this module
    or, within the current run, through another module sharing the same tensor.

    Example:
        >>> conv = nn.Conv2d(1, 1, 1)
        >>> save_original(conv, "weight")
        True
    """
    tensor = getattr(module, name)
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{type(module).__name__}.{name} is not a tensor")
    if tensor.is_meta:
        raise ValueError(f"{type(module).__name__}.{name} is on the meta device: it holds no values to save")
    run = _RUN_SAVED.get()
    if name in module.__dict__.get(ORIGINALS, {}):
        if run is not None and (module, name) not in run.changed and (id(module), name) not in run.kept:
            run.kept[(id(module), name)] = (module, name, tensor.detach().clone())  # saved before this run
            run.saved.setdefault(storage_key(tensor), tensor)
        return False
    if run is not None:
        key = storage_key(tensor)
        first = run.saved.get(key)
        if first is not None:
            if storage_of(first) != storage_of(tensor):
                _keep(module, name, tensor.detach())  # `first` moved to a private copy: this tensor follows it
                tensor.data = first.data
                run.changed.append((module, name))
            return False
        run.saved[key] = tensor
        run.changed.append((module, name))
    with torch.no_grad():
        if in_shared_memory(tensor):
            _keep(module, name, tensor.detach())  # the shared storage itself, never written
            tensor.data = tensor.detach().clone()
            if run is not None:  # the same Parameter reached through another module is saved already
                run.saved[storage_key(tensor)] = tensor
        else:
            _keep(module, name, tensor.detach().clone())
    return True


def _keep(module: nn.Module, name: str, value: Tensor) -> None:
    module.__dict__.setdefault(ORIGINALS, {})[name] = value


def _put_back(module: nn.Module, name: str, value: Tensor) -> None:
    """Restore `module.<name>` from its original: an original in shared memory is the storage
    the tensor had (`save_original`), given back while the tensor still has its device and
    dtype; any other (or a tensor moved or cast since) is copied in, following the move."""
    tensor = getattr(module, name)
    if in_shared_memory(value) and (value.device, value.dtype, value.shape) == (tensor.device, tensor.dtype, tensor.shape):
        tensor.data = value
    else:
        with torch.no_grad():
            tensor.copy_(value)


def originals(module: nn.Module) -> dict[str, Tensor]:
    """The saved float originals of `module`'s tensors, by attribute name (a copy of the mapping)."""
    return dict(module.__dict__.get(ORIGINALS, {}))


def attach_state(layer: nn.Module, state: LayerState) -> None:
    """Mark `layer` quantized by a run, with its report row."""
    layer.__dict__[LAYER] = state


def layer_state(module: nn.Module) -> LayerState | None:
    return module.__dict__.get(LAYER)


def iter_states(model: nn.Module) -> Iterator[tuple[str, nn.Module, LayerState]]:
    """(name, layer, state) of every quantized layer, in `model.modules()` order."""
    for name, module in model.named_modules():
        state = module.__dict__.get(LAYER)
        if state is not None:
            yield name, module, state


def has_state(model: nn.Module) -> bool:
    """A run's layer state, or an original saved by `save_original` (a user's transform)."""
    return any(LAYER in m.__dict__ or ORIGINALS in m.__dict__ for m in model.modules())


def input_quantizer(module: nn.Module):
    """The module's `InputQuantizer` pre-hook, or None."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, InputQuantizer):
            return hook
    return None


def _remove_input_quantizers(module: nn.Module) -> None:
    for key, hook in list(module._forward_pre_hooks.items()):
        if isinstance(hook, InputQuantizer):
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
            getattr(module, "_forward_pre_hooks_always_called", {}).pop(key, None)


@torch.no_grad()
def undo_run(model: nn.Module) -> None:
    """After a failed run: put back what this run saved (not what a user's own transform
    saved before it), and remove the run's input quantizers and layer states."""
    run = _RUN_SAVED.get()
    for module, name in reversed(run.changed if run is not None else []):
        _put_back(module, name, module.__dict__[ORIGINALS].pop(name))
        if not module.__dict__[ORIGINALS]:
            del module.__dict__[ORIGINALS]
    for module, name, value in (run.kept.values() if run is not None else []):
        getattr(module, name).copy_(value)  # as it was when the run began (the user's transform kept)
    for module in model.modules():
        module.__dict__.pop(LAYER, None)
        _remove_input_quantizers(module)


@torch.no_grad()
def restore_all(model: nn.Module) -> int:
    """Put back every saved original, remove input quantizers and layer states; return how
    many modules held state."""
    count = 0
    for module in model.modules():
        originals = module.__dict__.pop(ORIGINALS, None)
        held = module.__dict__.pop(LAYER, None) is not None or originals is not None
        for name, value in (originals or {}).items():
            _put_back(module, name, value)
        _remove_input_quantizers(module)
        count += held
    return count


def copy_model(model: nn.Module) -> nn.Module:
    """`copy.deepcopy` (a quantized model's copy is quantized), also of a pruned layer after a
    forward with gradients: its `weight` (recomputed by the pruning pre-hook) then has
    autograd history, which deepcopy refuses."""
    memo = {id(v): v.detach().clone() for m in model.modules() for v in vars(m).values()
            if isinstance(v, Tensor) and v.grad_fn is not None}
    return copy.deepcopy(model, memo)
