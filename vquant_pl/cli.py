"""The `vquant` command: LightningCLI for `test`/`validate`/`predict`, plus `sweep`.

    vquant test --config configs/resnet18_w4a4.yaml --data.root /data/imagenet --trainer.devices 4
    vquant sweep configs/quickstart/*.yaml [--out runs/sweep] [--data.root /data/imagenet]
"""
from __future__ import annotations

import sys

from pytorch_lightning.cli import LightningCLI

from .callbacks import VQuantCallback
from .classifier import ImageClassifier
from .datamodules import ImageNetDataModule


class VQuantCLI(LightningCLI):
    """LightningCLI with the quantization callback as the top-level group `quant` and the
    model's preprocessing passed to the data module."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(VQuantCallback, "quant")
        parser.link_arguments("model.preprocessing", "data.preprocessing", apply_on="instantiate")


def make_cli(args: list[str] | None = None, run: bool = True) -> VQuantCLI:
    return VQuantCLI(ImageClassifier, ImageNetDataModule, args=args, run=run,
                     subclass_mode_model=False, subclass_mode_data=False,
                     save_config_kwargs={"overwrite": True},
                     trainer_defaults={"enable_checkpointing": False, "enable_model_summary": False})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "sweep":
        from .sweep import main as sweep_main

        sweep_main(argv[1:])
        return
    make_cli(argv)


if __name__ == "__main__":
    main()
