"""``woq-rtn``: round-to-nearest weight-only quantization, no calibration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ncc.passes.woq.base import WeightOnlyPass
from ncc.passes.woq.kernels import rtn
from ncc.passes.woq.weights import read_weight_t


@dataclass(frozen=True)
class WoqRtn(WeightOnlyPass):
    """Weight-only quantization of MatMul weights by round-to-nearest (per group min/max)."""

    name: ClassVar[str] = "woq-rtn"
    algo: ClassVar[str] = "rtn"

    def quantize_group(self, rewriter, group, stats, spec):
        for use in group:
            wt = read_weight_t(use)
            yield use, wt, rtn(wt, spec), None
