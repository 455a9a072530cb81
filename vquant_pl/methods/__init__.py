"""Data-free methods: the activation range table (table) and one module per method (sigma,
bn, bn_mse, aciq, channels, bias corrections, equalize, weight_clip) over the shared
BatchNorm graph (bn_graph)."""
