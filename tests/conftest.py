# -- numerics helpers for pass tests (tests/passes) ------------------------------------------------

import numpy as _np
import pytest as _pytest


def _ort_feeds(model, seed: int = 0, sym: int = 2) -> dict:
    """Seeded random inputs for ``model``'s graph inputs (symbolic dims become ``sym``)."""
    import onnx_ir as ir

    rng = _np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        dims = [
            d if isinstance(d, int) else sym for d in (value.shape.dims if value.shape is not None else ())
        ]
        dtype = value.dtype.numpy() if value.dtype is not None else _np.dtype(_np.float32)
        if value.dtype == ir.DataType.BOOL:
            feeds[value.name] = _np.asarray(rng.random(dims) < 0.5)
        elif _np.issubdtype(dtype, _np.integer):
            feeds[value.name] = _np.asarray(rng.integers(0, 3, size=dims)).astype(dtype)
        else:
            feeds[value.name] = _np.asarray(rng.standard_normal(dims)).astype(dtype)
    return feeds


def run_ort(model, feeds: dict) -> dict:
    """Run an IR model in onnxruntime (CPU) and return its outputs by name."""
    import onnxruntime as ort
    from ncc.backends.onnx.emit import to_proto

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def assert_same_outputs(before, after, *, atol: float, rtol: float, seeds=(0, 1)) -> None:
    """``before`` and ``after`` give the same outputs (by name, within tolerance) on seeded inputs."""
    for seed in seeds:
        feeds = _ort_feeds(before, seed)
        want, got = run_ort(before, feeds), run_ort(after, feeds)
        assert list(want) == list(got), f"graph outputs changed: {list(want)} -> {list(got)}"
        for name in want:
            _np.testing.assert_allclose(
                got[name], want[name], atol=atol, rtol=rtol, err_msg=f"output {name!r}"
            )


@_pytest.fixture
def same_outputs():
    """Fixture form of :func:`assert_same_outputs` (before, after, *, atol, rtol)."""
    return assert_same_outputs


#: The README example's CNN and its calibration images (real digits), used by CLI tests.
DIGITS_CNN = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "digits_cnn.onnx"
DIGITS_CALIB = DIGITS_CNN.with_name("digits_calib.npz")


def invoke_ncc(*args):
    """``ncc ARGS`` in-process (click's runner: the console script's parsing and error handling); an
    exception the CLI did not turn into an exit code fails the test."""
    from click.testing import CliRunner
    from ncc.tools.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="ncc")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


class Attrs:
    """Node attributes as ``ncc.passes.quant.pairs.node_pairs`` reads them (``get_int``), for tests."""

    def __init__(self, **values):
        self.values = values

    def get_int(self, name, default):
        return self.values.get(name, default)


def ort_calibration_reader(name: str, samples, batch: int = 8):
    """An onnxruntime ``CalibrationDataReader`` feeding ``samples`` to input ``name`` ``batch`` at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{name: samples[i : i + batch]} for i in range(0, len(samples), batch)])

        def get_next(self):
            return next(self.batches, None)

    return Reader()
