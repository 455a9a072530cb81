"""`ImageClassifier`: a thin LightningModule that evaluates a plain `nn.Module` classifier."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from ._lightning import LightningModule
from .models import Preprocessing, create_model, load_checkpoint, preprocessing_for


UNLABELED = -1  # the label of an image without one (not counted in the accuracies)


def _metrics(num_classes: int) -> MetricCollection:
    return MetricCollection(compute_groups=False, metrics={
        "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro", ignore_index=UNLABELED),
        "top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro", ignore_index=UNLABELED),
        "loss": MeanMetric(),
        "samples": SumMetric(),
        "skipped": SumMetric(),
    })


class ImageClassifier(LightningModule):
    """Evaluate an image classifier with exact top-1/top-5 (torchmetrics, micro), the mean
    loss, the number of samples and of skipped unreadable images, per epoch, gathered across
    devices: `test/top1`, `test/top5`, `test/loss`, `test/samples`, `test/skipped` (and
    `val/...`). Accuracies are fractions in [0, 1]. `predict_step` returns logits.

    Batches are `(images, labels)`; label -1 marks an unlabeled image (not counted in the
    accuracies). Skipped images are the count of the data module (`ImageNetDataModule.skipped`).
    Fits the Trainer of `lightning` and of `pytorch_lightning` (see `vquant_pl._lightning`).

    Preprocessing: `.preprocessing` is the model's own (what `create_model` attached, a timm
    `pretrained_cfg`, a pytorchcv `in_size`; see `vquant_pl.models.preprocessing_for`), or
    None when the model has none; `ImageNetDataModule` reads it from the Trainer's module.

    Args:
        model: the classifier, or a `vquant_pl.create_model` spec such as
            `pytorchcv:resnet18`, `timm:resnet50`, `efficientnet_lite:lite0` or the path of a
            saved whole model.
        num_classes: number of classes of the logits.
        pretrained: load the pretrained weights of a spec (false: random initialization);
            only for a spec (a module or a model file has its own weights).
        checkpoint: a state_dict file (plain or a Lightning checkpoint's) loaded, with
            `torch.load(weights_only=True)`, on top of the spec's architecture or into the
            given module.
        allow_pickle: let a spec that is a whole pickled model file be unpickled; unpickling
            runs code from the file, so only for files you trust.

    Raises:
        ValueError: `pretrained=False` with a module; a checkpoint that does not fit.
        FileNotFoundError: a missing checkpoint or model file.

    Example:
        >>> import torch, vquant_pl as vq
        >>> clf = vq.ImageClassifier(torch.nn.Linear(4, 3), num_classes=3)
        >>> clf(torch.zeros(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(self, model: nn.Module | str, num_classes: int = 1000, pretrained: bool = True,
                 checkpoint: str | None = None, allow_pickle: bool = False):
        super().__init__()
        if isinstance(model, str):  # a spec for vquant_pl.create_model, e.g. from YAML
            self.save_hyperparameters()
            model, prep = create_model(model, pretrained=pretrained, checkpoint=checkpoint, allow_pickle=allow_pickle)
        else:
            if not pretrained:
                raise ValueError(f"pretrained=False applies to a create_model spec, not to the given "
                                 f"{type(model).__name__} (it has its own weights)")
            if checkpoint is not None:
                load_checkpoint(model, checkpoint)
            prep = preprocessing_for(model)
        self.preprocessing: Preprocessing | None = prep
        self.model = model
        self.num_classes = num_classes
        self.val_metrics = _metrics(num_classes).clone(prefix="val/")
        self.test_metrics = _metrics(num_classes).clone(prefix="test/")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _evaluate(self, batch, metrics: MetricCollection) -> None:
        images, labels = batch[0], batch[1]
        prefix = metrics.prefix
        if len(labels):
            logits = self(images)
            labeled = labels != UNLABELED
            metrics[f"{prefix}top1"].update(logits, labels)
            metrics[f"{prefix}top5"].update(logits, labels)
            if labeled.any():
                metrics[f"{prefix}loss"].update(
                    nn.functional.cross_entropy(logits[labeled], labels[labeled], reduction="none"))
            metrics[f"{prefix}samples"].update(torch.as_tensor(float(len(labels)), device=self.device))

    def _skipped(self, stage: str) -> int:
        """Images the data (module or loaders) of this run skipped on this rank."""
        trainer = self.trainer
        sources = [getattr(trainer, "datamodule", None)]
        loaders = getattr(trainer, f"{stage}_dataloaders", None)
        sources += loaders if isinstance(loaders, (list, tuple)) else [loaders]
        for source in sources:
            count = getattr(source, "skipped", None)
            if isinstance(count, int):
                return count
        return 0

    def _log_epoch(self, metrics: MetricCollection) -> None:
        stage = "val" if metrics.prefix == "val/" else "test"
        metrics[f"{metrics.prefix}skipped"].update(torch.tensor(float(self._skipped(stage)), device=self.device))
        # compute() gathers the states of every rank once (torchmetrics); the values are then
        # identical on all ranks, so Lightning's sync_dist mean leaves them unchanged.
        with warnings.catch_warnings():  # unlabeled images: no loss, which reads nan
            warnings.filterwarnings("ignore", message=".*compute.* was called before the .*update")
            values = metrics.compute()
        self.log_dict({k: v.float() for k, v in values.items()}, sync_dist=True)
        metrics.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    # reset() gives each process fresh state tensors: under ddp_spawn the ones pickled from
    # the parent live in shared memory, and all ranks would add into the same tensor.
    def on_validation_epoch_start(self) -> None:
        self.val_metrics.reset()

    def on_test_epoch_start(self) -> None:
        self.test_metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch(self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_epoch(self.test_metrics)

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images)
