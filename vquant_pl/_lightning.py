"""Both Lightning namespaces: `lightning.pytorch` (`import lightning as L`) and `pytorch_lightning`.

A Trainer accepts only modules, data modules and callbacks of its own namespace (the two
are separate copies of the same code). vquant-pl's Lightning classes therefore derive from
the namespace-neutral bases below; building one (`vq.ImageClassifier(net)`) returns an
instance of a subclass that also derives from the chosen namespace's class
(`isinstance(obj, vq.ImageClassifier)` and `isinstance(obj, L.LightningModule)` both hold).

The namespace is, in this order: the environment variable `VQUANT_LIGHTNING`
(`lightning` or `pytorch_lightning`); the only one the process has imported; the one the
calling code imported (its module globals); `lightning.pytorch`. `variant(cls, namespace)`
picks one explicitly. Nothing here imports Lightning before a class is built.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

from torch import nn

LIGHTNING = "lightning.pytorch"
PYTORCH_LIGHTNING = "pytorch_lightning"
NAMESPACES = (LIGHTNING, PYTORCH_LIGHTNING)
_ALIASES = {"lightning": LIGHTNING, "lightning.pytorch": LIGHTNING, "L": LIGHTNING,
            "pytorch_lightning": PYTORCH_LIGHTNING, "pl": PYTORCH_LIGHTNING}
_INTERNAL = ("vquant_pl", "callbacks", "datamodules", "jsonargparse", "lightning", "pytorch_lightning",
             "lightning_fabric", "importlib", "torch", "copy", "pickle", "copyreg", "multiprocessing")


def canonical(namespace: str) -> str:
    """`"lightning"`, `"L"`, `"lightning.pytorch"` -> `"lightning.pytorch"`; `"pl"`,
    `"pytorch_lightning"` -> `"pytorch_lightning"`.

    Raises:
        ValueError: for any other name.
    """
    try:
        return _ALIASES[namespace]
    except KeyError:
        raise ValueError(f"unknown Lightning namespace {namespace!r}; expected 'lightning' "
                         "(lightning.pytorch) or 'pytorch_lightning'") from None


def _namespaces_in(values) -> set[str]:
    found = set()
    for value in values:
        name = value.__name__ if isinstance(value, type(sys)) else getattr(value, "__module__", None)
        if not isinstance(name, str):
            continue
        if name == "lightning" or name == LIGHTNING or name.startswith("lightning.pytorch."):
            found.add(LIGHTNING)
        elif name == PYTORCH_LIGHTNING or name.startswith("pytorch_lightning."):
            found.add(PYTORCH_LIGHTNING)
    return found


def active_namespace() -> str:
    """The namespace a vquant-pl Lightning object built now will belong to (see module doc)."""
    env = os.environ.get("VQUANT_LIGHTNING")
    if env:
        return canonical(env)
    loaded = [ns for ns in NAMESPACES if ns in sys.modules]
    if len(loaded) == 1:
        return loaded[0]
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.split(".")[0] not in _INTERNAL:
            found = _namespaces_in(list(frame.f_globals.values()))
            if len(found) == 1:
                return found.pop()
        frame = frame.f_back
    if not loaded:
        return LIGHTNING if importlib.util.find_spec("lightning") is not None else PYTORCH_LIGHTNING
    return LIGHTNING


def module(namespace: str | None = None):
    """The imported namespace package (`lightning.pytorch` or `pytorch_lightning`)."""
    return importlib.import_module(canonical(namespace) if namespace else active_namespace())


_VARIANTS: dict[tuple[type, str], type] = {}


def variant(cls: type, namespace: str | None = None) -> type:
    """The subclass of `cls` (a vquant-pl Lightning class) that derives from the given
    namespace's Lightning base, e.g. `variant(vq.ImageClassifier, "pytorch_lightning")`.

    Example:
        >>> import vquant_pl as vq
        >>> issubclass(variant(vq.ImageClassifier, "lightning"), vq.ImageClassifier)
        True
    """
    cls = getattr(cls, "__vquant_base__", cls)
    namespace = canonical(namespace) if namespace else active_namespace()
    key = (cls, namespace)
    if key not in _VARIANTS:
        base = getattr(importlib.import_module(namespace), cls.__lightning_base__)
        _VARIANTS[key] = type(cls.__name__, (cls, base), {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
            "__vquant_base__": cls, "__lightning__": namespace})
    return _VARIANTS[key]


def _new_variant(cls: type, namespace: str):
    """Unpickling: an empty instance of `cls`'s variant for `namespace`."""
    target = variant(cls, namespace)
    return target.__new__(target)


class _Adaptive:
    """Mixin: building the class builds its variant for the active namespace."""

    __lightning_base__ = ""
    __lightning__: str | None = None  # set on variants

    def __new__(cls, *args: Any, **kwargs: Any):
        if cls.__dict__.get("__vquant_base__") is None:  # not a variant yet
            cls = variant(cls)
        return super(_Adaptive, cls).__new__(cls)

    def __reduce_ex__(self, protocol):
        # pickle (ddp_spawn) and deepcopy name the public class and the namespace
        rv = super().__reduce_ex__(protocol)
        base = type(self).__dict__.get("__vquant_base__")
        if base is None or not isinstance(rv, tuple) or len(rv) < 2:
            return rv
        return (_new_variant, (base, type(self).__lightning__), *rv[2:])

    @property
    def lightning_namespace(self) -> str:
        """`"lightning.pytorch"` or `"pytorch_lightning"`: whose Trainer this object fits."""
        return type(self).__lightning__


def _load_from_checkpoint(cls, checkpoint_path, *args: Any, **kwargs: Any):
    """Lightning's `load_from_checkpoint`, on the class itself or, for the public class (a
    namespace-neutral base, which has none), on its variant for the active namespace: an
    instance of `variant(cls)`, as building the class gives.

    Example:
        >>> import vquant_pl as vq
        >>> callable(vq.ImageClassifier.load_from_checkpoint)
        True
    """
    target = cls if cls.__dict__.get("__vquant_base__") is not None else variant(cls)
    base = getattr(module(target.__lightning__), target.__lightning_base__)  # L.LightningModule, ...
    return vars(base)["load_from_checkpoint"].__get__(None, target)(checkpoint_path, *args, **kwargs)


class LightningModule(_Adaptive, nn.Module):
    """Namespace-neutral base of vquant-pl's LightningModules."""

    __lightning_base__ = "LightningModule"
    load_from_checkpoint = classmethod(_load_from_checkpoint)


class LightningDataModule(_Adaptive):
    """Namespace-neutral base of vquant-pl's LightningDataModules."""

    __lightning_base__ = "LightningDataModule"
    load_from_checkpoint = classmethod(_load_from_checkpoint)


class Callback(_Adaptive):
    """Namespace-neutral base of vquant-pl's callbacks."""

    __lightning_base__ = "Callback"


def _rank_zero(kind: str, *args: Any, **kwargs: Any) -> None:
    for namespace in NAMESPACES:
        if namespace in sys.modules:
            getattr(importlib.import_module(f"{namespace}.utilities"), kind)(*args, **kwargs)
            return
    from lightning_utilities.core import rank_zero

    getattr(rank_zero, kind)(*args, **kwargs)


def rank_zero_info(*args: Any, **kwargs: Any) -> None:
    """Lightning's `rank_zero_info` of the namespace in use (the console of rank 0)."""
    _rank_zero("rank_zero_info", *args, **kwargs)


def rank_zero_warn(*args: Any, **kwargs: Any) -> None:
    """Lightning's `rank_zero_warn` of the namespace in use (a warning on rank 0)."""
    _rank_zero("rank_zero_warn", *args, **kwargs)
