"""The `vquant` command: LightningCLI evaluation (`test`, `validate`, `predict`), the sweep,
`analyze`, the recipe table, `selftest` and `build-kernels`."""
from .app import main

__all__ = ["main"]
