"""`VQuantCallback`: data-free quantization at the start of test (validate, predict)."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from typing import Any, Literal, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from vquant_pl import _lightning as pl  # either Lightning namespace (lightning.pytorch, pytorch_lightning)
from vquant_pl._lightning import rank_zero_info, rank_zero_warn

from vquant_pl.config import (AciqStats, ActRange, Backend, BiasCorrectionRule, BitAllocationRule, BnBiasCorrection,
                              MixedPrecision,
                              QuantConfig, Rounding)
from vquant_pl.probe import Probe
from vquant_pl.quantize import (activation_ranges, is_quantized, quantization_report, quantize_model, restore_model,
                                set_activation_ranges)
from vquant_pl.methods.table import METHODS
from vquant_pl.report import QuantReport
from vquant_pl.state import originals, storage_key

Stage = Literal["test", "validate", "predict"]
STAGES = ("test", "validate", "predict")


def _new_file(path: str):
    """Open `path` for writing, or `<stem>_1<suffix>`, `_2`... when it exists (never overwrite)."""
    stem, suffix = os.path.splitext(path)
    for n in range(10_000):
        try:
            return open(path if n == 0 else f"{stem}_{n}{suffix}", "x")
        except FileExistsError:
            continue
    raise FileExistsError(f"{path} and 9999 numbered variants exist")


class VQuantCallback(pl.Callback):
    """Quantize the model (or its submodule `target`) at the start of the chosen stages and
    restore the exact float weights at their end, unless `keep_quantized`.

    The quantization settings are those of `vquant_pl.QuantConfig` (one keyword each, same
    names, defaults, types and checks; tests hold the signature to the dataclass), plus the
    callback's own.

    Args:
{settings}
        probe: a probe tensor or `Probe`, instead of probe_seed/probe_shape (Python use).
        target: dotted name of the submodule to quantize; None quantizes the whole LightningModule.
        stages: the stages that run quantized: any of test, validate, predict (at least one).
        keep_quantized: leave the model quantized after the stage. A later stage of this callback
            evaluates that model again (same report) as long as its tensors are unchanged.
        export: write the evaluated model there as ONNX QDQ (`vquant_pl.export_onnx`), once, on
            rank 0, after the first batch (an existing file is an error; needs the `export` extra).
        verbose: print the per-layer table on rank 0.

    Raises:
        ValueError: a bad setting or stage (or none), named, when the callback is built;
            `export` with a precision or model that is not float32, at setup.
        RuntimeError: at setup, `keep_quantized` under a strategy that runs the stage in
            processes it starts (ddp_spawn, ddp_fork, ddp_notebook: the model passed in would
            come back float). At the start of a stage: the target is quantized already, by
            `vq.quantize_model` or another callback (its settings, not these, would run), or it
            is the model this callback kept quantized but its tensors changed since (a
            checkpoint loaded into it). With `export`, no module that can be exported ran in the
            first batch (raised at its end; the message names the modules tried).

    Calibration (act_range max, percentile, mse, entropy): the first `calib_batches` batches
    of the data module's `val_dataloader()`, read without a `DistributedSampler`
    (`calibration_batches`), so every world size calibrates on the same images (rank 0's
    ranges are broadcast).

    Failures: a failed Trainer call restores the float weights only when it failed while this
    callback's own quantized run was in progress (from its quantization to the end of that
    stage). A refusal (fit on a quantized model, a model quantized elsewhere, ...) and a failure
    in another stage leave the model as it was, kept quantized included.

    Checkpoints: the settings passed here always win over those saved in a checkpoint (a
    differing checkpoint gets a one-line warning). A checkpoint written while the model is
    quantized (`keep_quantized=True`) holds the float weights -- the callback swaps them in
    -- so loading it and quantizing again never quantizes twice. Training (`fit`) a model
    this callback keeps quantized is refused with the reason.

    Example:
        >>> import vquant_pl as vq
        >>> cb = vq.VQuantCallback(weight_bits=4, act_bits=4, act_range="bn")
        >>> cb.config.act_range
        'bn'
    """

    def __init__(self, weight_bits: Optional[int] = 4, act_bits: Optional[int] = 4, rounding: Rounding = "squant",
                 act_range: ActRange = "bn", sigma: Optional[float] = None, bn_k: Optional[float] = None,
                 aciq_stats: AciqStats = "probe", bias_correction: bool = False, bit_allocation: bool = False,
                 act_bit_allocation: bool = False, bn_bias_correction: Optional[BnBiasCorrection] = "weights",
                 equalize: bool = False, equalize_alpha: float = 0.5, equalize_k: float = 4.0,
                 weight_clip: bool = False, percentile: float = 99.99, calib_batches: Optional[int] = 8,
                 probe_seed: int = 0, probe_shape: Optional[Sequence[int]] = None, backend: Optional[Backend] = None,
                 act_per_channel: bool = False, bit_allocation_rule: BitAllocationRule = "aciq",
                 bias_correction_rule: BiasCorrectionRule = "mean", aciq_cap: bool = False,
                 mixed_precision: Optional[MixedPrecision] = None, mixed_min_bits: int = 3,
                 probe: Union[Tensor, Probe, None] = None, target: Optional[str] = None,
                 stages: Union[Stage, Sequence[Stage]] = ("test",), keep_quantized: bool = False,
                 export: Optional[str] = None, verbose: bool = True):
        given = locals()
        settings = {name: given[name] for name in QuantConfig.field_names()}
        # weight_bits None: the float baseline, nothing is quantized (the rest is still checked)
        self._checked = QuantConfig(**(settings | {"weight_bits": 4 if weight_bits is None else weight_bits}))
        self.config: QuantConfig | None = None if weight_bits is None else self._checked
        stages = [stages] if isinstance(stages, str) else list(stages)
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; expected any of {', '.join(STAGES)}")
        if not stages:
            raise ValueError(f"stages is empty: the callback would quantize nothing; give any of {', '.join(STAGES)}")
        if probe is not None and not isinstance(probe, (Tensor, Probe)):
            raise ValueError(f"probe must be a Tensor, a vquant_pl.Probe or None, got {type(probe).__name__}")
        self._checked.refuse_probe_beside(probe)
        if target is not None and not isinstance(target, str):
            raise ValueError(f"target must be a submodule name (str) or None, got {target!r}")
        self.probe = probe
        self.target, self.stages, self.keep_quantized, self.verbose = target, stages, keep_quantized, verbose
        if export is not None and weight_bits is None:
            raise ValueError(f"VQuantCallback(export={export!r}) with weight_bits=None: a float baseline run "
                             "quantizes nothing, so there is no quantized model to export; set weight_bits or "
                             "drop export")
        if export is not None and self.config is not None:
            from vquant_pl.export import check_config

            try:
                check_config(self.config)
            except ValueError as err:
                raise ValueError(f"VQuantCallback(export={export!r}): {err}; or drop export") from None
        self.export, self.export_report = export, None
        self._export_hook: _ExportOnFirstBatch | None = None
        self._exported = False  # export once per callback: a later stage leaves the file alone
        self._quantized: nn.Module | None = None  # the module this callback quantized
        self._kept: dict[str, bytes] | None = None  # digests of its tensors when its kept run ended
        self._running = False  # between this callback's quantization and the end of that stage
        self.report: QuantReport | None = None

    @property
    def settings(self) -> dict[str, Any]:
        """The resolved settings (sigma filled in), `weight_bits` None for a float run."""
        if self.config is None:
            return self._checked.to_dict(resolved=True) | {"weight_bits": None}
        return self.config.to_dict(resolved=True)

    # -- hooks ------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage):
        """Settings that depend on the Trainer, checked before any work."""
        if stage not in self.stages or self.config is None:
            return
        launcher = getattr(trainer.strategy, "launcher", None)  # ddp_spawn/fork/notebook: _MultiProcessingLauncher
        if self.keep_quantized and any(c.__name__ == "_MultiProcessingLauncher" for c in type(launcher).__mro__):
            raise RuntimeError(
                f"VQuantCallback(keep_quantized=True) under strategy {type(trainer.strategy).__name__} "
                f"({getattr(launcher, '_start_method', 'spawn')}): the {getattr(stage, 'value', stage)} stage runs "
                "in processes the strategy starts, so the model kept quantized (and callback.report) would stay in "
                "them and the model you passed would come back float. Use strategy='ddp' launched from a script "
                "(or torchrun), one device, or keep_quantized=False.")
        if self.export is not None and not self._exported:  # the file is a float32 model
            try:
                target = self.target_module(pl_module)
            except ValueError:  # built later, in configure_model: the export itself refuses a non-float32 model
                target = None
            other = None if target is None else next((f"{n} is {t.dtype}" for n, t in target.named_parameters()
                                                      if t.is_floating_point() and t.dtype != torch.float32), None)
            if trainer.precision in ("64-true", "16-true", "bf16-true"):
                other = f"precision={trainer.precision!r} converts the model's weights off float32"
            if other is not None:
                raise ValueError(f"VQuantCallback(export={self.export!r}): the ONNX file holds a float32 model, but "
                                 f"{other}; export a float32 model under precision '32-true', '16-mixed' or "
                                 "'bf16-mixed', or drop export")

    def on_test_start(self, trainer, pl_module):
        self._start("test", trainer, pl_module)

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "validate":  # not the validation loop inside fit
            self._start("validate", trainer, pl_module)

    def on_predict_start(self, trainer, pl_module):
        self._start("predict", trainer, pl_module)

    def on_test_end(self, trainer, pl_module):
        self._end("test")

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "validate":
            self._end("validate")

    def on_predict_end(self, trainer, pl_module):
        self._end("predict")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch_end(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch_end(trainer)  # hooks are attached only by trainer.validate, never inside fit

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch_end(trainer)

    def on_fit_start(self, trainer, pl_module):
        if is_quantized(pl_module):
            raise RuntimeError(
                "the model is quantized (VQuantCallback(keep_quantized=True) or vq.quantize_model): its weights are "
                "fake-quantized in place and its inputs pass through fixed quantizers, which vquant-pl does not "
                "train (no quantization-aware training). Call callback.restore() or vq.restore_model(model) "
                "before fit.")

    def on_exception(self, trainer, pl_module, exception):
        if self._export_hook is not None:
            self._export_hook.remove()
            self._export_hook = None
        # A run of this callback that failed between its quantization and its stage's end is
        # undone (a user's model is never left quantized by a failed run). Anything else -- a
        # refusal raised before this callback changed anything (fit on a kept model), a failure
        # in another stage, or in a stage reusing a model kept earlier -- leaves the model as
        # it was, so a failed Trainer call never silently undoes keep_quantized.
        if self._running:
            self._running = False
            self.restore()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        """A checkpoint always holds float weights: swap the originals of quantized layers in."""
        state = checkpoint.get("state_dict")
        if state is None:
            return
        for name, module in pl_module.named_modules():
            for tensor_name, original in originals(module).items():
                key = f"{name}.{tensor_name}" if name else tensor_name
                if key in state:
                    state[key] = original.detach().clone().to(state[key].device)
        self._tied_keys(pl_module, state)

    @staticmethod
    def _tied_keys(pl_module: nn.Module, state: dict) -> None:
        """A tensor shared by several modules is saved under each name (any attribute name, a
        tied embedding's `weight` or a lookup's `table`): float under all."""
        owners: dict[tuple, Tensor] = {}  # by storage: two Parameters over one tensor are tied too
        for module in pl_module.modules():
            for tensor_name, original in originals(module).items():
                owners[storage_key(getattr(module, tensor_name))] = original
        for key, tensor in [*pl_module.named_parameters(remove_duplicate=False),
                            *pl_module.named_buffers(remove_duplicate=False)]:
            if key in state and storage_key(tensor) in owners:
                state[key] = owners[storage_key(tensor)].detach().clone().to(state[key].device)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.settings, target=self.target, stages=list(self.stages), keep_quantized=self.keep_quantized)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The settings passed to this callback win; a checkpoint with others is reported."""
        mine = self.state_dict()
        differing = {k: v for k, v in state_dict.items() if k in mine and mine[k] != v}
        if differing:
            rank_zero_warn("vquant: the checkpoint was saved with other quantization settings ("
                           + ", ".join(f"{k}={v!r}" for k, v in differing.items())
                           + "); using the ones passed to VQuantCallback ("
                           + ", ".join(f"{k}={mine[k]!r}" for k in differing) + ")")

    # -- work -------------------------------------------------------------------------
    def target_module(self, pl_module: nn.Module) -> nn.Module:
        if self.target is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.target)
        except AttributeError as err:
            raise ValueError(f"target {self.target!r} is not a submodule of {type(pl_module).__name__}") from err

    def restore(self) -> None:
        """Put the float weights back (no-op when nothing is quantized by this callback)."""
        if self._quantized is not None and is_quantized(self._quantized):
            restore_model(self._quantized)
        self._quantized, self._kept = None, None

    def _check_quantized(self, module: nn.Module) -> bool:
        """True when `module` is the model this callback kept quantized, unchanged (evaluate it
        again); RuntimeError when it is quantized otherwise; False when it is not quantized."""
        if not is_quantized(module):
            return False
        if module is self._quantized and self._kept is not None and self.config is not None:
            now = _digests(module)
            changed = [k for k in sorted(set(now) | set(self._kept)) if now.get(k) != self._kept.get(k)]
            if not changed:
                return True
            names = ", ".join(changed[:3]) + (f" (and {len(changed) - 3} more)" if len(changed) > 3 else "")
            raise RuntimeError(
                f"vquant: {names} of {type(module).__name__} changed since this VQuantCallback quantized it and kept "
                "it quantized (keep_quantized=True): other tensors were loaded (trainer.test(ckpt_path=...), "
                "load_state_dict) into layers that still hold the earlier quantization, and evaluating that mix would "
                "score neither model. Call callback.restore() before loading other weights (it puts back the float "
                "weights it quantized; then run trainer.test(ckpt_path=...) again), or evaluate several "
                "checkpoints with keep_quantized=False: each run quantizes the loaded floats and restores them.")
        held = quantization_report(module)
        mine = ("a float baseline (weight_bits=None)" if self.config is None else
                f"W{self.config.weight_bits}A{self.config.act_bits or 'float'} {self.config.act_range}")
        raise RuntimeError(
            f"vquant: {type(module).__name__} is quantized already (W{held.weight_bits}A{held.act_bits or 'float'} "
            f"{held.act_range}, by vq.quantize_model or another VQuantCallback with keep_quantized=True), so this "
            f"VQuantCallback's settings ({mine}) would not apply and the run would evaluate that model. Put its "
            "float weights back first: vq.restore_model(model), or that callback's restore().")

    def _start(self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if stage not in self.stages:
            return
        module = self.target_module(pl_module)
        if self._check_quantized(module):
            rank_zero_info(f"vquant: evaluating the {type(module).__name__} this callback kept quantized again")
            return
        if self.config is None:
            return
        exporting = self.export is not None and not self._exported
        if exporting:  # before any work: the extra is there and no file is overwritten
            from vquant_pl.export import require_onnx

            require_onnx()
            if os.path.exists(self.export):
                raise FileExistsError(f"VQuantCallback(export={self.export!r}): the file exists; choose another path")
        start = time.perf_counter()
        calibration = None
        if self.config.quantizes_activations and METHODS[self.config.act_range].calibrated:
            calibration = self._calibration(trainer, stage)
        quantize_model(module, probe=self.probe, calibration=calibration, config=self.config)
        self._quantized, self._kept, self._running = module, None, True
        self._broadcast(trainer, module)
        self.report = quantization_report(module)
        self._log(trainer, self.report, time.perf_counter() - start)
        if exporting:  # on every rank, so that every rank raises when nothing can be exported
            self._export_hook = _ExportOnFirstBatch(pl_module, self.target, module)

    def _batch_end(self, trainer: pl.Trainer) -> None:
        """End of the first batch of an exporting stage: export the evaluated module (rank 0)."""
        hook, self._export_hook = self._export_hook, None
        if hook is None:
            return
        candidates = hook.finish()
        if not trainer.is_global_zero:
            self._exported = True
            return
        from vquant_pl.export import export_onnx

        name, module, example = candidates[0]
        try:
            report = export_onnx(module, self.export, example[:2].detach().float())
        except Exception as err:
            if module is not hook.pl_module or len(candidates) < 2:
                raise
            inner = candidates[1]  # the LightningModule's own forward could not be exported (it reads the trainer, ...)
            rank_zero_warn(f"vquant: exporting the LightningModule failed ({type(err).__name__}: {str(err)[:160]}); "
                           f"exporting its submodule {inner[0]!r} instead, without what the LightningModule's "
                           "forward does around it (pass target= to choose the module)")
            name, module, example = inner
            report = export_onnx(module, self.export, example[:2].detach().float())
        self._exported = True
        self.export_report = report
        rank_zero_info(f"vquant: exported {name or 'the LightningModule'} ({type(module).__name__}) to "
                       f"{self.export} (onnxruntime vs PyTorch on the first batch: largest output difference "
                       f"{report.max_abs_diff:.3g}; {len(report.integer_layers)} of {len(report.layers)} layers "
                       "run as integer kernels)")

    def _end(self, stage: str) -> None:
        if self._export_hook is not None:
            self._export_hook.remove()
            self._export_hook = None
            rank_zero_warn(f"vquant: the {stage} stage ran no batch, so nothing was exported to {self.export}")
        if stage not in self.stages:
            return
        self._running = False
        if not self.keep_quantized:
            self.restore()
        elif self._quantized is not None:  # what a later stage checks it evaluates
            self._kept = _digests(self._quantized)

    def _calibration(self, trainer: pl.Trainer, stage: str) -> Any:
        """The batches data-driven ranges calibrate on (`calibration_batches` of the data
        module's val_dataloader()); a warning when the stage evaluates that very dataset."""
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError(f"act_range {self.config.act_range!r} needs a datamodule with "
                             "val_dataloader() to calibrate on")
        loader = datamodule.val_dataloader()
        batches = calibration_batches(loader)
        if batches is None:
            if trainer.world_size > 1:
                rank_zero_warn("vquant: val_dataloader() is not a map-style DataLoader with a batch_size, so each "
                               "rank calibrates on its own batches (rank 0's ranges are used): multi-device ranges "
                               "may differ from single-device ones")
            return loader
        evaluated = {"test": trainer.test_dataloaders, "validate": trainer.val_dataloaders}.get(stage)
        evaluated = evaluated if isinstance(evaluated, (list, tuple)) else [evaluated]
        if any(getattr(other, "dataset", None) is loader.dataset for other in evaluated):
            rank_zero_warn(f"vquant: act_range {self.config.act_range!r} calibrates on val_dataloader(), and this "
                           f"{stage} run evaluates the same dataset: the calibration images are scored too, which "
                           "flatters the data-driven ranges; give the data module a val_dataloader() over other "
                           "images for a fair comparison")
        return batches

    @staticmethod
    def _broadcast(trainer: pl.Trainer, module: nn.Module) -> None:
        """Every rank takes rank 0's quantized weights and activation ranges."""
        if trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return
        with torch.no_grad():  # every tensor the run changed: weights, corrected biases, BatchNorm
            for layer in module.modules():
                for name in sorted(originals(layer)):
                    torch.distributed.broadcast(getattr(layer, name).data, src=0)
        set_activation_ranges(module, trainer.strategy.broadcast(activation_ranges(module), src=0))

    def hparams(self) -> dict[str, Any]:
        """What a logger records: the resolved settings and the probe actually used."""
        probe = self.report.probe if self.report is not None else None
        out = {f"vquant/{k}": v for k, v in self.settings.items()}
        if self.report is not None:  # the sigma of the layers ranged by the sigma rule; None when none was
            out["vquant/sigma"] = self.report.sigma
        out["vquant/probe"] = probe
        out["vquant/backend"] = self.report.backend if self.report is not None else None
        return out

    def _log(self, trainer: pl.Trainer, report: QuantReport, seconds: float) -> None:
        metrics = {"vquant/quant_time_s": seconds, "vquant/weight_time_ms": report.weight_time_s * 1e3,
                   "vquant/probe_time_s": report.probe_time_s, "vquant/layers": float(report.num_layers),
                   "vquant/weights": float(report.num_weights)}
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_hyperparams(self.hparams())
            logger.log_metrics(metrics, step=trainer.global_step)
            log_dir = getattr(logger, "log_dir", None)
            if log_dir:
                os.makedirs(log_dir, exist_ok=True)
                with _new_file(os.path.join(log_dir, "vquant_report.json")) as f:  # never over an earlier report
                    json.dump(report.to_dict(), f, indent=1)
            experiment = getattr(logger, "experiment", None)
            add_text = getattr(experiment, "add_text", None)
            if callable(add_text):
                add_text("vquant/report", "```\n" + report.table() + "\n```", trainer.global_step)
            add_figure = getattr(experiment, "add_figure", None)
            if callable(add_figure):
                from vquant_pl.plots import available, layer_figure

                if available("the per-layer figure for the logger"):
                    add_figure("vquant/layers", layer_figure(report), trainer.global_step)
        if self.verbose:
            rank_zero_info(report.table() + f"\nquantized in {seconds:.2f} s")


def calibration_batches(loader: Any) -> Optional["_InOrder"]:
    """The batches a single device's `loader` gives, so that every world size calibrates on
    the same first batches: a loader with a `DistributedSampler` (under DDP a rank's
    `UnrepeatedDistributedSampler` holds only that rank's share) is read without it, through
    the sampler it wraps where it wraps one (Lightning's `DistributedSamplerWrapper`), else in
    order at its batch size; any other loader as it is, its own sampler kept. None for a
    loader that is not a map-style DataLoader with a batch_size."""
    from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset) or not loader.batch_size:
        return None
    if not isinstance(loader.sampler, DistributedSampler):
        return _InOrder(loader)
    wrapped = getattr(loader.sampler.dataset, "_sampler", None)  # DistributedSamplerWrapper's own sampler
    return _InOrder(DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False, sampler=wrapped,
                               num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                               pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                               multiprocessing_context=loader.multiprocessing_context,
                               drop_last=loader.drop_last))


class _InOrder:
    """Batches of `loader`, leaving out one with no input (every image of it skipped), as the
    data module's own loader does."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for batch in self.loader:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not (isinstance(x, Tensor) and len(x) == 0):
                yield batch


def _digests(module: nn.Module) -> dict[str, bytes]:
    """A digest of the bytes of every tensor of `module`'s state_dict, by key (any device)."""
    out = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        if isinstance(tensor, Tensor):
            digest = hashlib.blake2b(f"{tensor.dtype} {tuple(tensor.shape)}".encode(), digest_size=16)
            if tensor.device.type != "meta":  # a meta tensor has no values: its dtype and shape are its digest
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            out[key] = digest.digest()
    return out


class _ExportOnFirstBatch:
    """Which module `VQuantCallback(export=...)` exports, and its example input.

    Forward hooks on the chain of modules from the callback's target module (the
    LightningModule unless `target=`) down to the common parent of the quantized layers record
    the first tensor input and the output of each. At the end of the first batch the
    outermost module of the chain that ran with a tensor is exported: the evaluated model,
    with whatever its forward does around the quantized layers (normalizing, scaling), and
    the export report compares the file with that very module. A container that is never
    called (an `nn.ModuleList`) is passed over; when no module of the chain ran with a
    tensor, `finish` raises, naming them.

    One exception: a LightningModule whose forward is a plain pass-through -- same input and
    same output as the next module of the chain that ran, as `ImageClassifier.forward` is
    for its `model` -- gives way to that module. The file computes the same, holds the
    user's network under its own layer names (no `model.` prefix) and no Lightning object
    is copied into the export. Any other LightningModule is exported itself (torch.onnx
    traces it like any module).
    """

    def __init__(self, pl_module: nn.Module, target: str | None, module: nn.Module):
        from vquant_pl.state import iter_states

        parents = [name.split(".")[:-1] for name, _, _ in iter_states(module)]
        common = os.path.commonprefix(parents) if parents else []
        prefix = [] if target is None else [target]
        self.pl_module = pl_module
        self.chain = [(".".join(prefix + common[:n]), module.get_submodule(".".join(common[:n])))
                      for n in range(len(common) + 1)]
        self.seen: dict[int, tuple[Tensor, Any]] = {}  # chain index -> (first tensor input, its output)
        self.handles = [m.register_forward_hook(functools.partial(self._record, n))
                        for n, (_, m) in enumerate(self.chain)]

    def _record(self, n: int, module: nn.Module, args: tuple, output: Any) -> None:
        if n not in self.seen and args and isinstance(args[0], Tensor):
            self.seen[n] = (args[0], output)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def finish(self) -> list[tuple[str, nn.Module, Tensor]]:
        """(dotted name, module, first input) of the modules that can be exported, outermost
        first; RuntimeError when none ran with a tensor in and one tensor out."""
        self.remove()
        ran = [(name, module, *self.seen[n]) for n, (name, module) in enumerate(self.chain)
               if n in self.seen and isinstance(self.seen[n][1], Tensor)]  # ONNX needs one tensor out
        self.seen = {}
        if not ran:
            tried = ", ".join(f"{name or 'the LightningModule'} ({type(m).__name__})" for name, m in self.chain)
            raise RuntimeError(f"VQuantCallback(export=...): none of the modules holding the quantized layers ran "
                               f"with a tensor input and a tensor output in the first batch (tried {tried}), so "
                               "there is nothing to export; pass target= the dotted name of the submodule your "
                               "step calls with the input tensor")
        if ran[0][1] is self.pl_module and len(ran) > 1 and _same(ran[0][2:], ran[1][2:]):
            ran = ran[1:]  # a pass-through LightningModule: its network computes the same
        return [(name, module, example) for name, module, example, _ in ran]


def _same(a: tuple, b: tuple) -> bool:
    """Two (input, output) pairs of tensors, equal to the bit."""
    return all(isinstance(u, Tensor) and isinstance(v, Tensor) and u.shape == v.shape and u.dtype == v.dtype
               and torch.equal(u, v) for u, v in zip(a, b))


VQuantCallback.__doc__ = VQuantCallback.__doc__.replace("{settings}", QuantConfig.args_doc(
    weight_bits="weight bits (2..8); None leaves the model float (a baseline run)."))
