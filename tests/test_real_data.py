"""Checks against the real Kermany folder in ../shared/data; skipped when it is absent.

Fast on purpose: lists files and reads a handful, never the whole set.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from conftest import SHARED_DATA
from pneumonia.data import grouped_split, list_split, resolve_split
from pneumonia.preprocess import PreprocessSpec, preprocess_bytes
from pneumonia.training.config import TrainConfig

pytestmark = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real data not present at {SHARED_DATA}"
)

#: Image counts from the data README (../shared/data/README.md).
EXPECTED = {"train": {0: 1214, 1: 3471}, "test": {0: 234, 1: 390}}


@pytest.mark.parametrize("split", ["train", "test"])
def test_layout_and_counts_match_the_readme(split: str) -> None:
    folder = resolve_split(SHARED_DATA, split)
    assert folder == SHARED_DATA / split
    samples = list_split(folder)
    assert Counter(s.label for s in samples) == EXPECTED[split]


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_real_file_name_has_a_patient(split: str) -> None:
    # A name matching no rule would silently become its own patient and could leak.
    samples = list_split(SHARED_DATA / split)
    assert [s.path.name for s in samples if s.patient == s.path.name] == []


def test_default_split_keeps_patients_on_one_side() -> None:
    cfg = TrainConfig()
    samples = list_split(SHARED_DATA / "train")
    train, val = grouped_split(samples, cfg.val_fraction, cfg.split_seed)
    assert {s.patient for s in train}.isdisjoint({s.patient for s in val})
    assert len(train) + len(val) == len(samples)
    for label in (0, 1):
        share = sum(s.label == label for s in val) / EXPECTED["train"][label]
        assert cfg.val_fraction <= share < cfg.val_fraction + 0.02


def test_real_images_become_the_spec_shape() -> None:
    spec = PreprocessSpec()
    samples = list_split(SHARED_DATA / "test")
    picks = [samples[0], samples[1], samples[-2], samples[-1]]  # both classes
    assert {s.label for s in picks} == {0, 1}
    for s in picks:
        x = preprocess_bytes(s.path.read_bytes(), spec)
        assert x.shape == spec.input_shape and x.dtype == np.float32
        assert 0.0 <= x.min() < x.max() <= 1.0
