"""onnxruntime.quantization from the command line, so the benchmarks time it as they time ``ncc compile``.

Both are measured the way a user runs them from a shell: a fresh Python process, imports included.
Imports only numpy and onnxruntime (never the benchmark harness, which pulls in torch).

    python ort_quantize.py static MODEL CALIB.npz OUT [--method MinMax] [--reduce-range] [--op-types MatMul]
                                                      [--batch 8]
    python ort_quantize.py dynamic MODEL OUT [--reduce-range]
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import numpy as np


class NpzReader:
    """onnxruntime ``CalibrationDataReader`` over a calibration ``.npz`` (``batch`` samples per call)."""

    def __init__(self, path: str, batch: int = 1):
        with np.load(path) as npz:
            self.arrays = {k: npz[k] for k in npz.files}
        self.batch = batch
        self.n = len(next(iter(self.arrays.values())))
        self.i = 0

    def get_next(self):
        if self.i >= self.n:
            return None
        feed = {k: v[self.i : self.i + self.batch] for k, v in self.arrays.items()}
        self.i += self.batch
        return feed

    def rewind(self):
        self.i = 0


def static(
    model: str,
    calib: str,
    out: str,
    method: str = "MinMax",
    reduce_range: bool = False,
    op_types: list[str] | None = None,
    batch: int = 1,
) -> None:
    """``quantize_static``: QDQ, per-channel, u8 activations / s8 weights."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(NpzReader, CalibrationDataReader):
        pass

    with contextlib.redirect_stdout(sys.stderr):  # its calibrators print progress on stdout
        quantize_static(
            model,
            out,
            Reader(calib, batch),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            reduce_range=reduce_range,
            calibrate_method=getattr(CalibrationMethod, method),
            op_types_to_quantize=op_types,
        )


def dynamic(model: str, out: str, reduce_range: bool = False) -> None:
    """``quantize_dynamic``, per-channel, s8 weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(model, out, per_channel=True, reduce_range=reduce_range, weight_type=QuantType.QInt8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("static")
    s.add_argument("model")
    s.add_argument("calib")
    s.add_argument("out")
    s.add_argument("--method", default="MinMax")
    s.add_argument("--reduce-range", action="store_true")
    s.add_argument("--op-types", type=lambda v: v.split(","))
    s.add_argument("--batch", type=int, default=1)
    d = sub.add_parser("dynamic")
    d.add_argument("model")
    d.add_argument("out")
    d.add_argument("--reduce-range", action="store_true")
    args = parser.parse_args(argv)
    if args.mode == "static":
        static(args.model, args.calib, args.out, args.method, args.reduce_range, args.op_types, args.batch)
    else:
        dynamic(args.model, args.out, args.reduce_range)
    return 0


if __name__ == "__main__":
    sys.exit(main())
