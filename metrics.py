"""How close a model's outputs are to a reference's: each quantity defined once.

``ncc bench`` reports per output the mean per-sample cosine, the top-1 agreement and the SQNR;
``insert-qdq{min-cosine}`` scores an attempt by its worst output's mean cosine and ranks nodes by
relative L2 error. With ``r`` the reference output and ``q`` the one compared, samples on axis 0::

    cosine_i    = <r_i, q_i> / (|r_i| |q_i|)       each sample flattened; 1 if both are 0, 0 if one is
    top-1       = mean  argmax(r, -1) == argmax(q, -1)
    SQNR (dB)   = 10 log10( |r|^2 / |r - q|^2 )    over the whole output
    relative L2 = |r - q| / |r|

Transformers pad their inputs: where a model takes an ``attention_mask`` ``[batch, seq]``, its zeros
mark padded positions, whose outputs nothing reads; on short sentences they would decide the score.
:func:`position_mask` shapes the mask to an output that starts with ``[batch, seq]`` and the metrics
leave those positions out.

Cosine, top-1 and SQNR are computed in float64; the relative error, which only ranks nodes, in the
arrays' own precision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "MASK_INPUT",
    "token_masks",
    "position_mask",
    "unpadded",
    "sample_cosines",
    "worst_output_cosine",
    "top1_agreement",
    "sqnr_db",
    "relative_l2_error",
]

MASK_INPUT = "attention_mask"
"""The input whose zeros mark padded positions (the Hugging Face convention)."""


def token_masks(feeds: Sequence[Mapping[str, np.ndarray]]) -> list[np.ndarray | None]:
    """Per batch of ``feeds``, its ``attention_mask`` as booleans ``[batch, seq]``, or None."""
    masks = []
    for feed in feeds:
        mask = feed.get(MASK_INPUT)
        masks.append(np.asarray(mask) != 0 if mask is not None and np.ndim(mask) == 2 else None)
    return masks


def position_mask(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """``mask`` (``[batch, seq]``, nonzero at real positions) as booleans shaped to broadcast over
    ``array`` when ``array`` starts with those dimensions; else None."""
    if mask is None or np.ndim(mask) != 2 or np.shape(array)[:2] != np.shape(mask):
        return None
    keep = np.asarray(mask) != 0
    return keep.reshape(keep.shape + (1,) * (np.ndim(array) - 2))


def unpadded(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """``array`` in float64 with the positions ``mask`` pads zeroed (see :func:`position_mask`)."""
    array = np.asarray(array, dtype=np.float64)
    keep = position_mask(array, mask)
    return array if keep is None else array * keep


def sample_cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """The cosine of each sample (axis 0, flattened) of ``got`` with ``ref``'s, in float64."""
    ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    r = ref.reshape(ref.shape[0], -1) if ref.ndim else ref.reshape(1, 1)
    g = got.reshape(r.shape)
    nr, ng = np.linalg.norm(r, axis=1), np.linalg.norm(g, axis=1)
    dot = np.sum(r * g, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((nr == 0) & (ng == 0), 1.0, np.where((nr == 0) | (ng == 0), 0.0, dot / (nr * ng)))


def worst_output_cosine(
    reference: Mapping[str, Sequence[np.ndarray]],
    candidate: Mapping[str, Sequence[np.ndarray]],
    outputs: Sequence[str],
    masks: Sequence[np.ndarray | None] | None = None,
) -> float:
    """The smallest, over ``outputs``, mean per-sample cosine (at most 1). Outputs are given per name as
    one array per batch; ``masks`` (one per batch, see :func:`token_masks`) leave padded positions out."""
    worst = 1.0
    for name in outputs:
        ref = np.concatenate([_rows(a) for a in _unpadded_batches(reference[name], masks)])
        got = np.concatenate([_rows(a) for a in _unpadded_batches(candidate[name], masks)])
        worst = min(worst, float(sample_cosines(ref, got).mean()))
    return worst


def top1_agreement(ref: np.ndarray, got: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """How often the largest entry of the last axis is at the same place in ``got`` as in ``ref``; None for
    outputs with no class axis (rank < 2 or a last axis of 1). ``mask`` leaves padded positions out."""
    ref, got = np.asarray(ref), np.asarray(got)
    if ref.ndim < 2 or ref.shape[-1] <= 1:
        return None
    same = np.argmax(ref, axis=-1) == np.argmax(got, axis=-1)
    keep = position_mask(ref, mask) if ref.ndim > 2 else None
    return float(np.mean(same if keep is None else same[keep.reshape(keep.shape[:2])]))


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``got`` against ``ref`` in dB, in float64: ``inf`` when they
    are equal, ``-inf`` when ``ref`` is zero and they are not."""
    ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    signal, noise = float(np.sum(ref * ref)), float(np.sum((ref - got) ** 2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def relative_l2_error(
    ref: Sequence[np.ndarray], got: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None = None
) -> float:
    """``|ref - got| / |ref|`` over batches (one array per batch in each), padded positions left out, in the
    arrays' own precision (at least float32); 0 when ``ref`` is zero."""
    num = den = 0.0
    for i, (r, g) in enumerate(zip(ref, got)):
        diff = np.subtract(r, g, dtype=np.result_type(r, np.float32))
        keep = position_mask(r, _mask(masks, i))
        if keep is not None:
            diff *= keep
            r = r * keep
        flat_r, flat_d = r.reshape(-1), diff.reshape(-1)
        num += float(np.dot(flat_d, flat_d))
        den += float(np.dot(flat_r, flat_r))
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def _mask(masks: Sequence[np.ndarray | None] | None, i: int) -> np.ndarray | None:
    return masks[i] if masks is not None and i < len(masks) else None


def _unpadded_batches(arrays: Sequence[np.ndarray], masks) -> list[np.ndarray]:
    return [unpadded(a, _mask(masks, i)) for i, a in enumerate(arrays)]


def _rows(array: np.ndarray) -> np.ndarray:
    return array.reshape(array.shape[0], -1)
