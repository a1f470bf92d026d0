"""ncc.metrics: padded positions (an ``attention_mask`` input's zeros) are left out of every measure, and
the edge cases (zero outputs, equal outputs, no class axis) have defined values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ncc.metrics import (
    relative_l2_error,
    sample_cosines,
    sqnr_db,
    token_masks,
    top1_agreement,
    unpadded,
    worst_output_cosine,
)


def _batch(rng, lengths, seq=6, hidden=4):
    mask = (np.arange(seq)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    return {"input_ids": np.zeros_like(mask), "attention_mask": mask}, rng.normal(
        size=(len(lengths), seq, hidden)
    )


def test_padded_positions_do_not_count():
    rng = np.random.default_rng(0)
    feeds, ref = _batch(rng, [2, 3, 6])
    got = ref.copy()
    pad = ~feeds["attention_mask"].astype(bool)
    got[pad] = rng.normal(size=got[pad].shape) * 10  # garbage where the model's output is never read
    masks = token_masks([feeds])
    assert worst_output_cosine({"y": [ref]}, {"y": [got]}, ["y"], masks) == 1.0
    assert worst_output_cosine({"y": [ref]}, {"y": [got]}, ["y"]) < 0.5
    assert relative_l2_error([ref], [got], masks) == 0.0
    mask = feeds["attention_mask"]
    assert top1_agreement(ref, got, mask) == 1.0 and top1_agreement(ref, got) < 1.0
    assert sqnr_db(unpadded(ref, mask), unpadded(got, mask)) == math.inf


def test_valid_positions_still_count():
    rng = np.random.default_rng(1)
    feeds, ref = _batch(rng, [4, 5])
    got = ref.copy()
    got[0, 1] = -got[0, 1]  # one real token flipped
    masks = token_masks([feeds])
    assert worst_output_cosine({"y": [ref]}, {"y": [got]}, ["y"], masks) < 0.9
    assert relative_l2_error([ref], [got], masks) > 0.1


def test_outputs_without_a_sequence_axis_and_models_without_a_mask():
    rng = np.random.default_rng(2)
    feeds, _ = _batch(rng, [2, 6])
    pooled = rng.normal(size=(2, 4))  # [batch, hidden]: not [batch, seq, ...], compared whole
    masks = token_masks([feeds])
    assert worst_output_cosine({"p": [pooled]}, {"p": [-pooled]}, ["p"], masks) == pytest.approx(-1.0)
    assert token_masks([{"image": np.zeros((2, 3, 8, 8), np.float32)}]) == [None]


def test_edge_cases():
    zero, one = np.zeros((1, 3)), np.ones((1, 3))
    assert sample_cosines(zero, zero).tolist() == [1.0] and sample_cosines(zero, one).tolist() == [0.0]
    assert sqnr_db(one, one) == math.inf and sqnr_db(zero, one) == -math.inf
    assert sqnr_db(one, 0.9 * one) == pytest.approx(20.0)
    assert top1_agreement(np.ones(3), np.ones(3)) is None and top1_agreement(one.T, one.T) is None
    assert relative_l2_error([zero], [one]) == 0.0
