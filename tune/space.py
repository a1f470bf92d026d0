"""What the tuner varies, and the pipeline each configuration stands for.

Two spaces: :class:`Config` for the static ``int8`` pipeline and :class:`WoqConfig` for the weight-only
ones (``w4``, ``w8``); :func:`config_of` picks by the pipeline. Both name the nodes the search *promotes*
(:meth:`promote`) to the more precise, costlier choice: float for int8, 8-bit weights for w4. A w4 layer
has a cheaper step before 8 bits: 4 bits in groups of :data:`FINE_GROUP` (:meth:`WoqConfig.refine`), about
half a bit more per weight where 8 bits cost four.


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
#: the group size a w4 layer is refined to before it is raised to 8 bits (when the pipeline's is coarser)
FINE_GROUP = 32
ALPHAS = (0.9, 0.5, 0.75, 0.0)  # the default first (smooth-quant: measured best on MiniLM)


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

    promote = with_float

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


@dataclass(frozen=True)
class WoqConfig:
    """One weight-only configuration: the algorithm, the group size, the layers refined to 4 bits in groups
    of :data:`FINE_GROUP`, and the layers kept at 8 bits."""

    algo: str = "rtn"
    group_size: int = 128
    wide: tuple[str, ...] = ()  # MatMul node names quantized to 8 bits instead of the pipeline's 4
    fine: tuple[str, ...] = ()  # MatMul node names at 4 bits in groups of FINE_GROUP (not in wide)

    @classmethod
    def of(cls, passes: list[Pass]) -> WoqConfig:
        woq = [p for p in passes if p.name.startswith("woq-")]
        if len(woq) != 1:
            raise NccError("--eval tunes pipelines with one weight-only pass (w4) or static int8 (int8).")
        if woq[0].bits != 4:
            raise NccError(
                "--eval tunes w4 (4-bit weights, some layers raised to 8); w8 has nothing to raise."
            )
        return cls(algo=woq[0].name.removeprefix("woq-"), group_size=woq[0].group_size)

    def promote(self, names) -> WoqConfig:
        return dataclasses.replace(self, wide=tuple(sorted(set(names))))

    def refine(self, names) -> WoqConfig:
        """This configuration with the layers ``names`` at 4 bits in groups of :data:`FINE_GROUP`."""
        return dataclasses.replace(self, fine=tuple(sorted(set(names))))

    def finer(self) -> WoqConfig | None:
        """Every layer in groups of :data:`FINE_GROUP`, or None when the group size is that fine already
        (0 is one group per column: the coarsest)."""
        if 0 < self.group_size <= FINE_GROUP:
            return None
        return dataclasses.replace(self, group_size=FINE_GROUP, fine=())

    @property
    def refined(self) -> list[str]:
        """The layers in groups of :data:`FINE_GROUP` (those of ``fine`` not at 8 bits)."""
        return [name for name in self.fine if name not in self.wide]

    def apply(self, passes: list[Pass]) -> list[Pass]:
        """``passes`` rewritten to run this configuration: the layers in ``wide`` quantized first by an
        8-bit ``woq-rtn``, then those in ``fine`` by the algorithm in groups of :data:`FINE_GROUP` (a
        weight-only pass leaves MatMuls already quantized alone), then the rest."""
        import re

        from ncc.passes.registry import get_pass

        def only(names) -> tuple[str, ...]:
            return tuple(f"^{re.escape(name)}$" for name in names)

        out = []
        for p in passes:
            if p.name.startswith("woq-"):
                cls = get_pass(f"woq-{self.algo}")
                shared = {f.name for f in cls.options()}
                main = cls(**{f.name: getattr(p, f.name) for f in p.options() if f.name in shared})
                main = dataclasses.replace(main, group_size=self.group_size)
                if self.wide:
                    rtn = get_pass("woq-rtn")
                    out.append(
                        rtn(bits=8, group_size=self.group_size, scheme=p.scheme, include=only(self.wide))
                    )
                if self.refined:
                    out.append(dataclasses.replace(main, group_size=FINE_GROUP, include=only(self.refined)))
                p = main
            out.append(p)
        return out

    def at_8_bits(self, passes: list[Pass]) -> list[Pass]:
        """``passes`` with every weight-only layer at 8 bits: the weight-only pass replaced by an 8-bit
        ``woq-rtn`` of this group size (the 8-bit weights a promoted layer gets)."""
        from ncc.passes.registry import get_pass

        out, seen = [], False
        for p in passes:
            if p.name.startswith("woq-"):
                if seen:
                    continue
                seen = True
                p = get_pass("woq-rtn")(bits=8, group_size=self.group_size, scheme=p.scheme)
            out.append(p)
        return out

    def key(self) -> str:
        fields = dataclasses.asdict(self)
        if not self.fine:  # the key configurations without refined layers had before there were any
            del fields["fine"]
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))

    def describe(self, base: WoqConfig | None = None) -> str:
        parts = []
        for name in ("algo", "group_size"):
            value = getattr(self, name)
            if base is None or getattr(base, name) != value:
                parts.append(f"{name.replace('_', '-')}={value}")
        fine = len(self.refined)
        if fine:
            parts.append(f"{fine} in groups of {FINE_GROUP}")
        if self.wide:
            parts.append(f"{len(self.wide)} at 8 bits")
        if not fine and not self.wide:
            parts.append("all 4-bit")
        return " ".join(parts)


def config_of(passes: list[Pass]):
    """The configuration space ``passes`` belongs to, at the user's settings."""
    if any(p.name.startswith("woq-") for p in passes):
        return WoqConfig.of(passes)
    return Config.of(passes)
