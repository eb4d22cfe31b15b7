"""``data.train_through``: a refit trains on each user's validation item too, and nothing else
changes (the evaluation stages keep their examples)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from loader_fixtures import write_prepared

from recforge.data.datamodule import SequenceDataModule

# Leave-one-out: user 1 trains on [1, 2, 3, 4], validates on 5, tests on 6; user 2 on [7, 8], 9,
# 10; users 3 and 4 are too short to hold anything out (all training).
SEQUENCES = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10], [3, 9], [5]]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return write_prepared(tmp_path, SEQUENCES, num_items=10)


def _module(data_dir: Path, batch_format: str, through: str) -> SequenceDataModule:
    return SequenceDataModule(
        str(data_dir),
        batch_format=batch_format,  # type: ignore[arg-type]
        batch_size=16,
        eval_batch_size=16,
        max_len=10,
        history_len=10,
        train_through=through,  # type: ignore[arg-type]
    )


def _rows(batch: dict[str, torch.Tensor]) -> list[tuple[int, list[int], list[int]]]:
    """(user, inputs, targets) per SASRec training row, sorted by user."""
    out = []
    for u, i, t, n in zip(
        batch["user_idx"].tolist(),
        batch["input_ids"].tolist(),
        batch["target_ids"].tolist(),
        batch["lengths"].tolist(),
    ):
        out.append((u, i[:n], t[:n]))
    return sorted(out)


def test_sequence_batches_train_through_the_validation_item(data_dir: Path) -> None:
    (plain,) = list(_module(data_dir, "sequence", "train").train_dataloader())
    (refit,) = list(_module(data_dir, "sequence", "validation").train_dataloader())
    assert _rows(plain) == [(1, [1, 2, 3], [2, 3, 4]), (2, [7], [8]), (3, [3], [9])]
    # The validation items 5 and 9 become the last targets; test items 6 and 10 never appear.
    assert _rows(refit) == [(1, [1, 2, 3, 4], [2, 3, 4, 5]), (2, [7, 8], [8, 9]), (3, [3], [9])]
    for stage in ("val", "test"):
        a = list(getattr(_module(data_dir, "sequence", "train"), f"{stage}_dataloader")())
        b = list(getattr(_module(data_dir, "sequence", "validation"), f"{stage}_dataloader")())
        assert [x["target"].tolist() for x in a] == [x["target"].tolist() for x in b]


def test_history_batches_train_through_the_validation_item(data_dir: Path) -> None:
    def targets(through: str) -> list[tuple[int, int]]:
        (batch,) = list(_module(data_dir, "history", through).train_dataloader())
        return sorted(zip(batch["user_idx"].tolist(), batch["target"].tolist()))

    assert targets("train") == [(1, 2), (1, 3), (1, 4), (2, 8), (3, 9)]
    assert targets("validation") == [(1, 2), (1, 3), (1, 4), (1, 5), (2, 8), (2, 9), (3, 9)]


def test_unknown_value_is_refused(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="train_through must be one of"):
        _module(data_dir, "sequence", "test")


def test_all_windows_cover_every_target_through_the_validation_item(data_dir: Path) -> None:
    # Windows of 2 targets cut from the end of the trained part: user 1's [1, 2, 3, 4, 5] gives
    # targets [4, 5] and [2, 3]; user 2's [7, 8, 9] one window. Test items 6, 10 never appear.
    module = SequenceDataModule(
        str(data_dir), batch_size=16, max_len=2, train_windows="all", train_through="validation"
    )
    (batch,) = list(module.train_dataloader())
    assert _rows(batch) == [
        (1, [1, 2], [2, 3]),
        (1, [3, 4], [4, 5]),
        (2, [7, 8], [8, 9]),
        (3, [3], [9]),
    ]
