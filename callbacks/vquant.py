"""`VQuantCallback`: data-free quantization at the start of test (validate, predict)."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor, nn

from vquant_pl.probe import Probe
from vquant_pl.quantize import (CALIBRATED_RANGES, activation_ranges, check_settings, is_quantized, quantizable_layers,
                                quantization_report, quantize_model, restore_model, set_activation_ranges)
from vquant_pl.report import QuantReport

STAGES = {"test": "test", "validate": "validate", "predict": "predict"}


class VQuantCallback(pl.Callback):
    """Quantize the model (or its submodule `target`) at the start of the chosen stages,
    and restore the exact float weights at their end unless `keep_quantized`.

    Takes the keyword arguments of `vquant_pl.quantize_model` (`weight_bits` -- None
    leaves the model float, for a baseline --, `act_bits`, `rounding`, `act_range`, `sigma`,
    `probe`, `backend`, `bias_correction`, `bit_allocation`, `act_bit_allocation`, `bn_k`,
    `aciq_stats`) plus: `probe_seed` and `probe_shape` (the default probe when `probe` is
    None), `target`, `stages` (any of "test", "validate", "predict"), `keep_quantized`,
    `verbose` (print the per-layer table on rank 0), `calib_batches` (for the data-driven
    `act_range`s max/percentile/mse/entropy, taken from the data module's
    `val_dataloader()`). Under DDP, rank 0's quantized weights and ranges are broadcast so
    that every rank holds identical ones. Quantization time, totals and the per-layer
    report go to the trainer's loggers (metrics `vquant/...`, `vquant_report.json` in the
    log dir).
    """

    def __init__(self, weight_bits: int | None = 4, act_bits: int | None = 4, rounding: str = "squant",
                 act_range: str = "sigma", sigma: float | None = None, probe: Tensor | Probe | None = None,
                 probe_seed: int = 0, probe_shape: Sequence[int] | None = None, backend: str | None = None,
                 target: str | None = None, stages: Sequence[str] = ("test",), keep_quantized: bool = False,
                 verbose: bool = True, bias_correction: bool = False, bit_allocation: bool = False,
                 bn_k: float | None = None, aciq_stats: str = "probe", calib_batches: int = 8,
                 act_bit_allocation: bool = False):
        if weight_bits is not None:  # None: the float baseline, nothing is quantized
            check_settings(weight_bits, act_bits, rounding, act_range, sigma, bn_k, aciq_stats, act_bit_allocation)
        stages = [stages] if isinstance(stages, str) else list(stages)
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; expected any of {', '.join(STAGES)}")
        self.settings = dict(weight_bits=weight_bits, act_bits=act_bits, rounding=rounding, act_range=act_range,
                             sigma=sigma, backend=backend, bias_correction=bias_correction,
                             bit_allocation=bit_allocation, bn_k=bn_k, aciq_stats=aciq_stats,
                             act_bit_allocation=act_bit_allocation)
        self.probe = probe if probe is not None else Probe(probe_seed, tuple(probe_shape) if probe_shape else None)
        self.target, self.stages, self.keep_quantized, self.verbose = target, stages, keep_quantized, verbose
        self.calib_batches = calib_batches
        self._quantized: nn.Module | None = None  # the module this callback quantized
        self.report: QuantReport | None = None

    # -- hooks ------------------------------------------------------------------------
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

    def on_exception(self, trainer, pl_module, exception):
        self.restore()  # never leave a user's model quantized by a failed run

    def state_dict(self) -> dict[str, Any]:
        probe = self.probe if isinstance(self.probe, Probe) else None
        return dict(self.settings, target=self.target, stages=self.stages, keep_quantized=self.keep_quantized,
                    probe_seed=probe.seed if probe else None,
                    probe_shape=list(probe.shape) if probe and probe.shape else None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.settings = {k: state_dict[k] for k in self.settings if k in state_dict} | {
            k: v for k, v in self.settings.items() if k not in state_dict}
        self.target = state_dict.get("target", self.target)
        self.stages = state_dict.get("stages", self.stages)
        self.keep_quantized = state_dict.get("keep_quantized", self.keep_quantized)
        if state_dict.get("probe_seed") is not None:
            shape = state_dict.get("probe_shape")
            self.probe = Probe(state_dict["probe_seed"], tuple(shape) if shape else None)

    # -- work -------------------------------------------------------------------------
    def target_module(self, pl_module: pl.LightningModule) -> nn.Module:
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
        self._quantized = None

    def _start(self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if stage not in self.stages or self.settings["weight_bits"] is None:
            return
        module = self.target_module(pl_module)
        if is_quantized(module):
            rank_zero_info(f"vquant: {type(module).__name__} is already quantized; not quantizing it again")
            return
        start = time.perf_counter()
        calibration = None
        if self.settings["act_range"] in CALIBRATED_RANGES and self.settings["act_bits"] is not None:
            # data-driven ranges (for comparison only): batches of the data module's val loader
            datamodule = trainer.datamodule
            if datamodule is None:
                raise ValueError(f"act_range {self.settings['act_range']!r} needs a datamodule with "
                                 "val_dataloader() to calibrate on")
            calibration = datamodule.val_dataloader()
        quantize_model(module, probe=self.probe, calibration=calibration, calib_batches=self.calib_batches,
                       **self.settings)
        self._quantized = module
        self._broadcast(trainer, module)
        self.report = quantization_report(module)
        self._log(trainer, self.report, time.perf_counter() - start)

    def _end(self, stage: str) -> None:
        if stage in self.stages and not self.keep_quantized:
            self.restore()

    @staticmethod
    def _broadcast(trainer: pl.Trainer, module: nn.Module) -> None:
        """Every rank takes rank 0's quantized weights and activation ranges."""
        if trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return
        with torch.no_grad():
            for _, layer in quantizable_layers(module):
                torch.distributed.broadcast(layer.weight.data, src=0)
        set_activation_ranges(module, trainer.strategy.broadcast(activation_ranges(module), src=0))

    def _log(self, trainer: pl.Trainer, report: QuantReport, seconds: float) -> None:
        metrics = {"vquant/quant_time_s": seconds, "vquant/weight_time_ms": report.weight_time_s * 1e3,
                   "vquant/probe_time_s": report.probe_time_s, "vquant/layers": float(report.num_layers),
                   "vquant/weights": float(report.num_weights)}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_hyperparams({f"vquant/{k}": v for k, v in self.settings.items()})
                logger.log_metrics(metrics, step=trainer.global_step)
                log_dir = getattr(logger, "log_dir", None)
                if log_dir:
                    os.makedirs(log_dir, exist_ok=True)
                    with open(os.path.join(log_dir, "vquant_report.json"), "w") as f:
                        json.dump(report.to_dict(), f, indent=1)
                add_text = getattr(getattr(logger, "experiment", None), "add_text", None)
                if callable(add_text):
                    add_text("vquant/report", "```\n" + report.table() + "\n```", trainer.global_step)
            if self.verbose:
                rank_zero_info(report.table() + f"\nquantized in {seconds:.2f} s")
