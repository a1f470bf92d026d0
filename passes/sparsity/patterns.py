"""Sparsity patterns on a layer's weight, viewed as a matrix ``[outputs, inputs]``.

A Conv weight ``[O, I, kh, kw]`` is viewed as ``[O, I*kh*kw]``, a MatMul weight ``[K, N]`` as its
transpose ``[N, K]``. On that view:

- ``RxC`` (``4x1``, ``2x1``, ``1x4``, ...): blocks of R consecutive outputs by C consecutive inputs, each
  kept or zeroed whole; the lowest-scoring blocks go until the target sparsity (blocks scored by the
  sum of their elements' scores).
- ``N:M`` (``2:4``, ``1:2``): in every run of M consecutive inputs of each output, the N highest-scoring
  elements stay; the sparsity is ``1 - N/M`` whatever was asked.
- ``unstructured``: single elements.

Masks are exact: a block is all zero or all kept, an N:M group has exactly N survivors.
"""

from __future__ import annotations

import re

import numpy as np

STRUCTURED = ("channel", "neuron", "head")

_BLOCK = re.compile(r"^([1-9][0-9]*)x([1-9][0-9]*)$")
_NM = re.compile(r"^([1-9][0-9]*):([1-9][0-9]*)$")


def pattern_problem(text: str) -> str | None:
    """``check=`` for the ``pattern`` option."""
    if text in STRUCTURED or text == "unstructured" or _BLOCK.match(text):
        return None
    nm = _NM.match(text)
    if nm and int(nm.group(1)) < int(nm.group(2)):
        return None
    return (
        f"is {text!r}, not a pattern (unstructured, RxC blocks such as 4x1, N:M with N < M such as 2:4, "
        f"or {', '.join(STRUCTURED)})"
    )


def n_of_m(pattern: str) -> tuple[int, int] | None:
    nm = _NM.match(pattern)
    return (int(nm.group(1)), int(nm.group(2))) if nm else None


def block(pattern: str) -> tuple[int, int] | None:
    if pattern == "unstructured":
        return 1, 1
    b = _BLOCK.match(pattern)
    return (int(b.group(1)), int(b.group(2))) if b else None


def fits(pattern: str, shape: tuple[int, int]) -> str | None:
    """None when ``pattern`` tiles a ``[outputs, inputs]`` view of ``shape``, else why not."""
    rows, cols = shape
    if (nm := n_of_m(pattern)) is not None and cols % nm[1]:
        return f"{cols} inputs are not a multiple of {nm[1]}"
    if (b := block(pattern)) is not None and (rows % b[0] or cols % b[1]):
        return f"a {rows}x{cols} weight does not split into {b[0]}x{b[1]} blocks"
    return None


def block_scores(scores: np.ndarray, pattern: str) -> np.ndarray:
    """Scores of the ``pattern``'s blocks of a ``[outputs, inputs]`` score matrix (block pattern only)."""
    r, c = block(pattern)
    rows, cols = scores.shape
    return scores.reshape(rows // r, r, cols // c, c).sum(axis=(1, 3))


def expand(block_mask: np.ndarray, pattern: str) -> np.ndarray:
    r, c = block(pattern)
    return np.repeat(np.repeat(block_mask, r, axis=0), c, axis=1)


def keep_top(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Boolean mask keeping the highest-scoring entries, removing ``round(sparsity * size)`` of them
    (ties broken by position, so the mask is deterministic)."""
    flat = scores.reshape(-1)
    drop = int(round(sparsity * flat.size))
    keep = np.ones(flat.size, dtype=bool)
    if drop > 0:
        keep[np.argsort(flat, kind="stable")[:drop]] = False
    return keep.reshape(scores.shape)


def n_of_m_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return keep.reshape(rows, cols)


def layer_mask(scores: np.ndarray, pattern: str, sparsity: float) -> np.ndarray:
    """The keep-mask of one layer (``[outputs, inputs]`` scores)."""
    if (nm := n_of_m(pattern)) is not None:
        return n_of_m_mask(scores, *nm)
    return expand(keep_top(block_scores(scores, pattern), sparsity), pattern)


def global_masks(scores: list[np.ndarray], pattern: str, sparsity: float) -> list[np.ndarray]:
    """Keep-masks for several layers under one threshold: the lowest ``sparsity`` of all blocks, by
    score per element (so layers of different sizes compare)."""
    if n_of_m(pattern) is not None:
        return [layer_mask(s, pattern, sparsity) for s in scores]
    blocks = [block_scores(s, pattern) for s in scores]
    flat = np.concatenate([b.reshape(-1) for b in blocks])
    keep = keep_top(flat, sparsity)
    out, start = [], 0
    for b in blocks:
        out.append(expand(keep[start : start + b.size].reshape(b.shape), pattern))
        start += b.size
    return out


def to_view(weight: np.ndarray, out_axis: int) -> np.ndarray:
    """``weight`` as ``[outputs, inputs]``: its output axis first, the rest flattened."""
    moved = np.moveaxis(weight, out_axis, 0)
    return moved.reshape(moved.shape[0], -1)


def from_view(view: np.ndarray, weight_shape: tuple[int, ...], out_axis: int) -> np.ndarray:
    moved_shape = (
        weight_shape[out_axis],
        *[d for i, d in enumerate(weight_shape) if i != out_axis % len(weight_shape)],
    )
    return np.moveaxis(view.reshape(moved_shape), 0, out_axis)
