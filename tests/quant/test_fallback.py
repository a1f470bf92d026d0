"""min-cosine's measurements: padded positions (an ``attention_mask`` input's zeros) are left out."""

from __future__ import annotations

import numpy as np
import pytest
from ncc.passes.quant import fallback


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
    masks = fallback.token_masks([feeds])
    assert fallback.fidelity({"y": [ref]}, {"y": [got]}, ["y"], masks) == 1.0
    assert fallback.fidelity({"y": [ref]}, {"y": [got]}, ["y"]) < 0.5
    assert fallback._rel_error([ref], [got], masks) == 0.0


def test_valid_positions_still_count():
    rng = np.random.default_rng(1)
    feeds, ref = _batch(rng, [4, 5])
    got = ref.copy()
    got[0, 1] = -got[0, 1]  # one real token flipped
    masks = fallback.token_masks([feeds])
    assert fallback.fidelity({"y": [ref]}, {"y": [got]}, ["y"], masks) < 0.9
    assert fallback._rel_error([ref], [got], masks) > 0.1


def test_outputs_without_a_sequence_axis_and_models_without_a_mask():
    rng = np.random.default_rng(2)
    feeds, _ = _batch(rng, [2, 6])
    pooled = rng.normal(size=(2, 4))  # [batch, hidden]: not [batch, seq, ...], compared whole
    masks = fallback.token_masks([feeds])
    assert fallback.fidelity({"p": [pooled]}, {"p": [-pooled]}, ["p"], masks) == pytest.approx(-1.0)
    assert fallback.token_masks([{"image": np.zeros((2, 3, 8, 8), np.float32)}]) == [None]
