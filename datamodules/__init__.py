"""Lightning data modules of vquant-pl (installed as `vquant_pl.datamodules`)."""
from .imagenet import ImageFiles, ImageNetDataModule, imagenet_synsets

__all__ = ["ImageFiles", "ImageNetDataModule", "imagenet_synsets"]
