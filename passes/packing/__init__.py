"""Packing passes: lay quantized weights out the way a target's kernels read them."""
