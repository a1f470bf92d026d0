"""ONNX node conformance cases through the IR text round trip.

Each case: ModelProto → IR → text (full, inline) → IR → text (must be identical)
→ ModelProto → onnxruntime (or, when onnxruntime cannot run the original
model, onnx.reference) on the case's inputs, compared with the expected outputs
within the case's tolerance. The default (elided) text must round-trip too, and
the round-tripped ModelProto must equal the one emitted straight from the IR.

A case fails only when ncc is at fault; cases neither runtime can run in their
original form are skipped with a reason. The tally is printed at the end.
"""

from __future__ import annotations

import collections
import time
import warnings

import numpy as np
import pytest

pytestmark = pytest.mark.conformance


def _collect():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            return collect_testcases(None)


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else type(err).__name__
    return f"{type(err).__name__}: {first[:160]}"


def _as_float(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "fc" and a.dtype in (np.float16, np.float32, np.float64, np.complex64, np.complex128):
        return a
    if a.dtype.kind in "biu":
        return a
    return a.astype(np.float64)  # bfloat16, float8, ... (ml_dtypes)


def _compare(expected, got, rtol: float, atol: float) -> None:
    if expected is None:
        assert got is None, f"expected None, got {type(got).__name__}"
        return
    if isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)), f"expected a sequence, got {type(got).__name__}"
        assert len(expected) == len(got), f"sequence length {len(got)} != {len(expected)}"
        for e, g in zip(expected, got):
            _compare(e, g, rtol, atol)
        return
    expected = np.asarray(expected)
    got = np.asarray(got)
    np.testing.assert_array_equal(got.shape, expected.shape, err_msg="shape differs")
    if expected.dtype == object or expected.dtype.kind in "SU":
        np.testing.assert_array_equal(got.astype(object), expected.astype(object))
        return
    e, g = _as_float(expected), _as_float(got)
    if e.dtype.kind == "b":
        np.testing.assert_array_equal(g, e)
        return
    np.testing.assert_allclose(g, e, rtol=rtol, atol=atol)


def _to_numpy(x):
    """Data sets may hold protos (for dtypes numpy lacks, sequences, optionals)."""
    import onnx
    from onnx import numpy_helper

    if isinstance(x, onnx.TensorProto):
        return numpy_helper.to_array(x)
    if isinstance(x, onnx.SequenceProto):
        return numpy_helper.to_list(x)
    if isinstance(x, onnx.OptionalProto):
        return numpy_helper.to_optional(x)
    if isinstance(x, list):
        return [_to_numpy(i) for i in x]
    return x


def _run_ort(proto, inputs):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feeds = dict(zip(names, inputs))
    return sess.run(None, feeds)


def _run_reference(proto, inputs):
    from onnx.reference import ReferenceEvaluator

    ref = ReferenceEvaluator(proto)
    names = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    return ref.run(None, dict(zip(names, inputs)))


def _check(runner, proto, case) -> str | None:
    """None when ``runner`` reproduces the expected outputs of every data set, else why not."""
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            for inputs, expected in case.data_sets:
                got = runner(proto, [_to_numpy(i) for i in inputs])
                _compare([_to_numpy(e) for e in expected], list(got), case.rtol, case.atol)
    except Exception as err:  # any failure of the runtime counts as "cannot run"
        return _short(err)
    return None


def _canonical(proto) -> bytes:
    """The serialized proto with every tensor re-encoded one way (raw vs typed fields do not matter)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.ModelProto.FromString(proto.SerializeToString())

    def norm_tensor(t: onnx.TensorProto) -> None:
        fresh = numpy_helper.from_array(numpy_helper.to_array(t), t.name)
        fresh.doc_string = t.doc_string
        fresh.metadata_props.extend(t.metadata_props)
        t.CopyFrom(fresh)

    def norm_graph(g) -> None:
        for t in getattr(g, "initializer", ()):
            norm_tensor(t)
        for node in g.node:
            for a in node.attribute:
                if a.HasField("t"):
                    norm_tensor(a.t)
                for t in a.tensors:
                    norm_tensor(t)
                if a.HasField("g"):
                    norm_graph(a.g)
                for sub in a.graphs:
                    norm_graph(sub)

    norm_graph(proto.graph)
    for f in proto.functions:
        norm_graph(f)
    return proto.SerializeToString(deterministic=True)


def run_case(case) -> tuple[str, str]:
    """(status, detail) with status one of passed-ort, passed-reference, skipped, failed."""
    from ncc.backends.onnx.emit import to_proto
    from ncc.errors import NccError
    from ncc.frontends.onnx import from_proto
    from ncc.ir import parser as parser_module
    from ncc.ir.parser import parse
    from ncc.ir.printer import print_model

    proto = case.model
    try:
        model = from_proto(proto, check=False, source=case.name)
    except NotImplementedError as err:
        return "skipped", f"onnx-ir cannot represent the model: {_short(err)}"
    except NccError as err:
        return "failed", f"frontend: {_short(err)}"
    try:
        text = print_model(model, full=True)
        again = parse(text, filename=case.name)
        if print_model(again, full=True) != text:
            return "failed", "full text changes after parse + print"
        short = print_model(model)
        if print_model(parse(short)) != short:
            return "failed", "default text changes after parse + print"
        parser_module.USE_FAST_PATH = False
        try:
            if print_model(parse(text), full=True) != text:
                return "failed", "the lark-only parse differs from the fast-path parse"
        finally:
            parser_module.USE_FAST_PATH = True
        direct = to_proto(model)
        proto2 = to_proto(again)
    except Exception as err:
        return "failed", f"round trip: {_short(err)}"
    if _canonical(proto2) != _canonical(direct):
        return "failed", "ModelProto after the text round trip differs from the one emitted directly"
    if case.data_sets is None:
        return "skipped", "no data sets"
    if _check(_run_ort, proto, case) is None:
        if (why2 := _check(_run_ort, proto2, case)) is None:
            return "passed-ort", ""
        return "failed", f"onnxruntime runs the original but not the round trip: {why2}"
    if (why_ref := _check(_run_reference, proto, case)) is None:
        if (why2 := _check(_run_reference, proto2, case)) is None:
            return "passed-reference", ""
        return "failed", f"onnx.reference runs the original but not the round trip: {why2}"
    return "skipped", f"onnxruntime and onnx.reference both fail the original: {why_ref}"


def _skip_category(detail: str) -> str:
    return detail.split(":")[0]


def test_onnx_node_conformance(capsys):
    cases = _collect()
    assert len(cases) > 1000, "onnx conformance cases not found"
    start = time.perf_counter()
    tally: collections.Counter[str] = collections.Counter()
    skips: collections.Counter[str] = collections.Counter()
    skipped: list[str] = []
    failures: list[str] = []
    for case in cases:
        status, detail = run_case(case)
        tally[status] += 1
        if status == "skipped":
            skips[_skip_category(detail)] += 1
            skipped.append(f"{case.name}: {detail}")
        elif status == "failed":
            failures.append(f"{case.name}: {detail}")
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nONNX node conformance through the ncc text form ({len(cases)} cases, {elapsed:.0f}s):")
        for status in ("passed-ort", "passed-reference", "skipped", "failed"):
            print(f"  {status:17s} {tally[status]}")
        for reason, n in skips.most_common():
            print(f"    skipped: {n:4d}  {reason}")
        for line in skipped:
            print(f"    SKIPPED {line[:200]}")
        for line in failures[:50]:
            print(f"    FAILED {line}")
    assert not failures, f"{len(failures)} cases fail because of ncc:\n" + "\n".join(failures)
