"""The ``insert-qdq`` pass: static INT8 as QuantizeLinear/DequantizeLinear pairs.

Input: a float model and the :class:`~ncc.passes.quant.calibrate.Calibration`
left by ``calibrate``. Output: the same model in the QDQ conventions of
:mod:`ncc.passes.quant` — which every ONNX output format starts from.

Decisions, in order:

1. **Candidates.** Nodes of the selected op types (default: the target
   profile's) in the default domain, minus ``exclude`` (names or regexes),
   restricted to ``include`` when given. A candidate stays float, with the
   reason recorded in ``ncc.quant.skip``, when an activation input or its
   output has no statistics, or carries masking sentinels (|x| >= 1e30, an
   attention mask filled with float32's minimum: clamping it to a finite
   range un-masks the softmax).
2. **Tensors.** A quantized node's activation inputs get a Q/DQ pair, one per
   tensor. Its output gets one too, unless the target runs the op with float
   output (MatMul → MatMulIntegerToFloat on x86) — or unless ``fuse-activation``
   paired the node with a Relu/Clip: then the pair goes after the activation,
   whose range starts at 0, and the runtime folds the activation away.
3. **Shared scales.** Concat inputs and output share one scale; a pass-through
   op (Reshape, Transpose, MaxPool, Flatten, …) whose input is quantized and
   whose output feeds a quantized node gets its input's scale on its output,
   so the runtime runs it on integers.
4. **Weights** are stored int8, symmetric, per output channel (or per tensor);
   Conv/Gemm biases become int32 with scale ``x_scale * w_scale``.

Consumers of a quantized node's output all read the dequantized value (so the
runtime sees one Q after the node and can fuse it); float consumers of a
tensor produced by a float node keep reading the float value.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir
from ncc.errors import NccError
from ncc.ir import ids
from ncc.ir.ops import is_onnx_domain, onnx_opset
from ncc.ir.rewrite import Rewriter, constant_array, constant_tensor, is_constant
from ncc.passes.base import Pass, PassContext, PassResult, node_ids, option, regex
from ncc.passes.quant import fallback, pairs, plan, smooth_quant
from ncc.passes.quant.observers import quant_params
from ncc.passes.quant.ranges import CalibratedRanges, clear_ranges
from ncc.targets import DEFAULT_TARGET, get_target

#: On a quantized node: the float weight and bias it replaced, left in the graph (unused) for
#: ``correct-bias``, which measures against them and removes these entries; ``dce`` drops the tensors.
FLOAT_WEIGHT = "ncc.quant.float_weight"
FLOAT_BIAS = "ncc.quant.float_bias"

_QDTYPE = {"u8": (ir.DataType.UINT8, np.uint8), "s8": (ir.DataType.INT8, np.int8)}


@dataclass(frozen=True)
class InsertQDQ(Pass):
    """Quantize activations and weights to INT8 with Q/DQ pairs, from calibrated ranges."""

    name: ClassVar[str] = "insert-qdq"
    weights: Literal["per-channel", "per-tensor"] = option("per-channel", "weight scale granularity")
    activations: Literal["u8", "s8"] = option("u8", "activation integer type (u8 is the fast x86 path)")
    scheme: Literal["asym", "sym", "scaled"] = option(
        "asym",
        "activation scheme: asym, sym, or scaled (zero point 0: u8 where the range is non-negative, "
        "s8 symmetric elsewhere; TensorFlow's oneDNN kernels)",
    )
    reduce_range: bool = option(False, "use 7 bits (costs accuracy; only for old CPUs without VNNI)")
    op_types: tuple[str, ...] = option((), "op types to quantize (empty: the target profile's)")
    include: tuple[str, ...] = option(
        (), "only quantize nodes whose name matches one of these (regex, searched)", check=regex
    )
    exclude: tuple[str, ...] = option(
        (), "keep nodes whose name matches one of these (regex, searched) in float", check=regex
    )
    keep_float: tuple[str, ...] = option(
        (), "ids (ncc.id) of nodes to keep in float: what the tuner (--eval) chose", check=node_ids
    )
    target: str = option(DEFAULT_TARGET, "target profile")
    quantize_graph_outputs: bool = option(
        False, "quantize tensors that are graph outputs too (they stay float)"
    )
    min_cosine: float = option(
        0.0, "keep the most sensitive nodes in float until outputs reach this cosine (0: off)", min=0, max=1
    )
    max_float: float = option(
        0.1, "largest fraction of quantized compute nodes min-cosine may keep in float", min=0, max=1
    )
    fallback_samples: int = option(8, "calibration samples min-cosine measures on", min=1)
    min_gain: float = option(
        0.05, "a node min-cosine keeps in float must close this fraction of the gap to 1", min=0, max=1
    )
    patience: int = option(
        2, "min-cosine stops after this many fallbacks in a row that gained too little", min=1
    )

    def requires(self, model: ir.Model) -> None:
        plan.refuse_quantized(model)
        if self.op_types:
            plan.check_op_types(self.op_types, plan.ROLES)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        calibration = CalibratedRanges.read(model.graph)
        if calibration is None:
            raise NccError("pass 'insert-qdq' needs calibrated ranges; run 'calibrate' before it.")
        calibration.check_options(
            self.name,
            levels=128 if self.reduce_range else 256,
            scheme=self.scheme,
            op_types=self.op_types,
            target=self.target,
        )
        per_channel, opset_notes = plan.qdq_opset(model, self.weights == "per-channel")
        if self.weights == "per-channel" and not per_channel:  # the opset stays below 13: run per tensor
            result = dataclasses.replace(self, weights="per-tensor").run(model, ctx)
            result.notes[:0] = opset_notes
            return result
        target = get_target(self.target)
        op_types = set(self.op_types or (set(target.static_ops) & set(plan.ROLES)))
        islands = set() if self.op_types else set(target.island_ops)
        warnings = plan.unmatched_warnings(model, include=self.include, exclude=self.exclude)
        if self.min_cosine <= 0:
            result = _Quantizer(self, model, calibration, target, op_types, islands).run()
        else:
            result = self._run_with_fallback(model, ctx, calibration, target, op_types, islands)
        clear_ranges(model.graph)  # the ranges are Q/DQ scales now
        for node in model.graph:  # activations left to the fallback that it did not need to smooth
            node.metadata_props.pop(plan.SMOOTH_LATER, None)
        result.notes[:0] = opset_notes + warnings
        if target.int8_kernels == "onednn" and target.pairwise_int16:
            result.notes.append(
                f"cpu: weights for {target.name} on a CPU without VNNI (this one): kept within oneDNN's int16 pairs "
                "there, exact on every x86 CPU"
            )
        elif not target.pairwise_int16 and (layer := fallback.saturates_here(model)) is not None:
            result.notes.append(
                f"cpu: weights for {target.name} use the full int8 range, which onnxruntime's kernels on this CPU (no "
                f"VNNI) saturate in int16 pairs ({layer.name} first): ncc measures the model with Q/DQ unfused, "
                "as exact integer kernels compute it"
            )
        return result

    def _run_with_fallback(self, model, ctx, calibration, target, op_types, islands) -> PassResult:
        from ncc.metrics import token_masks, worst_output_cosine

        data = ctx.data.get("calibration_data")
        if data is None:
            raise NccError("insert-qdq{min-cosine} needs calibration data (--calib) to measure fidelity.")
        float_model = model.clone()  # every attempt quantizes a copy of it
        outputs = [v.name for v in model.graph.outputs]
        kept = ctx.data.get("float_reference")  # from the calibration run, when it ran on the same samples
        if kept is not None and kept.samples == self.fallback_samples and set(outputs) <= set(kept.outputs):
            feeds, reference = kept.feeds, kept.outputs
        else:
            feeds = fallback.samples(data, self.fallback_samples)
            reference = fallback.run(float_model, feeds, outputs)
        masks = token_masks(feeds)

        weight_codes: dict = {}

        def attempt(
            kept: tuple[str, ...], smoothed: tuple[str, ...] = ()
        ) -> tuple[ir.Model, PassResult, float]:
            candidate = float_model.clone()
            for name in smoothed:
                smooth_quant.smooth_later(candidate, name, calibration)
            result = _Quantizer(
                self,
                candidate,
                calibration,
                target,
                op_types,
                islands,
                weight_codes,
                kept_float=frozenset(kept),
            ).run()
            return (
                candidate,
                result,
                worst_output_cosine(reference, fallback.run(candidate, feeds, outputs), outputs, masks),
            )

        best, result, score = attempt(())
        history = [f"fallback: all quantized: output cosine {score:.5f} (target {self.min_cosine})"]
        first = fallback.edges(best)
        budget = int(self.max_float * len(fallback.candidates(best)))
        kept: tuple[str, ...] = ()  # ids of the nodes min-cosine keeps in float
        smoothed: tuple[str, ...] = ()  # activations smooth-quant left to the fallback, smoothed after all
        names = fallback.labels(float_model)
        later = {
            fallback.node_key(n): n.inputs[0].name
            for n in float_model.graph
            if plan.SMOOTH_LATER in n.metadata_props
        }
        misses = 0

        def gains(cand_score: float) -> bool:
            # a float node (or a Mul) costs speed: take it only if it buys a real share of what is missing
            return cand_score - score >= self.min_gain * (1.0 - score)

        def try_node(key: str) -> None:
            nonlocal best, result, score, kept, smoothed, misses
            name = names.get(key, f"#{key}")
            if later.get(key) is not None and later[key] not in smoothed:
                # first the cheaper move: smooth the node's input through a Mul, the node staying int8
                candidate, cand_result, cand_score = attempt(kept, (*smoothed, later[key]))
                if gains(cand_score):
                    best, result, score = candidate, cand_result, cand_score
                    smoothed += (later[key],)
                    misses = 0
                    history.append(
                        f"fallback: {name}'s input smoothed through a Mul: output cosine {cand_score:.5f}"
                    )
                    return
                history.append(f"fallback: {name}'s input smoothed gives {cand_score:.5f}")
                if len(kept) >= budget:  # no float move left: the smoothing was this node's only chance
                    misses += 1
                    return
            if len(fallback.candidates(best)) <= 1:  # the last quantized node: in float nothing would be int8
                history.append(f"fallback: {name} stays quantized: it is the last int8 node")
                misses += 1
                return
            kept += (key,)
            candidate, cand_result, cand_score = attempt(kept, smoothed)
            if gains(cand_score):
                best, result, score = candidate, cand_result, cand_score
                misses = 0
                history.append(f"fallback: + {name} in float: output cosine {cand_score:.5f}")
            else:
                kept = kept[:-1]
                misses += 1
                history.append(f"fallback: {name} stays quantized: in float it gives {cand_score:.5f}")

        # The edges (a stem seeing the raw input, a head producing the output) are tried even when the
        # target is met: one layer each, and they often carry a large share of the error. The rest,
        # ranked by measured sensitivity, only while the outputs are below the target.
        for key in first[:budget]:
            try_node(key)

        def stopped() -> str:
            return (
                f"fallback: stopped after {misses} fallbacks in a row gained less than {self.min_gain:.0%} of "
                "the gap to 1: the error is spread, not in a few nodes"
            )

        if score < self.min_cosine and misses >= self.patience:
            history.append(stopped())
        elif score < self.min_cosine and (len(kept) < budget or later):
            for key in fallback.rank(float_model, best, feeds):
                if key in first or (len(kept) >= budget and later.get(key) in (None, *smoothed)):
                    continue  # an edge, tried above; or, with no float move left, nothing cheaper to try here
                try_node(key)
                if score >= self.min_cosine:
                    break
                if misses >= self.patience:
                    history.append(stopped())
                    break
        _adopt(model, best)
        result.notes[:0] = history
        result.stats["output cosine (calibration)"] = round(score, 5)
        return result


def _adopt(model: ir.Model, source: ir.Model) -> None:
    """Make ``model`` (the object the pass manager holds) carry ``source``'s graph."""
    model.graph = source.graph
    for key, value in source.meta.items():
        model.meta[key] = value


class _Quantizer:
    def __init__(
        self,
        options: InsertQDQ,
        model: ir.Model,
        calibration,
        target,
        op_types: set[str],
        islands: set[str],
        weight_codes: dict | None = None,
        kept_float: frozenset[str] = frozenset(),
    ):
        self.o, self.model, self.graph, self.cal, self.target = (
            options,
            model,
            model.graph,
            calibration,
            target,
        )
        self.kept_float = kept_float  # ids of the nodes min-cosine keeps in float
        #: (weight, axis, op, floor) -> (int8 codes, scales): shared by min-cosine's attempts, which
        #: quantize copies of one float model with one calibration
        self.weight_codes = {} if weight_codes is None else weight_codes
        self.op_types, self.islands = op_types, islands
        self.levels = 128 if options.reduce_range else 256
        self.need: dict[str, ir.Value] = {}  # tensors to quantize, by name
        self.quantized_producer: set[str] = set()  # tensors whose producer runs quantized
        self.parent: dict[str, str] = {}  # union-find: tensors sharing one scale
        self.params: dict[str, tuple[np.float32, int]] = {}
        self.dtypes: dict[str, tuple[ir.DataType, type]] = {}  # tensor -> its integer type (IR, numpy)
        self.weights: dict[tuple[str, int], tuple[ir.Value, np.ndarray]] = {}  # (name, axis) -> (dq, scales)
        self.counts: Counter = Counter()
        self.skips: Counter = Counter()
        self.rw = Rewriter(model, model.graph)

    # -- 1. which nodes ------------------------------------------------------------------------
    def run(self) -> PassResult:
        quantized: list[ir.Node] = []
        # the user's reasons first, then the plan's (an island op next to no integer kernel is never
        # observed by calibrate, so this comes before any reason found in the statistics)
        for node, reason in plan.select(
            self.graph,
            self.target,
            self.op_types,
            self.islands,
            chosen=self._chosen_float,
            checked=self._reason_to_skip,
            integer_output=self._output_quantized,
        ):
            if reason:
                node.metadata_props["ncc.quant.skip"] = reason
                self.skips[f"{node.op_type}: {reason.split(':')[0]}"] += 1
            else:
                quantized.append(node)
        if not quantized:
            raise NccError(
                f"nothing to quantize: no node of the selected op types ({', '.join(sorted(self.op_types))}) "
                "can run in INT8 in this model."
            )
        quantized_ids = {id(n) for n in quantized}
        for node in quantized:
            self._plan_node(node, quantized_ids)
        self._plan_passthrough(quantized_ids)
        self._decide_params(quantized_ids)
        for node in quantized:
            self._quantize_weights(node)
            node.metadata_props["ncc.quant"] = "int8"
            self.counts[node.op_type] += 1
        self._insert_pairs()
        stats = {f"{op} quantized": n for op, n in sorted(self.counts.items())}
        stats["tensors quantized"] = len(self.need)
        notes = [f"kept in float: {n}x {why}" for why, n in sorted(self.skips.items())]
        return PassResult(modified=True, stats=stats, notes=notes)

    def _output(self, node: ir.Node) -> ir.Value:
        act = plan.fused_activation(node)
        return (act or node).outputs[0]

    def _output_quantized(self, node: ir.Node) -> bool:
        if node.op_type in self.target.float_output_ops:
            return False
        return self.o.quantize_graph_outputs or not self._output(node).is_graph_output()

    def _chosen_float(self, node: ir.Node) -> str | None:
        """Why a pass before, the user or min-cosine keeps ``node`` in float, if one does."""
        if reason := node.metadata_props.get(plan.KEEP_FLOAT):
            return reason
        if self.o.include and not plan.matches(node, self.o.include):
            return "not matched by include"
        if pattern := plan.matches(node, self.o.exclude):
            return f"excluded by {pattern!r}"
        if node.metadata_props.get(ids.ID_KEY) in self.kept_float:
            return "excluded by min-cosine"
        if node.metadata_props.get(ids.ID_KEY) in self.o.keep_float:
            return "kept in float by keep-float (the tuner's choice)"
        return None

    def _reason_to_skip(self, node: ir.Node) -> str | None:
        """Why ``node`` cannot run quantized: a weight that is not constant, or what its statistics say."""
        role = plan.ROLES[node.op_type]
        if role.weight is not None:
            w = node.inputs[role.weight] if role.weight < len(node.inputs) else None
            if not is_constant(w):
                return "weight is not a constant"
        tensors = [node.inputs[i] for i in plan.activation_inputs(node)]
        if self._output_quantized(node):
            tensors.append(self._output(node))
        for value in tensors:
            if is_constant(value):
                continue
            stats = self.cal.tensors.get(value.name)
            if stats is None:
                return f"no calibration statistics for {value.name}"
            if stats.sentinels:
                return f"masking sentinels in {value.name} (|x| >= 1e30)"
            if value.dtype != ir.DataType.FLOAT:
                return f"{value.name} is not float32"
        return None

    # -- 2./3. which tensors, which share a scale ------------------------------------------------
    def _plan_node(self, node: ir.Node, quantized_ids: set[int]) -> None:
        inputs = plan.activation_inputs(node)
        for i in inputs:
            self.need[node.inputs[i].name] = node.inputs[i]
        if self._output_quantized(node):
            out = self._output(node)
            self.need[out.name] = out
            self.quantized_producer.add(out.name)
            if plan.ROLES[node.op_type].shared:
                for i in inputs:
                    self._union(node.inputs[i].name, out.name)

    def _plan_passthrough(self, quantized_ids: set[int]) -> None:
        for node in self.graph:
            if not is_onnx_domain(node) or node.op_type not in self.target.passthrough_ops or not node.inputs:
                continue
            src, out = node.inputs[0], node.outputs[0]
            if src is None or src.name not in self.need or out.name not in self.cal.tensors:
                continue
            users = [u.node for u in out.uses()]
            if users and all(
                id(u) in quantized_ids or u.op_type in self.target.passthrough_ops for u in users
            ):
                self.need[out.name] = out
                self.quantized_producer.add(out.name)
                self._union(src.name, out.name)
                node.metadata_props["ncc.quant"] = "int8"

    def _find(self, name: str) -> str:
        while self.parent.get(name, name) != name:
            name = self.parent[name]
        return name

    def _union(self, a: str, b: str) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self.parent[rb] = ra

    def _decide_params(self, quantized_ids: set[int]) -> None:
        groups: dict[str, list[str]] = {}
        for name in self.need:
            groups.setdefault(self._find(name), []).append(name)
        symmetric = self.o.scheme == "sym"
        for members in groups.values():
            ranges = [self._range(self.need[m], symmetric) for m in members]
            lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
            dtype, sym = self.o.activations, symmetric
            if self.o.scheme == "scaled":  # zero point 0: u8 on [0, hi], else s8 on [-A, A] ...
                dtype, sym = ("u8", False) if lo >= 0 else ("s8", True)
                if lo < 0 and self._zero_point_folds(members, quantized_ids):  # ... or u8 its readers fold
                    dtype, sym = "u8", False
            params = self._fixed_params(members, lo, hi, dtype) or quant_params(
                lo, hi, dtype=dtype, symmetric=sym, reduce_range=self.o.reduce_range
            )
            for m in members:
                self.params[m] = params
                self.dtypes[m] = _QDTYPE[dtype]

    def _fixed_params(
        self, members: list[str], lo: float, hi: float, dtype: str
    ) -> tuple[np.float32, int] | None:
        """The grid the target's kernel fixes for the op writing one of ``members`` (:attr:`TargetProfile.
        fixed_outputs`), when the tensors sharing it stay within that grid's range; else None."""
        if self.o.reduce_range:  # the kernels' grids are 8-bit
            return None
        fixed = {op: (scale, zero) for op, scale, zero in self.target.fixed_outputs}
        for name in members:
            producer = self.need[name].producer()
            if producer is None or producer.op_type not in fixed:
                continue
            scale, zero = fixed[producer.op_type]
            if lo >= -zero * scale and hi <= (256 - zero) * scale:  # the kernel saturates the last step
                return np.float32(scale), zero if dtype == "u8" else zero - 128
        return None

    def _zero_point_folds(self, members: list[str], quantized_ids: set[int]) -> bool:
        """Whether the tensors ``members`` (one scale) can carry a zero point under the ``scaled`` scheme:
        none is written by an integer kernel (those requantize without one) and every integer reader is a
        1x1 convolution without padding or a linear, whose bias absorbs ``-zp * s * sum(w)`` exactly."""
        for name in members:
            if name in self.quantized_producer:
                return False
            for use in self.need[name].uses():
                node = use.node
                if id(node) not in quantized_ids:
                    continue  # read in float
                if use.idx != 0 or not _folds_zero_point(node):
                    return False
        return True

    def _range(self, value: ir.Value, symmetric: bool) -> tuple[float, float]:
        if is_constant(value):
            array = constant_array(value)
            return float(array.min(initial=0.0)), float(array.max(initial=0.0))
        producer = value.producer()
        lo, hi = self.cal.tensors[value.name].lo, self.cal.tensors[value.name].hi
        if producer is not None and producer.op_type in plan.ACTIVATIONS:
            lo = max(lo, 0.0)  # Relu/Clip output: keep zero point at 0 so the runtime drops the activation
        return lo, hi

    # -- 4. weights and biases -------------------------------------------------------------------
    def _quantize_weights(self, node: ir.Node) -> None:
        role = plan.ROLES[node.op_type]
        weight_inputs = [role.weight] if role.weight is not None else []
        if node.op_type == "MatMul":
            weight_inputs = [i for i in (0, 1) if is_constant(node.inputs[i])]
        weight_scales = None
        for i in weight_inputs:
            w = node.inputs[i]
            rank = len(constant_tensor(w).shape)
            axis = plan.weight_axis(node, i, rank) if self.o.weights == "per-channel" and rank > 1 else None
            dq, scales = self._weight_dq(w, axis, node, self._bias_floor(node, role, axis))
            node.replace_input_with(i, dq)
            if i == role.weight:
                weight_scales = scales
                node.metadata_props[FLOAT_WEIGHT] = w.name  # kept (unused) for correct-bias's float twin
        if (
            weight_scales is not None
            and role.bias is not None
            and role.bias < len(node.inputs)
            and node.inputs[role.bias] is not None
        ):
            self._quantize_bias(node, role, weight_scales)

    def _bias_floor(self, node: ir.Node, role: plan.Role, axis: int | None) -> np.ndarray | float:
        """Smallest weight scale that keeps the int32 bias ``b / (x_scale * w_scale)`` in range.

        Channels with (nearly) dead weights — EfficientNet-Lite0 has weights of 1e-9 beside biases of
        order 1 — would otherwise overflow int32; their weights quantize to 0, as they should.
        """
        if role.bias is None or role.bias >= len(node.inputs) or node.inputs[role.bias] is None:
            return 0.0
        bias, x = node.inputs[role.bias], node.inputs[role.activations[0]]
        if not is_constant(bias) or x.name not in self.params:
            return 0.0
        b = np.abs(constant_array(bias).astype(np.float32))
        floor = b / (np.float32(self.params[x.name][0]) * np.float32(2**30))
        return floor if axis is not None and floor.ndim == 1 else float(floor.max(initial=0.0))

    def _weight_dq(
        self, w: ir.Value, axis: int | None, node: ir.Node, floor: np.ndarray | float = 0.0
    ) -> tuple[ir.Value, np.ndarray]:
        key = (w.name, -1 if axis is None else axis)
        if key in self.weights:
            return self.weights[key]
        code_key = (
            w.name,
            axis,
            node.op_type,
            node.attributes.get_int("group", 1),
            node.attributes.get_int("transB", 0),
            np.asarray(floor, np.float32).tobytes(),
            halved := self._halved(node),
        )
        if code_key not in self.weight_codes:
            self.weight_codes[code_key] = self._weight_codes(w, axis, node, floor, halved)
        q, scales = self.weight_codes[code_key]
        wq = self.rw.constant(q, f"{w.name}_quantized")
        ws = self.rw.constant(scales, f"{w.name}_scale")
        wz = self.rw.constant(np.zeros(scales.shape, np.int8), f"{w.name}_zero_point")
        self.rw.set_insertion_point(node)
        dq = self._dequantize([wq, ws, wz], {"axis": axis} if axis is not None else {}, w)
        self.weights[key] = (dq, scales)
        return dq, scales

    def _weight_codes(
        self, w: ir.Value, axis: int | None, node: ir.Node, floor: np.ndarray | float, halved: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Symmetric int8 codes of ``w`` (per channel along ``axis``) and their float32 scales; ``halved``:
        the kernel halves them (:meth:`_halved`), so they keep 7 bits."""
        array = constant_array(w)
        qmax = 63 if self.o.reduce_range or halved else 127
        layout = None
        if self.target.pairwise_int16 and qmax > 63:
            layout = pairs.node_pairs(node.op_type, array.shape, node.attributes, self.target.int8_kernels)
            qmax = 127 if layout is not None else 63  # the pairs are not known: ±63 is always safe
        return pairs.symmetric_int8(array, axis, qmax=qmax, floor=floor, pairs=layout)

    def _halved(self, node: ir.Node) -> bool:
        """Whether the kernel will halve ``node``'s weights (:attr:`TargetProfile.signed_conv_halves_weights`):
        a convolution reading s8 activations on such a target, for a CPU that pairs."""
        if not (
            self.target.pairwise_int16 and self.target.signed_conv_halves_weights and node.op_type == "Conv"
        ):
            return False
        x = node.inputs[0]
        return x is not None and x.name in self.dtypes and self.dtypes[x.name][1] is np.int8

    def _quantize_bias(self, node: ir.Node, role: plan.Role, w_scales: np.ndarray) -> None:
        bias = node.inputs[role.bias]
        x = node.inputs[role.activations[0]]
        tensor = constant_tensor(bias)
        if tensor is None or x.name not in self.params or len(tensor.shape) != 1:
            return
        if node.op_type == "Gemm" and node.attributes.get_float("beta", 1.0) != 1.0:
            return
        scale = (np.float32(self.params[x.name][0]) * w_scales).astype(np.float32)
        array = tensor.numpy().astype(np.float32)
        if scale.size not in (1, array.size):
            return
        q = np.clip(np.rint(array / scale), -(2**31), 2**31 - 1).astype(np.int32)
        bs_array = np.broadcast_to(scale, array.shape).copy() if scale.size > 1 else scale.reshape(())
        bq = self.rw.constant(q, f"{bias.name}_quantized")
        bs = self.rw.constant(bs_array, f"{bias.name}_scale")
        bz = self.rw.constant(np.zeros(bs_array.shape, np.int32), f"{bias.name}_zero_point")
        self.rw.set_insertion_point(node)
        dq = self._dequantize([bq, bs, bz], {"axis": 0} if scale.size > 1 else {}, bias)
        node.replace_input_with(role.bias, dq)
        node.metadata_props[FLOAT_BIAS] = bias.name

    # -- rewrite ---------------------------------------------------------------------------------
    def _insert_pairs(self) -> None:
        rw = self.rw
        for name, value in self.need.items():
            if is_constant(value):
                self._quantize_constant_input(value)
                continue
            scale, zp = self.params[name]
            qtype, qnp = self.dtypes[name]
            s = rw.constant(np.array(scale, np.float32), f"{name}_scale")
            z = rw.constant(np.array(zp, qnp), f"{name}_zero_point")
            producer = value.producer()
            if producer is not None:
                rw.set_insertion_point(producer, after=True)
            else:
                rw.set_insertion_point(next(iter(self.graph)))
            q = self._create("QuantizeLinear", [value, s, z], {}, f"{name}_quantized")
            q.type, q.shape = ir.TensorType(qtype), value.shape
            dq = self._dequantize([q, s, z], {}, value)
            if name in self.quantized_producer:  # every reader takes the dequantized value, outputs too
                rw.replace_all_uses(value, dq, keep=[q.producer()], renamed="float")
                self._keep_readers_float(dq, q, scale, np.array(zp, qnp))
            else:
                rw.replace_uses_if(value, dq, _quantized)

    def _keep_readers_float(self, dq: ir.Value, q: ir.Value, scale, zp: np.ndarray) -> None:
        """Float Conv/Gemm readers of ``dq`` read it through their own per-axis DequantizeLinear.

        onnxruntime's WeightBiasQuantization gives any float Conv, ConvTranspose or Gemm whose input 0
        comes from a per-tensor DequantizeLinear per-tensor int8 weights, so a layer ncc keeps in float
        (``--exclude``, min-cosine) would run quantized after all. A per-axis DequantizeLinear (the same
        scale repeated along the channel axis: the same values) is not per-tensor, so the layer stays
        float. Needs opset 13 (per-axis DequantizeLinear) and a known channel count."""
        readers = [
            (node, index)
            for node, index in dq.uses()
            if index == 0
            and node.op_type in ("Conv", "ConvTranspose", "Gemm")
            and is_onnx_domain(node)
            and not _quantized(node)
            and not (node.op_type == "Gemm" and node.attributes.get_int("transA", 0))
        ]
        shape = dq.shape
        if not readers or shape is None or len(shape) < 2 or not isinstance(shape[1], int):
            return
        if onnx_opset(self.model) < 13:
            return
        channels = shape[1]
        s = self.rw.constant(np.full(channels, scale, np.float32), f"{dq.name}_channel_scale")
        z = self.rw.constant(np.full(channels, zp, zp.dtype), f"{dq.name}_channel_zero_point")
        self.rw.set_insertion_point(dq.producer(), after=True)
        float_dq = self._create("DequantizeLinear", [q, s, z], {"axis": 1}, f"{dq.name}_float")
        float_dq.type, float_dq.shape = dq.type, dq.shape
        for node, index in readers:
            node.replace_input_with(index, float_dq)

    def _quantize_constant_input(self, value: ir.Value) -> None:
        """A constant operand of Add/Mul/MatMul-with-two-activations: stored quantized per tensor."""
        scale, zp = self.params[value.name]
        qnp = self.dtypes[value.name][1]
        array = constant_array(value).astype(np.float32)
        info = np.iinfo(qnp)
        q = np.clip(np.rint(array / scale) + zp, info.min, info.max).astype(qnp)
        users = [u.node for u in value.uses() if _quantized(u.node)]
        if not users:
            return
        wq = self.rw.constant(q, f"{value.name}_quantized")
        s = self.rw.constant(np.array(scale, np.float32), f"{value.name}_scale")
        z = self.rw.constant(np.array(zp, qnp), f"{value.name}_zero_point")
        self.rw.set_insertion_point(users[0])
        dq = self._dequantize([wq, s, z], {}, value)
        self.rw.replace_uses_if(value, dq, _quantized)

    def _dequantize(self, inputs: list[ir.Value], attrs: dict, like: ir.Value) -> ir.Value:
        """``DequantizeLinear(inputs)`` at the insertion point, named and typed after the float ``like``."""
        dq = self._create("DequantizeLinear", inputs, attrs, f"{like.name}_dequantized")
        dq.type, dq.shape = like.type, like.shape
        return dq

    def _create(self, op: str, inputs: list[ir.Value], attrs: dict, out_name: str) -> ir.Value:
        """A node at the insertion point with one output ``out_name``; the node is named ``<out_name>_node``."""
        rw = self.rw
        node = rw.create(
            op, inputs, attrs, name=rw.fresh_name(f"{out_name}_node"), output_names=[rw.fresh_name(out_name)]
        )
        return node.outputs[0]


def _folds_zero_point(node: ir.Node) -> bool:
    """A 1x1 Conv without padding or groups, or a Gemm/MatMul with a constant weight (input 1)."""
    if node.op_type == "Conv":
        a = node.attributes
        kernel = a.get_ints("kernel_shape", None) or (
            list(node.inputs[1].shape[2:]) if node.inputs[1] is not None and node.inputs[1].shape else [0]
        )
        return (
            all(k == 1 for k in kernel)
            and not any(a.get_ints("pads", []))
            and a.get_string("auto_pad", "NOTSET") in ("NOTSET", "VALID")
            and a.get_int("group", 1) == 1
        )
    if node.op_type == "Gemm":
        return not node.attributes.get_int("transA", 0) and is_constant(node.inputs[1])
    return node.op_type == "MatMul" and is_constant(node.inputs[1])


def _quantized(node: ir.Node) -> bool:
    return node.metadata_props.get("ncc.quant") == "int8"
