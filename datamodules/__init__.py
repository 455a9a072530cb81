"""Lightning data modules of vquant-pl (installed as `vquant_pl.datamodules`)."""
from .imagenet import (RASTER_FORMATS, ImageFiles, ImageNetDataModule, SkipCountingLoader, image_suffixes,
                       imagenet_synsets, open_image, read_synsets_file)

__all__ = ["RASTER_FORMATS", "ImageFiles", "ImageNetDataModule", "SkipCountingLoader", "image_suffixes",
           "imagenet_synsets", "open_image", "read_synsets_file"]
