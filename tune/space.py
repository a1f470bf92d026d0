"""What the tuner varies, and the pipeline each configuration stands for.

A :class:`Config` is a point of the search space of the static ``int8`` pipeline: the calibration
method (``calibrate{method}``), the smooth-quant migration strength (``alpha``; 0 drops the pass), the
weight scale granularity, whether ``correct-bias`` runs, and the ids (:mod:`ncc.ir.ids`) of the compute
nodes kept in float (``insert-qdq{keep-float}``). :meth:`Config.apply` rewrites a base pipeline (the
user's, with their flags) into the one the configuration names, with ``min-cosine`` off: the tuner, not
the calibration-data fallback, chooses float nodes. Its spec string is what a trial compiles and what
the report prints, so any trial can be rebuilt with ``ncc compile --passes``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from ncc.errors import NccError
from ncc.passes.base import Pass

METHODS = ("mse", "minmax", "percentile", "entropy")
ALPHAS = (0.5, 0.25, 0.75, 0.0)


@dataclass(frozen=True)
class Config:
    """One int8 configuration."""

    method: str = "mse"
    alpha: float | None = None  # smooth-quant alpha; None: the pipeline has no smooth-quant
    weights: str = "per-channel"
    bias: bool | None = None  # correct-bias runs; None: the pipeline has none
    keep_float: tuple[str, ...] = ()  # node ids, ascending

    @classmethod
    def of(cls, passes: list[Pass]) -> Config:
        """The configuration ``passes`` (an int8 pipeline) runs with no node kept in float."""
        by_name = {p.name: p for p in passes}
        if "insert-qdq" not in by_name or "calibrate" not in by_name:
            raise NccError(
                "--eval tunes static int8 pipelines (calibrate + insert-qdq), such as --pass int8."
            )
        smooth = by_name.get("smooth-quant")
        return cls(
            method=by_name["calibrate"].method,
            alpha=smooth.alpha if smooth is not None else None,
            weights=by_name["insert-qdq"].weights,
            bias=True if "correct-bias" in by_name else None,
        )

    def with_float(self, ids) -> Config:
        return dataclasses.replace(self, keep_float=tuple(sorted(set(ids), key=int)))

    def apply(self, passes: list[Pass]) -> list[Pass]:
        """``passes`` rewritten to run this configuration."""
        out = []
        for p in passes:
            if p.name == "calibrate":
                p = dataclasses.replace(p, method=self.method)
            elif p.name == "smooth-quant":
                if not self.alpha:
                    continue
                p = dataclasses.replace(p, alpha=self.alpha)
            elif p.name == "insert-qdq":
                p = dataclasses.replace(p, weights=self.weights, keep_float=self.keep_float, min_cosine=0.0)
            elif p.name == "correct-bias" and not self.bias:
                continue
            out.append(p)
        return out

    def key(self) -> str:
        """The configuration as canonical JSON: how the tuning log names it."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    def describe(self, base: Config | None = None) -> str:
        """The knobs (those that differ from ``base``, when given) and the number of float nodes."""
        parts = []
        for name, value in (("method", self.method), ("alpha", self.alpha), ("weights", self.weights)):
            if value is not None and (base is None or getattr(base, name) != value):
                parts.append(f"{name}={value}")
        if self.bias is not None and (base is None or base.bias != self.bias):
            parts.append(f"bias-correction={'on' if self.bias else 'off'}")
        parts.append(f"{len(self.keep_float)} float" if self.keep_float else "all int8")
        return " ".join(parts)
