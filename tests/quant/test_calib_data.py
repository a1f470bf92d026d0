"""Loading, batching, hashing and validating calibration data; every user error is one exact sentence."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
from ncc.errors import NccError
from ncc.passes.quant.calib_data import load_calibration_data, validate

INPUTS = {"x": (np.dtype(np.float32), [None, 3, 4]), "ids": (np.dtype(np.int64), ["N", 5])}


def _samples(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 3, 4)).astype(np.float32), "ids": rng.integers(0, 9, (n, 5))}


def _gather(batches) -> dict[str, np.ndarray]:
    batches = list(batches)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_npz_file_streams_batches(tmp_path):
    data = _samples(11)
    np.savez(tmp_path / "c.npz", **data)
    calib = validate(load_calibration_data(str(tmp_path / "c.npz")), INPUTS)
    assert calib.num_samples == 11
    batches = list(calib.batches(4))
    assert [b["x"].shape[0] for b in batches] == [4, 4, 3]
    got = _gather(batches)
    for k in data:
        np.testing.assert_array_equal(got[k], data[k])


def test_npz_compressed_and_chunked(tmp_path, monkeypatch):
    import ncc.passes.quant.calib_data as cd

    monkeypatch.setattr(cd, "_CHUNK_BYTES", 200)  # force many small reads from the zip members
    data = _samples(9)
    np.savez_compressed(tmp_path / "c.npz", **data)
    calib = load_calibration_data(str(tmp_path / "c.npz"))
    assert len(list(calib.pieces())) > 3
    got = _gather(calib.batches(5))
    np.testing.assert_array_equal(got["x"], data["x"])


def test_folder_sorted_and_max_samples(tmp_path):
    a, b = _samples(3, seed=1), _samples(4, seed=2)
    np.savez(tmp_path / "b.npz", **b)
    np.savez(tmp_path / "a.npz", **a)
    (tmp_path / "notes.txt").write_text("ignored")
    calib = load_calibration_data(str(tmp_path))
    assert calib.num_samples == 7
    got = _gather(calib.batches(2))
    np.testing.assert_array_equal(got["x"], np.concatenate([a["x"], b["x"]]))
    limited = load_calibration_data(str(tmp_path), max_samples=5)
    assert limited.num_samples == 5
    assert _gather(limited.batches(8))["x"].shape[0] == 5


def test_module_file_function(tmp_path):
    (tmp_path / "mycalib.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            def make():
                for seed in range(3):
                    rng = np.random.default_rng(seed)
                    yield {"x": rng.standard_normal((2, 3, 4)).astype(np.float32), "ids": np.zeros((2, 5), np.int64)}
            """
        )
    )
    calib = validate(load_calibration_data(f"{tmp_path / 'mycalib.py'}:make"), INPUTS)
    assert calib.num_samples is None
    assert [b["x"].shape[0] for b in calib.batches(4)] == [4, 2]
    assert calib.digest() == load_calibration_data(f"{tmp_path / 'mycalib.py'}:make").digest()


def test_package_module_function(tmp_path, monkeypatch):
    pkg = tmp_path / "calibpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "reader.py").write_text(
        "import numpy as np\ndef samples():\n    return [{'x': np.ones((1, 3, 4), np.float32), 'ids': np.ones((1, 5), np.int64)}]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    calib = validate(load_calibration_data("calibpkg.reader:samples"), INPUTS)
    assert _gather(calib.batches(8))["x"].shape == (1, 3, 4)
    sys.modules.pop("calibpkg.reader", None)
    sys.modules.pop("calibpkg", None)


def test_digest_tracks_content(tmp_path):
    data = _samples(5)
    np.savez(tmp_path / "a.npz", **data)
    np.savez(tmp_path / "b.npz", **data)
    data["x"][2, 1, 1] += 1e-3
    np.savez(tmp_path / "c.npz", **data)
    da, db, dc = (load_calibration_data(str(tmp_path / f"{n}.npz")).digest() for n in "abc")
    assert da == db != dc
    assert load_calibration_data(str(tmp_path / "a.npz"), max_samples=4).digest() != da
    assert len(da) == 64


# -- errors -----------------------------------------------------------------------------------------


def _error(spec: str, inputs=INPUTS, **kw) -> str:
    with pytest.raises(NccError) as info:
        data = load_calibration_data(spec, **kw)
        validate(data, inputs)
        list(data.batches(2))
    return str(info.value)


def test_error_names(tmp_path):
    np.savez(tmp_path / "c.npz", x=_samples(2)["x"], mask=np.ones((2, 5), np.int64))
    spec = str(tmp_path / "c.npz")
    assert _error(spec) == (
        f"calibration data {spec} has inputs ['mask', 'x'] but the model expects ['ids', 'x'] "
        "(missing 'ids'; unexpected 'mask')."
    )


def test_error_dtype(tmp_path):
    data = _samples(2)
    np.savez(tmp_path / "c.npz", x=data["x"].astype(np.float64), ids=data["ids"])
    spec = str(tmp_path / "c.npz")
    assert _error(spec) == (
        f"calibration input 'x' in {spec} is float64 but the model expects float32; cast it with .astype(np.float32)."
    )


def test_error_shape_and_rank(tmp_path):
    data = _samples(2)
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 3, 7), np.float32), ids=data["ids"])
    spec = str(tmp_path / "c.npz")
    assert _error(spec) == (
        f"calibration input 'x' in {spec} has shape [2, 3, 7] but the model expects [?, 3, 4]: dimension 2 is 7, expected 4."
    )
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 12), np.float32), ids=data["ids"])
    spec = str(tmp_path / "d.npz")
    assert _error(spec) == (
        f"calibration input 'x' in {spec} has shape [2, 12] (2 dimensions) but the model expects [?, 3, 4] (3 dimensions)."
    )


def test_error_in_a_later_batch(tmp_path):
    np.savez(tmp_path / "a.npz", **_samples(2))
    bad = _samples(2)
    bad["ids"] = bad["ids"].astype(np.int32)
    np.savez(tmp_path / "b.npz", **bad)
    calib = validate(load_calibration_data(str(tmp_path)), INPUTS)  # the first file is fine
    with pytest.raises(NccError, match=r"calibration input 'ids' .* is int32 but the model expects int64"):
        list(calib.batches(1))


def test_error_empty(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((0, 3, 4), np.float32), ids=np.zeros((0, 5), np.int64))
    spec = str(tmp_path / "c.npz")
    assert _error(spec) == f"calibration data {spec} is empty: it holds no samples."
    (tmp_path / "empty").mkdir()
    assert (
        _error(str(tmp_path / "empty")) == f"calibration folder {tmp_path / 'empty'} contains no .npz files."
    )
    (tmp_path / "none.py").write_text("def f():\n    return []\n")
    spec = f"{tmp_path / 'none.py'}:f"
    assert _error(spec) == f"calibration data {spec} is empty: it holds no samples."


def test_error_unreadable_and_missing(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"this is not a zip file")
    spec = str(tmp_path / "bad.npz")
    assert _error(spec) == f"cannot read calibration data {spec}: File is not a zip file."
    spec = str(tmp_path / "gone.npz")
    assert _error(spec) == f"calibration data {spec} does not exist."
    (tmp_path / "c.csv").write_text("1,2")
    spec = str(tmp_path / "c.csv")
    assert (
        _error(spec)
        == f"calibration data {spec} is not a .npz file, a folder of .npz files or module:function."
    )
    np.savez(tmp_path / "uneven.npz", x=np.zeros((2, 3, 4), np.float32), ids=np.zeros((3, 5), np.int64))
    spec = str(tmp_path / "uneven.npz")
    assert (
        _error(spec) == f"calibration data {spec} has a different number of samples per input (ids: 3, x: 2)."
    )


def test_error_module_function(tmp_path):
    assert _error("no_such_module_xyz:f") == (
        "cannot import calibration module 'no_such_module_xyz': No module named 'no_such_module_xyz'."
    )
    (tmp_path / "m.py").write_text("value = 3\ndef ints():\n    return 5\ndef items():\n    return [1, 2]\n")
    m = tmp_path / "m.py"
    assert _error(f"{m}:missing") == f"calibration module {m} has no function 'missing'."
    assert _error(f"{m}:value") == f"--calib {m}:value names int 'value', which is not callable."
    assert (
        _error(f"{m}:ints") == f"calibration function {m}:ints returned int, not an iterable of input dicts."
    )
    assert _error(f"{m}:items") == (
        f"calibration data {m}:items gave int as item 0, expected a dict of input name to array."
    )
    assert _error(f"{tmp_path / 'nope.py'}:f") == (
        f"calibration module file {tmp_path / 'nope.py'} does not exist (from --calib {tmp_path / 'nope.py'}:f)."
    )
    (tmp_path / "boom.py").write_text("def f():\n    raise RuntimeError('no data today')\n")
    assert _error(f"{tmp_path / 'boom.py'}:f") == (
        f"calibration function {tmp_path / 'boom.py'}:f raised RuntimeError: no data today."
    )
