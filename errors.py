"""Errors a user can cause.

Every error a user can trigger (bad file, bad option, bad pass spec, a model
that does not verify) is an :class:`NccError`: one clear sentence, shown by
the CLI without a traceback and with exit code 2. Anything else escaping is a
bug in ncc and keeps its traceback.
"""

from __future__ import annotations


class NccError(Exception):
    """A user-facing error: ``str(err)`` is one clear sentence (plus optional context lines)."""

    exit_code = 2


class ParseError(NccError):
    """A syntax error in ncc text, located as ``file:line:col`` with a caret line."""

    def __init__(self, message: str, *, filename: str, line: int, column: int, source_line: str):
        self.filename, self.line, self.column = filename, line, column
        caret = " " * (column - 1) + "^"
        super().__init__(f"{filename}:{line}:{column}: {message}\n  {source_line}\n  {caret}")


class VerificationError(NccError):
    """The IR breaks an invariant; the message names the node and shows it in context."""


class PassSpecError(NccError):
    """A pass pipeline spec names an unknown pass or option, or has a malformed value."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message without its closing period (the type's name when the
    message is empty): how a library's error is quoted inside one of ncc's sentences."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0].rstrip(".")
