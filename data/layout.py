"""The prepared dataset directory (docs/architecture.md §3): file names, schemas and the split rule.

A prepared directory holds:

- ``manifest.json``: see :func:`read_manifest`; ``split`` defines the evaluation split.
- ``items.parquet``: ``item_idx`` int32 (1..N, 0 is padding), ``item_id`` (original type),
  ``count`` int64 (interactions after filtering), then one column per item feature:
  categorical -> int32 code, list -> list<int32> codes, numeric -> float32. Code 0 means
  missing/unknown; the code <-> value tables are in ``feature_vocabs.json``.
- ``users.parquet``: ``user_idx`` int32 (1..U), ``user_id``, ``count`` int64, user features
  encoded the same way.
- ``sequences.parquet``: one row per user, sorted by ``user_idx``: ``user_idx`` int32,
  ``length`` int32, ``item_idx`` list<int32> and ``timestamp`` list<int64> in time order
  (ties keep input order). Written in row groups of ``manifest['sequences_row_group_size']``
  users so loaders can stream them.

Split (``manifest['split']``):

- ``{"type": "leave-one-out"}``: for a user with n >= 3 interactions, the last item is the test
  target, the second to last the validation target, the rest is training. Users with n < 3
  have no evaluation targets; all their items are training.
- ``{"type": "time", "val_start": t1, "test_start": t2}``: interactions with
  timestamp >= t2 are test, t1 <= timestamp < t2 validation, the rest training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ITEMS = "items.parquet"
USERS = "users.parquet"
SEQUENCES = "sequences.parquet"
FEATURE_VOCABS = "feature_vocabs.json"
PADDING_IDX = 0


def read_manifest(directory: str | Path) -> dict[str, Any]:
    from recforge.data import storage  # pyarrow's filesystems load only when a manifest is read

    path = storage.join(directory, MANIFEST)
    storage.check_reachable(directory)
    try:
        manifest = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: not a prepared dataset (no {MANIFEST}); run `recforge data prepare`"
        ) from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    return manifest


def split_bounds(
    split: dict[str, Any], lengths: np.ndarray, flat_timestamps: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per user, the end of the training part and the end of the validation part.

    Returns ``(train_end, val_end)`` int64 arrays: training items are ``seq[:train_end]``, the
    validation items ``seq[train_end:val_end]``, test items ``seq[val_end:]``. Leave-one-out
    needs only ``lengths`` (each >= 1); the time split also needs the users' timestamp lists
    concatenated in the same user order (``flat_timestamps``, length ``lengths.sum()``).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if split["type"] == "leave-one-out":
        has_eval = lengths >= 3
        train_end = np.where(has_eval, lengths - 2, lengths)
        val_end = np.where(has_eval, lengths - 1, lengths)
        return train_end, val_end
    if split["type"] == "time":
        if flat_timestamps is None:
            raise ValueError("the time split needs the users' timestamps")
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        ts = np.asarray(flat_timestamps)
        # Sequences are time-ordered, so "items before the cut" is a count per user.
        train_end = (
            np.add.reduceat((ts < split["val_start"]).astype(np.int64), starts)
            if len(ts)
            else starts
        )
        val_end = (
            np.add.reduceat((ts < split["test_start"]).astype(np.int64), starts)
            if len(ts)
            else starts
        )
        return train_end.astype(np.int64), val_end.astype(np.int64)
    raise ValueError(f"manifest split type {split['type']!r}: expected 'leave-one-out' or 'time'")
