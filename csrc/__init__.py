"""C++ and CUDA sources of the SQuant kernels (installed as `vquant_pl.csrc`, built on first use)."""
