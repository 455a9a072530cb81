"""Lightning callbacks of vquant-pl (installed as `vquant_pl.callbacks`)."""
from .vquant import VQuantCallback

__all__ = ["VQuantCallback"]
