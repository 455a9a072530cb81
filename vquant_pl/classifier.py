"""`ImageClassifier`: a thin LightningModule that evaluates a plain `nn.Module` classifier."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy


UNLABELED = -1  # the label of an image without one (not counted in the accuracies)


def _metrics(num_classes: int) -> MetricCollection:
    return MetricCollection(compute_groups=False, metrics={
        "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro", ignore_index=UNLABELED),
        "top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro", ignore_index=UNLABELED),
        "loss": MeanMetric(),
        "samples": SumMetric(),
        "skipped": SumMetric(),
    })


class ImageClassifier(pl.LightningModule):
    """Evaluate `model` (a module, or a `create_model` spec such as "pytorchcv:resnet18",
    whose preprocessing is then in `.preprocessing`) with exact top-1/top-5 (torchmetrics, micro), the mean loss, the
    number of samples and of skipped unreadable images, per epoch, gathered across devices
    by torchmetrics: `test/top1`, `test/top5`, `test/loss`, `test/samples`, `test/skipped` (and
    `val/...`). Accuracies are fractions in [0, 1]. `predict_step` returns logits."""

    def __init__(self, model: nn.Module | str, num_classes: int = 1000, pretrained: bool = True,
                 checkpoint: str | None = None):
        super().__init__()
        self.preprocessing = None
        if isinstance(model, str):  # a spec for vquant_pl.create_model, e.g. from YAML
            from .models import create_model

            self.save_hyperparameters()
            model, self.preprocessing = create_model(model, pretrained=pretrained, checkpoint=checkpoint)
        self.model = model
        self.num_classes = num_classes
        self.val_metrics = _metrics(num_classes).clone(prefix="val/")
        self.test_metrics = _metrics(num_classes).clone(prefix="test/")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _evaluate(self, batch, metrics: MetricCollection) -> None:
        images, labels, *rest = batch
        skipped = rest[0] if rest else 0
        prefix = metrics.prefix
        metrics[f"{prefix}skipped"].update(torch.as_tensor(float(skipped), device=self.device))
        if len(labels):
            logits = self(images)
            labeled = labels != UNLABELED
            metrics[f"{prefix}top1"].update(logits, labels)
            metrics[f"{prefix}top5"].update(logits, labels)
            if labeled.any():
                metrics[f"{prefix}loss"].update(
                    nn.functional.cross_entropy(logits[labeled], labels[labeled], reduction="none"))
            metrics[f"{prefix}samples"].update(torch.as_tensor(float(len(labels)), device=self.device))

    def _log_epoch(self, metrics: MetricCollection) -> None:
        # compute() gathers the states of every rank once (torchmetrics); the values are then
        # identical on all ranks, so Lightning's sync_dist mean leaves them unchanged.
        self.log_dict({k: v.float() for k, v in metrics.compute().items()}, sync_dist=True)
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
