"""What ``prune`` measures on calibration data: input statistics of layers, which units to remove, and the
least-squares refit of the layers that read them.

Layer inputs are gathered as rows (a token of a transformer, a pixel of a CNN) with padding positions
(the ``attention_mask`` input's zeros) left out. For structured pruning the choice is Optimal Brain
Surgeon's, by blocks (Hassibi & Stork 1993; the structured form as in SlimGPT / ZipLM): with ``H = X^T X``
the reader's input Gram matrix, removing unit ``u`` (rows ``U`` of the reader's weight ``W``) and
compensating optimally with the other rows costs ``tr(W_U^T [H^-1]_UU^-1 W_U)``. Units go greedily, each
removal updating ``H^-1`` and ``W``, in chunks for wide layers. Costs of several readers add after
dividing each by its output energy ``tr(W^T H W)``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from ncc.metrics import position_mask

#: ridge added to the Gram matrix, relative to its mean diagonal
RIDGE = 1e-3


#: rows taken from each sample of a feature map (evenly spaced pixels): neighbouring pixels say little
#: new, and more images with fewer pixels each fit a better refit in the same memory
PIXELS_PER_SAMPLE = 256


def rows(array: np.ndarray, axis: int, mask: np.ndarray | None) -> np.ndarray:
    """``array`` as rows of features along ``axis`` (negative), in float64, padded positions dropped; for a
    feature map (``axis`` not last), at most :data:`PIXELS_PER_SAMPLE` evenly spaced pixels per sample."""
    array = np.asarray(array)
    keep = position_mask(array, mask)
    moved = np.moveaxis(array, axis, -1)
    if axis != -1 and array.ndim > 2:
        per_sample = moved.reshape(moved.shape[0], -1, moved.shape[-1])
        step = -(-per_sample.shape[1] // PIXELS_PER_SAMPLE)
        return per_sample[:, ::step].reshape(-1, moved.shape[-1]).astype(np.float64)
    if keep is not None and axis != -1 and array.ndim > 2:
        keep = None  # masks apply to [batch, seq, ...] layouts whose features are last
    flat = moved.reshape(-1, moved.shape[-1]).astype(np.float64)
    if keep is not None:
        flat = flat[np.broadcast_to(keep, array.shape[:-1] + (1,)).reshape(-1)]
    return flat


def conv_rows(x: np.ndarray, node: ir.Node) -> np.ndarray | None:
    """The input rows a pointwise (1x1, unpadded) Conv multiplies by its weight, or None for other convs."""
    attrs = node.attributes
    kernel = node.inputs[1].shape
    if any(d != 1 for d in list(kernel)[2:]):
        return None
    pads = attrs.get("pads")
    if pads is not None and any(pads.value):
        return None
    strides = attrs.get("strides")
    steps = tuple(strides.value) if strides is not None else (1,) * (x.ndim - 2)
    x = x[(slice(None), slice(None), *(slice(None, None, s) for s in steps))]
    return rows(x, 1, None)


def ridged(h: np.ndarray) -> np.ndarray:
    """``h`` plus :data:`RIDGE` times its mean diagonal on the diagonal (a copy)."""
    return h + np.eye(h.shape[0]) * RIDGE * max(float(np.mean(np.diag(h))), 1e-12)


def obs_order(h: np.ndarray, w: np.ndarray, width: int, count: int) -> tuple[list[int], np.ndarray]:
    """The ``count`` units (``width`` rows each of ``w`` ``[rows, outputs]``) whose greedy removal costs
    least, and the normalized cost of each unit at the time it was removed (see the module docstring)."""
    d = h.shape[0]
    units = d // width
    h = ridged(h)
    hinv = np.linalg.inv(h)
    w = w.astype(np.float64).copy()
    energy = max(float(np.sum(w * (h @ w))), 1e-30)
    alive = np.ones(units, dtype=bool)
    chosen, costs = [], []
    chunk = max(1, count // 32) if width == 1 else 1
    while len(chosen) < count:
        cost = _costs(hinv, w, width, alive) / energy
        take = min(chunk, count - len(chosen))
        order = [int(u) for u in np.argsort(cost, kind="stable") if alive[u]][:take]
        idx = (np.array(order)[:, None] * width + np.arange(width)[None, :]).reshape(-1)
        # removing the chunk at once: the same update as one unit after another
        block = np.linalg.inv(hinv[np.ix_(idx, idx)])
        w -= hinv[:, idx] @ (block @ w[idx])
        hinv -= hinv[:, idx] @ (block @ hinv[idx, :])
        w[idx] = 0
        for u in order:
            alive[u] = False
            chosen.append(u)
            costs.append(float(cost[u]))
    return chosen, np.array(costs)


def _costs(hinv: np.ndarray, w: np.ndarray, width: int, alive: np.ndarray) -> np.ndarray:
    units = alive.size
    cost = np.full(units, np.inf)
    if width == 1:
        diag = np.diag(hinv)
        live = alive & (diag > 0)
        cost[live] = np.sum(w[live] ** 2, axis=1) / diag[live]
        return cost
    for u in np.flatnonzero(alive):
        idx = slice(u * width, (u + 1) * width)
        wu = w[idx]
        cost[u] = float(np.sum(wu * np.linalg.solve(hinv[idx, idx], wu)))
    return cost


def combined_order(
    parts: list[tuple[np.ndarray, np.ndarray]], width: int, units: int, count: int
) -> list[int]:
    """Units to remove for a group read by several layers: each reader's normalized cost of removing a
    unit alone, summed (the greedy update is per reader, so several readers rank by first-step costs)."""
    if len(parts) == 1:
        return obs_order(parts[0][0], parts[0][1], width, count)[0]
    total = np.zeros(units)
    for h, w in parts:
        hh = ridged(h)
        energy = max(float(np.sum(w * (hh @ w))), 1e-30)
        total += _costs(np.linalg.inv(hh), w.astype(np.float64), width, np.ones(units, dtype=bool)) / energy
    return [int(u) for u in np.argsort(total, kind="stable")[:count]]


def refit(
    h: np.ndarray, c: np.ndarray, keep: np.ndarray, intercept: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Least squares ``x[:, keep] @ W (+ b) ~ y`` with a small ridge, from ``h``, the Gram matrix of ``x``
    with a ones column appended, and ``c`` = that matrix's transpose times ``y``: the reader's new weight
    rows (and bias)."""
    idx = np.append(keep, h.shape[0] - 1) if intercept else np.asarray(keep)
    sol = np.linalg.solve(ridged(h[np.ix_(idx, idx)]), c[idx])
    return (sol[:-1], sol[-1]) if intercept else (sol, None)
