"""Read and write models by file extension: ``.onnx`` (ONNX), ``.ncc`` (ncc text) or ``.pt2`` (a
``torch.export`` program: read through the torch frontend, written by the torch backend). TensorFlow
models are inputs only, read through the TensorFlow frontend: ``.keras``, ``.h5``/``.hdf5`` (Keras),
``.pb`` (a frozen GraphDef), ``.tflite``, and a SavedModel folder (one holding ``saved_model.pb``).

:func:`check_distinct` is the one check that a command's outputs replace none of the files it
reads; :func:`input_files` and :func:`output_files` list those files for a model path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import onnx_ir as ir
from ncc.errors import NccError
from ncc.files import atomic_outputs, cannot_write, check_writable

FORMATS = (".onnx", ".ncc", ".pt2", ".xml")
#: Read through :mod:`ncc.frontends.tensorflow`, never written; a SavedModel folder is ``SAVED_MODEL``.
TF_FORMATS = (".keras", ".h5", ".hdf5", ".pb", ".tflite")
SAVED_MODEL = "saved_model"


def model_format(path: Path) -> str:
    """``path``'s format: its suffix (one of ``FORMATS`` or ``TF_FORMATS``), or ``SAVED_MODEL`` for a
    folder holding ``saved_model.pb``."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS + TF_FORMATS:
        if path.is_dir() and (path / "saved_model.pb").is_file():
            return SAVED_MODEL
        raise NccError(
            f"{path}: unknown model format {suffix or '(no extension)'!r}; use .onnx, .ncc or .pt2, a "
            "TensorFlow model as an input (.keras, .h5, .pb frozen graph, .tflite, or a SavedModel "
            "folder), or .xml (OpenVINO IR) as an output."
        )
    return suffix


def is_tf_input(path: Path) -> bool:
    """True when ``path`` is read through the TensorFlow frontend (judged by name, no TensorFlow import)."""
    try:
        return model_format(path) in (*TF_FORMATS, SAVED_MODEL)
    except NccError:
        return False


def _refuse_tf_output(path: Path) -> None:
    if path.suffix.lower() == ".tflite":  # the tflite target's artefact
        return
    if is_tf_input(path) or path.suffix.lower() in TF_FORMATS:
        raise NccError(
            f"{path}: TensorFlow formats other than .tflite are inputs here; write the compiled model as "
            ".onnx, .ncc, .pt2, .tflite, or a SavedModel folder with --target tf."
        )


def load_model(
    path: str | os.PathLike,
    *,
    signature: str | None = None,
    inputs: Sequence[str] | None = None,
    outputs: Sequence[str] | None = None,
) -> ir.Model:
    """Load a model and verify it (a cycle or an undefined value is an error here, not later; contrib ops
    against onnxruntime's schemas, which importing :mod:`ncc.runtime` registers). ``signature``,
    ``inputs`` and ``outputs`` go to the TensorFlow frontend (:func:`ncc.frontends.tensorflow.lower_tf`)."""
    import ncc.runtime  # noqa: F401
    from ncc.ir.verifier import verify

    path = Path(path)
    if model_format(path) == ".xml":
        raise NccError(f"{path}: OpenVINO IR is an output format here; give ncc the ONNX model it came from.")
    if is_tf_input(path):
        from ncc.frontends.tensorflow import lower_tf

        model = lower_tf(path, signature=signature, inputs=inputs, outputs=outputs)
    elif signature is not None or inputs or outputs:
        raise NccError(
            f"{path}: --signature, --inputs and --outputs apply to TensorFlow models (a SavedModel, .pb)."
        )
    elif model_format(path) == ".onnx":
        from ncc.frontends.onnx import load_onnx

        model = load_onnx(path)
    elif model_format(path) == ".pt2":
        from ncc.frontends.torch import lower_program

        model = lower_program(path)
    else:
        from ncc.ir.parser import parse_file

        model = parse_file(path)
    refuse_unknown_opsets(model, path)
    verify(model)
    return model


def refuse_unknown_opsets(model: ir.Model, source: str | os.PathLike) -> None:
    """Refuse opset versions newer than the installed onnx knows: no runtime could load the result."""
    import onnx

    known = _known_opsets()
    for opsets in [model.opset_imports, *(f.opset_imports for f in model.functions.values())]:
        for domain, version in opsets.items():
            highest = known.get("" if domain == "ai.onnx" else domain)
            if highest is not None and version > highest:
                raise NccError(
                    f'{source}: opset_import {{"{domain}" = {version}}} is newer than the installed onnx '
                    f'{onnx.__version__} knows (its highest version of domain "{domain}" is {highest}).'
                )


def _known_opsets() -> dict[str, int]:
    import onnx.defs

    known = {"": onnx.defs.onnx_opset_version()}
    try:  # the other standard domains (ai.onnx.ml, ...); custom domains are not onnx's to judge
        known.update({d: hi for d, (_, hi) in onnx.defs.C.schema_version_map().items() if d})
    except AttributeError:
        pass
    return known


class FileUse(NamedTuple):
    """A file a command reads or writes, and what it is to the command (for messages)."""

    role: str
    path: Path
    #: A model or weight file: onnx and onnxruntime take only UTF-8 names for those.
    model: bool = True
    #: An output written only in some cases (a data file for weights over 2 GB), or a file of an output
    #: folder that writing the folder replaces.
    optional: bool = False
    #: An output folder (a SavedModel), replaced as a whole.
    folder: bool = False


def input_files(path: Path) -> list[FileUse]:
    """The input model and the external data or sidecar files it names (only the model when the file
    cannot be read: loading it says why)."""
    uses = [FileUse("the input", path)]
    try:
        if path.is_dir() and is_tf_input(path):  # a SavedModel: saved_model.pb, variables/, assets/
            files = sorted(p for p in path.rglob("*") if p.is_file())
            uses += [FileUse("a file of the input SavedModel", p) for p in files]
        elif path.suffix.lower() == ".ncc":
            from ncc.ir.parser import sidecar_files

            uses += [FileUse("the input's sidecar data file", p) for p in sidecar_files(path)]
        elif path.is_file() and not is_tf_input(path):
            from ncc.frontends.onnx import external_data_files

            uses += [FileUse("the input's external data file", p) for p in external_data_files(path)]
    except Exception:  # noqa: BLE001 - not a readable model: load_model reports it in one sentence
        pass
    return uses


def output_files(path: Path, *, external_data: str | None = None, full: bool = True) -> list[FileUse]:
    """Every file saving a model to ``path`` may write: the model, and its external data file (for an
    ``.onnx`` without ``external_data``, the one written when the weights pass 2 GB) or its ``.data``
    sidecar (``.ncc`` with ``full``)."""
    _refuse_tf_output(path)
    uses = [FileUse("the output", path)]
    if model_format(path) in (".pt2", ".tflite"):
        return uses
    if model_format(path) == ".xml":
        return [*uses, FileUse("the output's weights file", path.with_suffix(".bin"))]
    if model_format(path) == ".onnx":
        if external_data:
            uses.append(FileUse("the output's external data file", path.parent / external_data))
        else:
            uses.append(
                FileUse("the output's external data file (written above 2 GB)", _sidecar(path), optional=True)
            )
    elif full:
        uses.append(FileUse("the output's sidecar data file", _sidecar(path)))
    return uses


def saved_model_files(path: Path) -> list[FileUse]:
    """What writing a SavedModel folder at ``path`` replaces: the folder and every file in it now."""
    uses = [FileUse("the output SavedModel folder", path, folder=True)]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        uses += [FileUse("a file of the output SavedModel", p, optional=True) for p in files]
    return uses


def save_saved_model(model: ir.Model, path: Path) -> list[Path]:
    """Write ``model`` as a TensorFlow SavedModel folder (``--target tf``), replacing it as a whole."""
    from ncc.backends.tensorflow.savedmodel import save_savedmodel
    from ncc.frontends.tensorflow import quiet

    with atomic_outputs(path, folder=True) as (temp,), quiet():  # TensorFlow's start-up notices
        save_savedmodel(model, temp)
    return [path]


def calibration_files(spec: str | None) -> list[FileUse]:
    """The files ``--calib SPEC`` reads: a ``.npz``, the ``.npz`` files of a folder, a ``module.py``."""
    if not spec:
        return []
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npz")
    elif path.exists() or ":" not in spec:
        files = [path]
    else:
        module = spec.rpartition(":")[0]
        files = [Path(module)] if module.endswith(".py") else []
    return [FileUse("the calibration data", p, model=False) for p in files]


def check_distinct(reads: Iterable[FileUse], writes: Iterable[FileUse] = ()) -> None:
    """Refuse, before any work, a command that would write over a file it reads, or write two of its
    outputs to one file. Paths are compared resolved (relative paths, symlinks) and, where both exist,
    as files (hard links). Model and weight files must have UTF-8 names (onnx takes no other)."""
    reads, writes = list(reads), list(writes)
    for use in reads + writes:
        if use.model:
            _require_utf8(use.path)
    for write in writes:
        if not write.optional:
            check_writable(write.path, folder=write.folder)
    for i, write in enumerate(writes):
        for other in [*reads, *writes[:i]]:
            if _same_file(write.path, other.path):
                same = "" if str(write.path) == str(other.path) else f" ({other.path})"
                raise NccError(
                    f"{write.role} {write.path} is {other.role}{same}; choose another output name."
                )


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except (OSError, RuntimeError):  # unreadable or a symlink loop: not provably the same file
        return False


def _require_utf8(path: Path) -> None:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = str(path).encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
        raise NccError(
            f"cannot use {shown}: its name is not UTF-8, and onnx takes only UTF-8 names for models and "
            "their data files; rename it."
        ) from None


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".data")


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    full: bool = True,
    external_data: str | None = None,
    value_info: bool = True,
    aoti: bool = False,
) -> list[Path]:
    """Write ``model``; returns the files written (model first). ``.ncc`` output carries
    every value when ``full`` (large ones in a ``<name>.data`` sidecar); ``.onnx`` output leaves
    out intermediate values' types and shapes unless ``value_info``; ``.pt2`` output is a torch.export
    program, or with ``aoti`` an AOTInductor package."""
    path = Path(path)
    _refuse_tf_output(path)
    if model_format(path) == ".onnx":
        from ncc.backends.onnx import save_onnx

        data = save_onnx(model, path, external_data=external_data, value_info=value_info)
        return [path] + ([data] if data else [])
    if model_format(path) == ".xml":
        from ncc.backends.openvino.save import save_openvino_ir

        if external_data:
            raise NccError("--external-data applies to .onnx output, not OpenVINO IR (.xml).")
        weights = path.with_suffix(".bin")
        with atomic_outputs(path, weights) as (temp, _):
            save_openvino_ir(model, temp)
        return [path, weights]
    if model_format(path) == ".tflite":
        from ncc.backends.tensorflow.tflite import write_tflite

        if external_data:
            raise NccError("--external-data applies to .onnx output, not .tflite.")
        with atomic_outputs(path) as (temp,):
            write_tflite(model, temp)
        return [path]
    if model_format(path) == ".pt2":
        from ncc.backends.torch.save import save_pt2

        if external_data:
            raise NccError("--external-data applies to .onnx output, not .pt2.")
        with atomic_outputs(path) as (temp,):
            save_pt2(model, temp, aoti=aoti)
        return [path]
    from ncc.ir.printer import print_model

    data_path = _sidecar(path)
    targets = (path, data_path) if full else (path,)
    with atomic_outputs(*targets) as temps:
        try:
            # The sidecar is referenced by its final file name, which its temporary shares.
            text = print_model(model, full=full, data_file=temps[1] if full else None)
            temps[0].write_text(text, encoding="utf-8")
        except OSError as err:
            raise cannot_write(path, err) from None
        written = [path] + ([data_path] if full and temps[1].exists() else [])
    return written
