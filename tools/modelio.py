"""Read and write models by file extension: ``.onnx`` (ONNX) or ``.ncc`` (ncc text)."""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir
from ncc.errors import NccError
from ncc.files import atomic_outputs, check_writable

FORMATS = (".onnx", ".ncc")


def model_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise NccError(f"{path}: unknown model format {suffix or '(no extension)'!r}; use .onnx or .ncc.")
    return suffix


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load a model and verify it (a cycle or an undefined value is an error here, not later; contrib ops
    against onnxruntime's schemas, which importing :mod:`ncc.runtime` registers)."""
    import ncc.runtime  # noqa: F401
    from ncc.ir.verifier import verify

    path = Path(path)
    if model_format(path) == ".onnx":
        from ncc.frontends.onnx import load_onnx

        model = load_onnx(path)
    else:
        from ncc.ir.parser import parse_file

        model = parse_file(path)
    verify(model)
    return model


def check_distinct(inp: Path, out: Path, external_data: str | None = None) -> None:
    """Refuse to write over the input (or, when ``external_data`` names the output's data file, the
    input's external data) before any work is done. A data file written only because the output
    passes 2 GB is checked when it is saved."""
    model_format(out)
    check_writable(out)
    if out.resolve() == inp.resolve() or (out.exists() and os.path.samefile(out, inp)):
        raise NccError(f"output {out} is the input file; choose another output path.")
    if not external_data:
        return
    data = out.parent / external_data
    if data.is_file() and any(f.is_file() and os.path.samefile(f, data) for f in _input_data_files(inp)):
        raise NccError(
            f"output data file {data} holds the input's weights; choose another output or data file name."
        )


def _input_data_files(inp: Path) -> list[Path]:
    """The files the input model's weights are read from (none when it cannot be read; loading says why)."""
    if inp.suffix.lower() == ".ncc":
        return [inp.with_name(inp.name + ".data")]
    from ncc.frontends.onnx import external_data_files

    try:
        return external_data_files(inp)
    except Exception:  # not a readable model: load_model reports it in one sentence
        return []


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    full: bool = True,
    external_data: str | None = None,
    value_info: bool = True,
) -> list[Path]:
    """Write ``model``; returns the files written (model first). ``.ncc`` output carries
    every value when ``full`` (large ones in a ``<name>.data`` sidecar); ``.onnx`` output leaves
    out intermediate values' types and shapes unless ``value_info``."""
    path = Path(path)
    if model_format(path) == ".onnx":
        from ncc.backends.onnx import save_onnx

        data = save_onnx(model, path, external_data=external_data, value_info=value_info)
        return [path] + ([data] if data else [])
    from ncc.ir.printer import print_model

    if not full:
        with atomic_outputs(path) as (tmp,):
            tmp.write_text(print_model(model), encoding="utf-8")
        return [path]
    data_path = path.with_name(path.name + ".data")
    with atomic_outputs(path, data_path) as (tmp, tmp_data):
        # The sidecar is referenced by its final file name, which tmp_data shares.
        tmp.write_text(print_model(model, full=True, data_file=tmp_data), encoding="utf-8")
    return [path] + ([data_path] if data_path.exists() else [])
