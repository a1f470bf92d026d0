"""Quantization passes and the calibration library they share."""
