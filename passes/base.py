"""The pass contract.

A pass is a frozen dataclass: its kebab-case ``name`` is a class variable, its
options are the dataclass fields (declared with :func:`option`, which carries
the option's one-line doc), and ``run`` transforms the model in place and says
whether it changed anything. ``requires`` / ``ensures`` state preconditions and
postconditions as code; the :class:`~ncc.passes.manager.PassManager` calls them
around ``run`` and verifies the IR after every pass.

Defining a subclass with a ``name`` registers it (see
:mod:`ncc.passes.registry`), so a plugin file only has to define the class. A
pass made of rewrite patterns (:mod:`ncc.ir.rewrite`) returns
:func:`run_patterns`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_ir as ir
from ncc.ir.rewrite import Pattern, PatternStats, apply_patterns


def option(default: Any, doc: str) -> Any:
    """Declare a pass option: a dataclass field with a default and a one-line doc."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("pass options must be immutable: use a tuple or frozenset")
    return field(default=default, metadata={"doc": doc})


@dataclass
class PassResult:
    """What a pass did. ``modified`` is the pass's own claim; the manager also fingerprints."""

    modified: bool
    stats: dict[str, int] = field(default_factory=dict)
    #: Lines for the compile report (e.g. "kept Softmax /attn/Softmax in float: ...").
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_patterns(cls, stats: PatternStats, patterns: Sequence[Pattern]) -> PassResult:
        """The result of a pattern driver run: hits per pattern (every one of ``patterns`` listed, 0 when it
        never matched), and why the misses missed."""
        hits = {**{p.label: 0 for p in patterns}, **stats.hits}
        counts = {f"{label} hits": n for label, n in sorted(hits.items())}
        notes = [f"{label}: no match {n}x: {reason}" for (label, reason), n in sorted(stats.failures.items())]
        if not stats.converged:
            notes.append(f"pattern driver stopped after {stats.sweeps} sweeps without converging")
        return cls(modified=sum(stats.hits.values()) > 0, stats=counts, notes=notes)


def run_patterns(model: ir.Model, patterns: Sequence[Pattern], *, max_sweeps: int = 10) -> PassResult:
    """Apply ``patterns`` to ``model`` (:func:`ncc.ir.rewrite.apply_patterns`) and report it: the body of
    a pass made of patterns."""
    return PassResult.from_patterns(apply_patterns(model, patterns, max_sweeps=max_sweeps), patterns)


@dataclass
class PassContext:
    """State shared by the passes of one pipeline run.

    ``source`` is the path of the model being compiled (if any), ``cache_dir``
    where passes may cache expensive results (calibration statistics), and
    ``data`` a free-form store for results one pass hands to a later one.
    """

    source: str | None = None
    cache_dir: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pass:
    """Base class of all passes. Subclasses are frozen dataclasses with a ``name``."""

    name: ClassVar[str] = ""
    #: Registered under a plugin origin (a file path or entry point) rather than built in.
    origin: ClassVar[str] = "builtin"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            from ncc.passes.registry import register

            register(cls)

    # -- the contract -------------------------------------------------------
    def requires(self, model: ir.Model) -> None:
        """Raise :class:`ncc.errors.NccError` when ``model`` is not a valid input for this pass."""

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        raise NotImplementedError(f"pass {self.name} does not implement run()")

    def ensures(self, model: ir.Model) -> None:
        """Raise when the pass's postcondition does not hold on ``model``."""

    # -- introspection -------------------------------------------------------
    @classmethod
    def doc(cls) -> str:
        """The first line of the class docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    @classmethod
    def options(cls) -> tuple[dataclasses.Field, ...]:
        return tuple(f for f in dataclasses.fields(cls) if f.init)

    def spec(self) -> str:
        """This pass as a spec string; options equal to their default are left out."""
        from ncc.passes.spec import format_pass

        return format_pass(self)
