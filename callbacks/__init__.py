"""Lightning callbacks of vquant-pl (installed as `vquant_pl.callbacks`)."""
