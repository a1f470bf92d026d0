"""Sparsity passes: pattern pruning (``prune``) and channel slimming (``slim``).

Zeros alone buy no speed in dense CPU kernels; structure does. ``prune`` writes zeros in a pattern
(N:M, blocks, unstructured) or removes whole units (channels, FFN neurons, attention heads: zeroed,
with the reading layers refitted on calibration data), and ``slim`` turns units that are exactly zero
into smaller tensors. :mod:`ncc.passes.sparsity.groups` is the analysis both share.
"""
