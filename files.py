"""All-or-nothing output files, and the one check for file names stored inside a model.

Every file ncc writes goes through :func:`atomic_outputs`: the writer fills
temporary files beside the targets and they are renamed into place only when
the writer finishes without an exception. A failed compile never leaves a
half-written model behind. Inside :func:`deferred_commit` the renames wait for
the end of that block, so a whole set of outputs can be checked (loaded in
onnxruntime) where the temporaries lie and renamed only when the check passed.

A model names other files (ONNX external data, ncc text sidecars) relative to
its own folder; :func:`inside_folder` is the check, shared by every reader,
that such a name stays inside that folder.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
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


def cannot_write(target: Path, err: OSError) -> NccError:
    """The user-facing error for an OSError (ENOSPC, EROFS, EIO, ...) met while writing ``target``."""
    return NccError(f"cannot write {target}: {err.strerror or err}.")


def check_writable(path: Path, *, folder: bool = False) -> None:
    """Raise an NccError when ``path``'s folder does not exist or cannot be written. With ``folder``,
    ``path`` is an output folder (a SavedModel): an existing one may be replaced only when it is empty or
    holds a SavedModel (``saved_model.pb``), never any other folder."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise NccError(f"cannot write {path}: folder {parent} does not exist.")
    if not os.access(parent, os.W_OK):
        raise NccError(f"cannot write {path}: folder {parent} is not writable.")
    if path.is_dir() and not folder:
        raise NccError(f"cannot write {path}: it is a folder.")
    if folder and path.exists():
        if not path.is_dir():
            raise NccError(f"cannot write the folder {path}: a file of that name exists.")
        if any(path.iterdir()) and not (path / "saved_model.pb").is_file():
            raise NccError(
                f"cannot write {path}: the folder exists and holds no SavedModel (ncc replaces only those)."
            )
    try:  # permissions alone do not tell (root, read-only or virtual filesystems): try it
        fd, probe = tempfile.mkstemp(prefix=".ncc-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise cannot_write(path, err) from None


class _Commit:
    """The outputs written inside one :func:`deferred_commit` block, not yet renamed into place."""

    def __init__(self) -> None:
        self.pending: list[tuple[Path, list[Path], tuple[Path, ...]]] = []

    def staged(self, target: str | os.PathLike) -> Path:
        for _, temps, targets in self.pending:
            for temp, final in zip(temps, targets):
                if final == Path(target):
                    return temp
        raise KeyError(f"{target} was not written in this block")


_active: _Commit | None = None


@contextlib.contextmanager
def deferred_commit() -> Iterator[Callable[[str | os.PathLike], Path]]:
    """Hold back the renames of every :func:`atomic_outputs` block run inside this one until it ends.

    Yields ``staged(target)``: the temporary file that will become ``target`` (same file name, in a
    private folder beside it, so a model and its external data still find each other). When the block
    raises (a failed check, Ctrl-C, SIGTERM) no output is renamed into place and every temporary is
    removed.
    """
    global _active
    outer, commit = _active, _Commit()
    _active = commit
    try:
        yield commit.staged
        _active = outer
        if outer is not None:
            outer.pending += commit.pending
            commit.pending = []
        else:
            for _, temps, targets in commit.pending:
                _rename(temps, targets)
    finally:
        _active = outer
        for workdir, _, _ in commit.pending:
            _remove(workdir)


@contextlib.contextmanager
def atomic_outputs(*targets: Path, folder: bool = False) -> Iterator[list[Path]]:
    """Yield temporary paths (same folder, same file names) to write instead of ``targets``.

    With ``folder`` the single target is a folder (a SavedModel): the writer creates the temporary
    folder, and an existing target folder is replaced as a whole (see :func:`check_writable`).

    The temporaries live in one private folder next to the first target so the
    final ``os.replace`` is a rename on one filesystem and relative references
    between the files (a model and its external data) stay valid. Inside
    :func:`deferred_commit` the rename happens when that block ends.
    """
    targets = tuple(Path(t) for t in targets)
    for target in targets:
        check_writable(target, folder=folder)
    try:
        workdir = Path(tempfile.mkdtemp(prefix=".ncc-tmp-", dir=targets[0].parent or "."))
    except OSError as err:
        raise cannot_write(targets[0], err) from None
    temps = [workdir / t.name for t in targets]
    handed_over = False
    try:
        yield temps
        if _active is not None:
            _active.pending.append((workdir, temps, targets))
            handed_over = True
        else:
            _rename(temps, targets)
    finally:
        if not handed_over:
            _remove(workdir)


def _rename(temps: list[Path], targets: tuple[Path, ...]) -> None:
    for temp, target in zip(temps, targets):
        if temp.exists():
            try:
                if temp.is_dir() and target.is_dir():  # an output folder: the old one moves out first
                    os.replace(target, temp.parent / f".old-{target.name}")
                os.replace(temp, target)
            except OSError as err:
                raise cannot_write(target, err) from None


def _remove(workdir: Path) -> None:
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
