"""``eval_max_users``: a fixed random sample of evaluation users, chosen in the example index
(data/examples.py), the same on every run and under every rank split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from loader_fixtures import random_prepared

from recforge.data.examples import ExampleIndex, ExampleSpec, scan_examples
from recforge.data.feature_tables import load_feature_tables
from recforge.data.layout import read_manifest
from recforge.data.loader import EpochBatchSampler, SequenceBatchDataset


def _index(directory: Path, model: str, stage: str) -> ExampleIndex:
    spec = ExampleSpec(model, stage, max_len=4, history_len=3)  # type: ignore[arg-type]
    (index,) = scan_examples(directory, read_manifest(directory)["split"], [spec])
    return index


def _users(directory: Path, index: ExampleIndex, model: str, world: int, batch: int) -> list[int]:
    """Every real (weight 1) example's user over all ranks of one epoch."""
    manifest = read_manifest(directory)
    features = load_feature_tables(directory, manifest) if model == "history" else None
    users: list[int] = []
    for rank in range(world):
        ds = SequenceBatchDataset(
            directory,
            index,
            manifest["split"],
            batch_size=batch,
            rank=rank,
            world_size=world,
            shuffle=False,
            shuffle_window=10,
            features=features,
        )
        for key in EpochBatchSampler(ds):
            b = ds[key]
            users += b["user_idx"][b["weight"] > 0].tolist()
    return users


@pytest.mark.parametrize("model", ["sequence", "history"])
@pytest.mark.parametrize("stage", ["validate", "test"])
def test_sample_is_fixed_and_independent_of_ranks(tmp_path: Path, model: str, stage: str) -> None:
    directory, _ = random_prepared(tmp_path / "d")
    full = _index(directory, model, stage)
    eligible = set(_users(directory, full, model, 1, 7))
    assert len(eligible) == full.num_examples > 40
    sampled = full.sample(40, seed=3)
    assert sampled.sampled and sampled.num_examples == 40
    assert sampled.num_eligible == full.num_examples
    one = _users(directory, sampled, model, 1, 7)
    assert len(one) == len(set(one)) == 40 and set(one) <= eligible
    for world, batch in ((2, 6), (3, 4)):
        assert sorted(_users(directory, sampled, model, world, batch)) == sorted(one)
    again = _index(directory, model, stage).sample(40, seed=3)
    assert np.array_equal(again.kept, sampled.kept) and np.array_equal(again.counts, sampled.counts)
    other = set(_users(directory, full.sample(40, seed=4), model, 1, 7))
    assert other != set(one)


def test_sample_bounds(tmp_path: Path) -> None:
    directory, _ = random_prepared(tmp_path / "d")
    full = _index(directory, "sequence", "test")
    assert full.sample(None, seed=0) is full and not full.sampled
    assert full.sample(full.num_examples + 5, seed=0) is full
    with pytest.raises(ValueError, match="max_examples"):
        full.sample(0, seed=0)
    with pytest.raises(ValueError, match="evaluation"):
        _index(directory, "sequence", "train").sample(3, seed=0)
