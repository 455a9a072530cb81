"""`python -m vquant_pl.cli`: the `vquant` command."""
import sys

from .app import main

sys.exit(main())
