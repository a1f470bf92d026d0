"""Calibrated ranges on the IR: what ``calibrate`` leaves for ``smooth-quant`` and ``insert-qdq``.

The statistics (histograms, counts) are calibration data and stay in the cache; what the passes after
``calibrate`` need is small and lives on the graph, as metadata that prints in every dump and parses
back, so a dump taken after ``calibrate`` replays through ``insert-qdq`` (``ncc opt after.ncc --passes
insert-qdq``) and a golden test can state a pass's input ranges in text:

    graph @g(...) -> (...) with {metadata_props = {
        "ncc.calib" = "method=mse levels=256 scheme=asym",
        "ncc.calib/x" = "range=-1.5,3.25",
        "ncc.calib/mask_add" = "range=-3.4028235e+38,0 sentinels=4096",
        "ncc.calib/ln_out" = "range=-8,28 channel_min=-1,-2.5,... channel_max=2,28,..."}}

- ``ncc.calib`` says how the ranges were chosen: the range method (and percentile), the levels and
  scheme they were chosen for (the mse and entropy methods depend on both), and the op types and target
  the observed tensors were chosen for when not the defaults, which ``insert-qdq`` checks against its
  own options.
- ``ncc.calib/NAME`` is one observed float tensor: its range by that method, the number of masking
  sentinels it carried (|x| >= 1e30: an attention mask filled with float32's minimum; such a tensor is
  never quantized), and for the activations ``smooth-quant`` may rescale, the per-channel min and max
  along the last axis.

Graph metadata rather than per-value metadata because ncc's text form prints node and graph metadata;
``insert-qdq`` removes the entries once the ranges have become Q/DQ scales, so no output file carries
them. Numbers print in the shortest form that reads back exactly, so the text is deterministic and a
replayed dump gives the same scales.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError
from ncc.targets import DEFAULT_TARGET

HEADER = "ncc.calib"
PREFIX = "ncc.calib/"


@dataclass
class TensorRange:
    """One observed tensor: its calibrated range, sentinel count and (optionally) per-channel extremes."""

    lo: float
    hi: float
    sentinels: int = 0
    channel_min: np.ndarray | None = None
    channel_max: np.ndarray | None = None

    def text(self) -> str:
        parts = [f"range={_num(self.lo)},{_num(self.hi)}"]
        if self.sentinels:
            parts.append(f"sentinels={self.sentinels}")
        if self.channel_min is not None and self.channel_max is not None:
            parts.append("channel_min=" + ",".join(_num(v) for v in self.channel_min))
            parts.append("channel_max=" + ",".join(_num(v) for v in self.channel_max))
        return " ".join(parts)

    @staticmethod
    def parse(text: str, where: str) -> TensorRange:
        fields = {}
        for part in text.split():
            key, sep, value = part.partition("=")
            if not sep:
                raise NccError(f"{where}: expected key=value, got {part!r}.")
            fields[key] = value
        try:
            lo, hi = (float(v) for v in fields.pop("range").split(","))
            sentinels = int(fields.pop("sentinels", "0"))
            cmin = fields.pop("channel_min", None)
            cmax = fields.pop("channel_max", None)
        except (KeyError, ValueError):
            raise NccError(f"{where}: expected 'range=LO,HI [sentinels=N] ...', got {text!r}.") from None
        if fields:
            raise NccError(f"{where}: unknown field(s) {', '.join(sorted(fields))}.")
        if (cmin is None) != (cmax is None):
            raise NccError(f"{where}: channel_min and channel_max come together.")
        channels = [None, None]
        if cmin is not None:
            try:
                channels = [np.array([float(v) for v in c.split(",")], np.float32) for c in (cmin, cmax)]
            except ValueError:
                raise NccError(f"{where}: channel ranges must be comma-separated numbers.") from None
            if channels[0].shape != channels[1].shape:
                raise NccError(f"{where}: channel_min and channel_max differ in length.")
        return TensorRange(lo, hi, sentinels, channels[0], channels[1])


@dataclass
class CalibratedRanges:
    """The ranges ``calibrate`` chose, keyed by value name (see the module docstring)."""

    method: str
    levels: int
    scheme: str
    percentile: float | None = None
    #: The op types (and target profile) the observed values were chosen for: ``()`` and ``"host"`` are
    #: the defaults, left out of the header.
    op_types: tuple[str, ...] = ()
    target: str = DEFAULT_TARGET
    tensors: dict[str, TensorRange] = field(default_factory=dict)

    def header(self) -> str:
        text = f"method={self.method} levels={self.levels} scheme={self.scheme}"
        text += f" percentile={_num(self.percentile)}" if self.percentile is not None else ""
        text += f" op-types={','.join(self.op_types)}" if self.op_types else ""
        return text + (f" target={self.target}" if self.target != DEFAULT_TARGET else "")

    def describe(self) -> str:
        """The method as the compile report names it."""
        return self.method + (f" (p={_num(self.percentile)})" if self.percentile is not None else "")

    def check_options(
        self,
        pass_name: str,
        *,
        levels: int,
        scheme: str,
        op_types: tuple[str, ...] = (),
        target: str = DEFAULT_TARGET,
    ) -> None:
        """Refuse to quantize with ranges chosen for other levels or another scheme, or observed for other
        op types or another target (``calibrate`` observes only what those let insert-qdq quantize)."""
        if (levels, scheme) != (self.levels, self.scheme):
            raise NccError(
                f"{pass_name} quantizes to {levels} levels, scheme {scheme}, but the ranges were calibrated "
                f"for {self.levels} levels, scheme {self.scheme}: give calibrate the same reduce-range and "
                "scheme options."
            )
        if (sorted(op_types), target) != (sorted(self.op_types), self.target):
            mine, theirs = _selection(op_types, target), _selection(self.op_types, self.target)
            raise NccError(
                f"{pass_name} quantizes {mine}, but the ranges were observed for {theirs}: give calibrate "
                "the same op-types and target options."
            )

    # -- on the graph --------------------------------------------------------------------------------
    def write(self, graph: ir.Graph) -> None:
        clear_ranges(graph)
        graph.metadata_props[HEADER] = self.header()
        for name in sorted(self.tensors):
            graph.metadata_props[PREFIX + name] = self.tensors[name].text()

    @staticmethod
    def read(graph: ir.Graph) -> CalibratedRanges | None:
        header = graph.metadata_props.get(HEADER)
        if header is None:
            return None
        fields = dict(part.partition("=")[::2] for part in header.split())
        try:
            ranges = CalibratedRanges(
                method=fields["method"],
                levels=int(fields["levels"]),
                scheme=fields["scheme"],
                percentile=float(fields["percentile"]) if "percentile" in fields else None,
                op_types=tuple(t for t in fields.get("op-types", "").split(",") if t),
                target=fields.get("target", DEFAULT_TARGET),
            )
        except (KeyError, ValueError):
            raise NccError(
                f"graph metadata {HEADER!r} must read 'method=M levels=N scheme=S [percentile=P] "
                f"[op-types=A,B] [target=T]', got {header!r}."
            ) from None
        for key, text in graph.metadata_props.items():
            if key.startswith(PREFIX):
                name = key[len(PREFIX) :]
                ranges.tensors[name] = TensorRange.parse(text, f"graph metadata {key!r}")
        return ranges


def _selection(op_types: tuple[str, ...], target: str) -> str:
    return f"op types {','.join(op_types) if op_types else 'of the target profile'}, target {target}"


def clear_ranges(graph: ir.Graph) -> None:
    """Remove every calibration entry from ``graph``'s metadata."""
    for key in [k for k in graph.metadata_props if k == HEADER or k.startswith(PREFIX)]:
        del graph.metadata_props[key]


def _num(value: float) -> str:
    """Shortest text that reads back to exactly ``value``: in float32 form when it is a float32 (``0.02``,
    ``-3.4028235e+38``, ``inf``), else Python's shortest float64 repr. Exact, so a dump replays to the
    same scales as the pipeline that wrote it."""
    single = np.float32(value)
    return str(single) if float(single) == float(value) else repr(float(value))
