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
    """Load a model and verify it (a cycle or an undefined value is an error here, not later)."""
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


def check_distinct(inp: Path, out: Path) -> None:
    """Refuse to write over the input (or its external data) before any work is done."""
    model_format(out)
    check_writable(out)
    if out.resolve() == inp.resolve() or (out.exists() and os.path.samefile(out, inp)):
        raise NccError(f"output {out} is the input file; choose another output path.")


def save_model(model: ir.Model, path: str | os.PathLike, *, full: bool = True, external_data: str | None = None) -> list[Path]:
    """Write ``model``; returns the files written (model first). ``.ncc`` output carries
    every value when ``full`` (large ones in a ``<name>.data`` sidecar)."""
    path = Path(path)
    if model_format(path) == ".onnx":
        from ncc.backends.onnx import save_onnx

        data = save_onnx(model, path, external_data=external_data)
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
