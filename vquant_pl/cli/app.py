"""The `vquant` command: LightningCLI for `test`/`validate`/`predict`, plus `sweep`,
`selftest` and `build-kernels`.

    vquant test --config paper/resnet18_w4a4 --data.root /data/imagenet --trainer.devices 4
    vquant sweep quickstart/w8a8 quickstart/w4a4 [--out runs/sweep] [--data.root /data/imagenet]
    vquant selftest
    vquant build-kernels
    vquant analyze efficientnet_lite:lite0 --images FILE

`--config NAME` takes a file, or the name of a config shipped with the package
(`paper/resnet18_w4a4`, `quickstart/w8a8`, ...; `vquant_pl.cli.app.shipped_configs()` lists them).
The CLI writes only into the log dir (the logger's, or an explicit
`--trainer.default_root_dir`) and never overwrites a file: with `logger: false` and no root
dir it saves no config at all, and a config name already taken gets `config_1.yaml`, ...
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Optional

from .._lightning import active_namespace, variant
from .._lightning import module as lightning_module
from ..classifier import ImageClassifier

PACKAGE_CONFIGS = Path(__file__).parents[1] / "configs"  # installed wheel
REPO_CONFIGS = Path(__file__).parents[2] / "configs"  # source tree (the top-level configs/)

EVAL_COMMANDS = {
    "test": "Evaluate the model on the test data, quantized by the `quant` settings (top-1, top-5, loss).",
    "validate": "Evaluate on the validation data (quantized when quant.stages includes validate).",
    "predict": "Return the model's logits (quantized when quant.stages includes predict).",
}
EXTRA_COMMANDS = {
    "sweep": "Run configs one after another; results.md/.csv after every run, plots, per-run reports.",
    "selftest": "Check every SQuant backend present on the golden cases and time them.",
    "build-kernels": "Build the native SQuant kernels ahead of first use.",
    "analyze": "Per-layer sensitivity of a model to quantization (table, CSV, JSON, PNG).",
    "export": "Quantize a config's model and write it as ONNX QDQ: vquant export --config ... --out model.onnx.",
}
TOOLS = {"selftest": "vquant_pl.cli.selftest", "build-kernels": "vquant_pl.ops.kernels", "analyze": "vquant_pl.cli.analyze"}
#: Trainer arguments that only matter for training (`fit`), which `vquant` does not offer.
FIT_ONLY = {"max_epochs", "min_epochs", "max_steps", "min_steps", "max_time", "limit_train_batches",
            "overfit_batches", "val_check_interval", "check_val_every_n_epoch", "num_sanity_val_steps",
            "log_every_n_steps", "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm",
            "detect_anomaly", "reload_dataloaders_every_n_epochs", "enable_autolog_hparams", "model_registry",
            # nor training-only or low-level ones: they keep their defaults and out of `vquant test --help`
            "plugins", "barebones", "use_distributed_sampler", "sync_batchnorm", "profiler", "fast_dev_run"}
#: Lightning's console lines that `vquant` does not repeat: its product tips and the seed line of every run.
QUIET_MESSAGES = re.compile(r"^(\[rank: \d+\] )?(\W*Tip:|Seed set to )")


def configs_dir() -> Path:
    """The folder of the shipped configs (inside the package when installed from a wheel,
    the repository's `configs/` in a source checkout)."""
    return PACKAGE_CONFIGS if PACKAGE_CONFIGS.is_dir() else REPO_CONFIGS


def shipped_configs() -> list[str]:
    """Names of the shipped configs, e.g. `paper/resnet18_w4a4`."""
    root = configs_dir()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def resolve_config(name: str | os.PathLike) -> Path:
    """A config file: `name` itself when it exists, else the shipped config of that name
    (`paper/resnet18_w4a4`, with or without `.yaml`, also `configs/paper/...`).

    Raises:
        FileNotFoundError: neither exists; close shipped names are listed.
    """
    path = Path(name)
    if path.is_file():
        return path
    text = path.as_posix()
    for prefix in ("configs/", "vquant_pl/configs/"):
        text = text[len(prefix):] if text.startswith(prefix) else text
    text = text[:-5] if text.endswith(".yaml") else text[:-4] if text.endswith(".yml") else text
    shipped = configs_dir() / f"{text}.yaml"
    if shipped.is_file():
        return shipped
    close = difflib.get_close_matches(text, shipped_configs(), n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; shipped configs are in {configs_dir()}"
    raise FileNotFoundError(f"config {name} is neither a file nor a shipped config name{hint}")


def resolve_config_args(args: list[str]) -> list[str]:
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = str(resolve_config(out[i + 1]))
        elif arg.startswith("--config="):
            out[i] = "--config=" + str(resolve_config(arg.split("=", 1)[1]))
    return out


class SpecClassifier(ImageClassifier):
    """The classifier of the `vquant` CLI: the model comes from a `create_model` spec.

    Args:
        model: `pytorchcv:<name>`, `timm:<name>`, `torchvision:<name>`,
            `efficientnet_lite:lite0..lite4`, or the path of a whole saved model (needs `allow_pickle`).
        num_classes: number of classes of the logits.
        pretrained: load the pretrained weights (false: random initialization).
        checkpoint: a state_dict file (plain or a Lightning checkpoint's), loaded with weights_only=True.
        allow_pickle: allow unpickling a whole saved model given as `model`; unpickling runs code
            from the file, so only for files you trust.
    """

    def __init__(self, model: str, num_classes: int = 1000, pretrained: bool = True,
                 checkpoint: Optional[str] = None, allow_pickle: bool = False):
        super().__init__(model, num_classes=num_classes, pretrained=pretrained, checkpoint=checkpoint,
                         allow_pickle=allow_pickle)


def _fresh(path: Path) -> Path:
    """`path`, or `stem_1.suffix`, `stem_2.suffix`, ... : the first name not taken."""
    candidate, i = path, 0
    while candidate.exists():
        i += 1
        candidate = path.with_name(f"{path.stem}_{i}{path.suffix}")
    return candidate


def _parse_only(cli_class: type) -> type:
    """`cli_class` that builds its parser and stops there."""

    class ParseOnly(cli_class):
        def parse_arguments(self, parser, args) -> None:
            self.config = parser.get_defaults()

        def _set_seed(self) -> None:
            pass

        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

        def after_instantiate_classes(self) -> None:
            pass

    return ParseOnly


def _cli_classes(namespace: str):
    """The LightningCLI and SaveConfigCallback subclasses for a Lightning namespace."""
    cli = importlib.import_module(f"{namespace}.cli")

    class SafeSaveConfig(cli.SaveConfigCallback):
        """Saves the resolved config into the log dir, never over an existing file, and not at
        all when there is no log dir (no logger and no explicit `--trainer.default_root_dir`)."""

        saved_path: Path | None = None

        def setup(self, trainer, pl_module, stage: str) -> None:
            if self.already_saved:
                return
            implicit = trainer.logger is None and Path(trainer.default_root_dir).resolve() == Path.cwd().resolve()
            if not implicit:
                log_dir = trainer.log_dir  # broadcast by Lightning
                if trainer.is_global_zero and log_dir:
                    path = _fresh(Path(log_dir) / self.config_filename)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    self.parser.save(self.config, str(path), skip_none=False, overwrite=False,
                                     multifile=self.multifile)
                    self.saved_path = path
            self.already_saved = True

    class VQuantCLI(cli.LightningCLI):
        """LightningCLI with the quantization callback as the group `quant`, the model's
        preprocessing passed to the data module, and only the evaluation subcommands."""

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {name: {"model", "dataloaders", "datamodule"} for name in ("test", "validate", "predict")}

        def add_core_arguments_to_parser(self, parser) -> None:
            parser.add_class_arguments(self.trainer_class, "trainer", fail_untyped=False, instantiate=False,
                                       sub_configs=True, skip=FIT_ONLY)
            for action in parser._actions:  # one sentence each; the Trainer's documentation has the rest
                if action.dest.startswith("trainer.") and action.help:
                    action.help = _first_sentence(action.help)
            parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
            parser.add_lightning_class_args(self._model_class, "model")
            parser.add_lightning_class_args(self._datamodule_class, "data")

        def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
            parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
            parser.set_defaults({"weights_only": True})  # --ckpt_path loads no pickled code
            return parser

        def _add_subcommands(self, parser, **kwargs) -> None:
            self._subcommand_parsers = {}
            subcommands = parser.add_subcommands()
            for name, text in EVAL_COMMANDS.items():
                usage = f"vquant {name} [-h] [--config CONFIG] [--print_config] [--GROUP.OPTION VALUE ...]"
                self._subcommand_parsers[name] = self._prepare_subcommand_parser(self.trainer_class, name,
                                                                                 description=text, usage=usage)
                subcommands.add_subcommand(name, self._subcommand_parsers[name], help=text)
            for name, text in EXTRA_COMMANDS.items():  # run by main() before LightningCLI; listed in --help
                subcommands.add_subcommand(name, self.init_parser(description=text), help=text)

        def add_arguments_to_parser(self, parser) -> None:
            from ..callbacks import VQuantCallback

            # `probe` (a tensor) is for Python use; the CLI has probe_seed/probe_shape
            parser.add_class_arguments(variant(VQuantCallback, namespace), "quant", skip={"probe"},
                                       fail_untyped=False, sub_configs=True)
            parser.callback_keys.append("quant")
            parser.link_arguments("model.preprocessing", "data.preprocessing", apply_on="instantiate")

    return VQuantCLI, SafeSaveConfig


class _QuietFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not QUIET_MESSAGES.match(str(record.msg))


@contextlib.contextmanager
def quiet_lightning():
    """Within: no Lightning tips (litlogger, litmodels), no `Seed set to` line per run and no
    deprecation warnings raised by Lightning's own code (the user cannot act on them); every
    other message and warning stays.

    Example:
        >>> with quiet_lightning():
        ...     pass  # build and run Trainers here
    """
    quiet = _QuietFilter()
    lightning_module()  # imported first: Lightning installs its console handlers at import
    handlers = [h for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                               "lightning_fabric") for h in logging.getLogger(name).handlers]
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            for category in (DeprecationWarning, FutureWarning):
                warnings.filterwarnings("ignore", category=category,
                                        module=r"(lightning|pytorch_lightning|lightning_fabric)(\.|$)")
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=\.)\s", " ".join(text.split()), maxsplit=1)[0]


@contextlib.contextmanager
def _argv(args: list[str]):
    old = sys.argv
    # LightningCLI reads sys.argv (passing args= beside it warns); the program stays sys.argv[0],
    # which Lightning's DDP launcher runs again for every other rank
    sys.argv = [old[0] if old else "vquant", *args]
    try:
        yield
    finally:
        sys.argv = old


def make_cli(args: list[str] | None = None, run: bool = True, save_config: bool = True, parse_only: bool = False):
    """Build (and with `run`, run) the `vquant` LightningCLI on `args` (default: `sys.argv[1:]`).

    Args:
        args: command-line arguments, e.g. `["test", "--config", "paper/resnet18_w4a4"]`.
        run: run the subcommand; False parses and instantiates only (no subcommand then).
        save_config: save the resolved config into the log dir (never over a file).
        parse_only: build the parser only (`cli.parser`; nothing parsed, seeded nor
            instantiated), to check configs with it (the sweep does, before any run).

    Example:
        >>> cli = make_cli(["--config", "quickstart/w8a8", "--model.pretrained", "false"], run=False)
        >>> type(cli.model).__name__
        'SpecClassifier'
    """
    from ..datamodules import ImageNetDataModule

    args = resolve_config_args(sys.argv[1:] if args is None else list(args))
    namespace = active_namespace()
    cli_class, save_class = _cli_classes(namespace)
    if parse_only:
        cli_class = _parse_only(cli_class)
    with _argv(args):
        return cli_class(variant(SpecClassifier, namespace), variant(ImageNetDataModule, namespace), run=run,
                         subclass_mode_model=False, subclass_mode_data=False, auto_configure_optimizers=False,
                         save_config_callback=save_class if save_config else None, seed_everything_default=0,
                         trainer_defaults={"enable_checkpointing": False, "enable_model_summary": False})


def _tool(name: str, argv: list[str]) -> int:
    module_name = TOOLS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        print(f"vquant {name}: not available in this installation ({module_name} is missing)", file=sys.stderr)
        return 2
    return int(module.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vquant` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    with quiet_lightning():
        return _main(argv)


EXPORT_USAGE = "vquant export --config CONFIG --out model.onnx [--GROUP.OPTION VALUE ...]"
#: Lightning's loggers of its `GPU available: ...` lines, which `vquant export` (no Trainer run) does not print.
BANNER_LOGGERS = [f"{ns}.utilities.rank_zero" for ns in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                                                           "lightning_fabric")]


def _export_error(text: str) -> int:
    print(f"vquant export: error: {text}", file=sys.stderr)
    return 2


def _one_line(err: BaseException) -> str:
    """The first line of an error's message, without terminal colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


@contextlib.contextmanager
def _no_banner():
    loggers = [logging.getLogger(name) for name in BANNER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_main(argv: list[str]) -> int:
    """`vquant export --config NAME --out model.onnx [--model.* / --quant.* / --data.* overrides]`:
    the config's model, quantized by its `quant` settings as `vquant test` quantizes it (its
    `quant.target`; a data-driven `act_range` calibrated on the data module's validation
    images), written by `vquant_pl.export_onnx` at the data module's input size (its
    preprocessing, `--data.image_size` included, goes into the file's metadata) and checked
    in onnxruntime on one random batch; never over a file. Returns the exit status (2: a bad
    argument, or a model that cannot be exported, with the reason in one line)."""
    import pickle

    import torch

    from ..export import check_config, export_onnx, require_onnx
    from ..methods.table import METHODS
    from ..quantize import quantize_model

    if not argv or "-h" in argv or "--help" in argv:
        print(f"usage: {EXPORT_USAGE}\n\n{EXTRA_COMMANDS['export']}\n--out is required and never overwritten; "
              "every other option is one of `vquant test --help`.")
        return 0 if argv else 2
    argv = [a for arg in argv for a in (arg.split("=", 1) if arg.startswith("--out=") else [arg])]
    if "--out" not in argv or argv.index("--out") + 1 >= len(argv):
        return _export_error("--out model.onnx is required")
    i = argv.index("--out")
    out, rest = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
    try:
        require_onnx()
    except ImportError as err:
        return _export_error(str(err))
    if out.exists():
        return _export_error(f"{out} exists; choose another --out")
    try:
        with _no_banner():
            cli = make_cli(rest, run=False, save_config=False)
    except (OSError, ValueError, pickle.UnpicklingError) as err:  # a missing config, an unsafe model file, ...
        return _export_error(_one_line(err))
    except Exception as err:  # Lightning's refusal of a Trainer setting (its class lives in either namespace)
        if type(err).__name__ != "MisconfigurationException":
            raise
        return _export_error(_one_line(err))
    trainer = cli.config.get("trainer") or {}
    if str(trainer.get("precision") or "32-true") not in ("32", "32-true"):  # never a setting accepted and ignored
        return _export_error(f"trainer.precision={trainer.get('precision')!r}: vquant export writes the float32 "
                             "model (float32 scales, QDQ of float32 tensors); drop trainer.precision")
    if str(trainer.get("accelerator") or "auto") not in ("auto", "cpu"):
        return _export_error(f"trainer.accelerator={trainer.get('accelerator')!r}: vquant export quantizes and "
                             "exports on the CPU; drop trainer.accelerator")
    callback = next((c for c in cli.trainer.callbacks if hasattr(c, "config") and hasattr(c, "export")), None)
    if callback is None or callback.config is None:
        return _export_error("the config quantizes nothing (quant.weight_bits is null)")
    if callback.export is not None:
        return _export_error(f"quant.export={callback.export!r} is the callback's file (written during `vquant test`); "
                             "vquant export writes --out only: drop quant.export")
    config = callback.config
    prep = cli.datamodule.preprocessing  # the model's, with --data.image_size & co. applied: what `vquant test` feeds
    try:
        check_config(config)  # before the work of quantizing
        calibration = None
        if config.quantizes_activations and METHODS[config.act_range].calibrated:  # as the callback calibrates
            calibration = cli.datamodule.val_dataloader()
        cli.model.eval()
        quantize_model(callback.target_module(cli.model), probe=callback.probe, calibration=calibration, config=config)
        report = export_onnx(cli.model.model, out, torch.rand(2, 3, *prep.input_size), preprocessing=prep)
    except ValueError as err:  # a setting or layer that cannot be quantized or written, named
        return _export_error(str(err))
    except (OSError, torch.onnx.OnnxExporterError) as err:  # the file taken meanwhile; torch.onnx's own failure
        return _export_error(_one_line(err))
    print(report.table())
    print(f"wrote {out}: onnxruntime vs PyTorch on a random batch, largest output difference "
          f"{report.max_abs_diff:.3g} (with onnxruntime's optimized kernels {report.optimized_diff:.3g}); "
          f"integer kernels: {len(report.integer_layers)} of {len(report.layers)} layers")
    return 0


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "sweep":
        from .sweep import main as sweep_main

        rows = sweep_main(argv[1:])
        return 1 if any(r.get("status", "ok") != "ok" for r in rows) else 0
    if argv and argv[0] in TOOLS:
        return _tool(argv[0], argv[1:])
    if argv and argv[0] == "export":
        return export_main(argv[1:])
    try:
        make_cli(argv)
    except FileNotFoundError as err:
        if "shipped config" not in str(err):
            raise
        print(f"vquant: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
