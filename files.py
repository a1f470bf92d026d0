"""All-or-nothing output files, and the one check for file names stored inside a model.

Every file ncc writes goes through :func:`atomic_outputs`: the writer fills
temporary files beside the targets and they are renamed into place only when
the writer finishes without an exception. A failed compile never leaves a
half-written model behind.

A model names other files (ONNX external data, ncc text sidecars) relative to
its own folder; :func:`inside_folder` is the check, shared by every reader,
that such a name stays inside that folder.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ncc.errors import NccError


def inside_folder(folder: str | os.PathLike, name: str) -> Path | None:
    """``folder / name`` with symlinks resolved, when ``name`` is a relative path that stays inside
    ``folder`` (resolved too); ``None`` when it is absolute or leads out of the folder."""
    if os.path.isabs(name):
        return None
    try:
        root = Path(folder).resolve()
        resolved = (root / name).resolve()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a symlink loop: not a usable name
        return None
    return resolved if resolved.is_relative_to(root) else None


def check_writable(path: Path) -> None:
    """Raise an NccError when ``path``'s folder does not exist or cannot be written."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise NccError(f"cannot write {path}: folder {folder} does not exist.")
    if not os.access(folder, os.W_OK):
        raise NccError(f"cannot write {path}: folder {folder} is not writable.")
    if path.is_dir():
        raise NccError(f"cannot write {path}: it is a folder.")
    try:  # permissions alone do not tell (root, read-only or virtual filesystems): try it
        fd, probe = tempfile.mkstemp(prefix=".ncc-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise NccError(f"cannot write {path}: {err.strerror or err}.") from None


@contextlib.contextmanager
def atomic_outputs(*targets: Path) -> Iterator[list[Path]]:
    """Yield temporary paths (same folder, same file names) to write instead of ``targets``.

    The temporaries live in one private folder next to the first target so the
    final ``os.replace`` is a rename on one filesystem and relative references
    between the files (a model and its external data) stay valid.
    """
    targets = tuple(Path(t) for t in targets)
    for target in targets:
        check_writable(target)
    try:
        workdir = Path(tempfile.mkdtemp(prefix=".ncc-tmp-", dir=targets[0].parent or "."))
    except OSError as err:
        raise NccError(f"cannot write {targets[0]}: {err.strerror or err}.") from None
    temps = [workdir / t.name for t in targets]
    try:
        yield temps
        for temp, target in zip(temps, targets):
            if temp.exists():
                try:
                    os.replace(temp, target)
                except OSError as err:
                    raise NccError(f"cannot write {target}: {err.strerror or err}.") from None
    finally:
        for leftover in workdir.iterdir():
            leftover.unlink()
        workdir.rmdir()
