"""Lightning data modules of vquant-pl (installed as `vquant_pl.datamodules`)."""
from .imagenet import ImageFiles, ImageNetDataModule, SkipCountingLoader, image_suffixes, imagenet_synsets

__all__ = ["ImageFiles", "ImageNetDataModule", "SkipCountingLoader", "image_suffixes", "imagenet_synsets"]
