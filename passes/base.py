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

An option may carry its valid values (``option(8, "samples per run", min=1)``,
``gt=0, max=100``, ``check=regex``); every construction of a pass (from a spec,
a CLI flag or Python) checks them in ``Pass.__post_init__`` and raises a
:class:`~ncc.errors.PassSpecError` naming the pass, the option, the value and
what is allowed. A float option must be finite. A subclass that defines its own
``__post_init__`` calls ``super().__post_init__()`` first.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_ir as ir
from ncc.ir.rewrite import Pattern, PatternStats, apply_patterns


@dataclass(frozen=True)
class Bounds:
    """The numbers an option accepts: ``min``/``max`` inclusive, ``gt``/``lt`` exclusive (None: unbounded)."""

    min: float | None = None
    max: float | None = None
    gt: float | None = None
    lt: float | None = None

    def __contains__(self, value: float) -> bool:
        return (
            (self.min is None or value >= self.min)
            and (self.max is None or value <= self.max)
            and (self.gt is None or value > self.gt)
            and (self.lt is None or value < self.lt)
        )

    def __str__(self) -> str:
        """``in [0, 1]``, ``in (0, 100]``, ``at least 1``, ``greater than 0``, ``at most 4``."""
        low = f"[{self.min:g}" if self.min is not None else f"({self.gt:g}" if self.gt is not None else ""
        high = f"{self.max:g}]" if self.max is not None else f"{self.lt:g})" if self.lt is not None else ""
        if low and high:
            return f"in {low}, {high}"
        if low:
            return ("at least " if low[0] == "[" else "greater than ") + low[1:]
        if high:
            return ("at most " if high[-1] == "]" else "less than ") + high[:-1]
        return "any number"

    def notation(self) -> str:
        """The short form ``ncc passes`` shows after the type: ``in [0, 1]``, ``>= 1``, ``> 0``."""
        text = str(self)
        for words, sign in (
            ("at least ", ">= "),
            ("greater than ", "> "),
            ("at most ", "<= "),
            ("less than ", "< "),
        ):
            if text.startswith(words):
                return sign + text[len(words) :]
        return text


#: ``check=`` of an option: None when the value (or, for a list option, one item) is valid, else what is
#: wrong with it, as the end of a sentence starting with the option's name ("is not a regular expression").
Check = Callable[[Any], "str | None"]


def option(
    default: Any,
    doc: str,
    *,
    min: float | None = None,
    max: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    check: Check | None = None,
) -> Any:
    """Declare a pass option: a dataclass field with a default, a one-line doc and its valid values.

    ``min``/``max`` bound a number inclusively, ``gt``/``lt`` exclusively; ``check`` tests anything
    else (see :data:`Check`). Bounds and check apply to each item of a list option.
    """
    if isinstance(default, (list, dict, set)):
        raise TypeError("pass options must be immutable: use a tuple or frozenset")
    metadata: dict[str, Any] = {"doc": doc}
    if (min, max, gt, lt) != (None, None, None, None):
        metadata["bounds"] = Bounds(min, max, gt, lt)
    if check is not None:
        metadata["check"] = check
    return field(default=default, metadata=metadata)


def regex(pattern: str) -> str | None:
    """``check=`` for options holding regular expressions: each must compile."""
    try:
        re.compile(pattern)
    except re.error as err:
        return f"has {pattern!r}, which is not a regular expression ({err})"
    return None


def node_ids(text: str) -> str | None:
    """``check=`` for options holding node ids (:mod:`ncc.ir.ids`): each a non-negative integer."""
    return None if text.isdigit() else f"has {text!r}, which is not a node id (a non-negative integer)"


def option_problem(f: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with ``value`` for the option declared by ``f`` (None if nothing), as the end of a
    sentence starting with the option's name: ``must be in [0, 1], got 5.0``."""
    from ncc.passes.spec import format_value

    items = value if isinstance(value, tuple) else (value,)
    bounds, check = f.metadata.get("bounds"), f.metadata.get("check")
    for item in items:
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, float) and not math.isfinite(item):
            return f"must be a finite number, got {format_value(item)}"
        if bounds is not None and isinstance(item, (int, float)) and item not in bounds:
            return f"must be {bounds}, got {format_value(item)}"
        if check is not None and (problem := check(item)):
            return problem
    return None


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

    def __post_init__(self) -> None:
        from ncc.errors import PassSpecError
        from ncc.passes.spec import option_key

        for f in self.options():
            if problem := option_problem(f, getattr(self, f.name)):
                raise PassSpecError(f"{self.name or type(self).__name__}: {option_key(f.name)} {problem}.")

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
