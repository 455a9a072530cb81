"""Lightning data modules of vquant-pl (installed as `vquant_pl.datamodules`)."""
