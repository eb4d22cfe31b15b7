"""Tiny prepared directories written straight with pyarrow, following data/layout.py exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recforge.data import layout

# A feature: (kind, one value per id 1..N, cardinality). Values: int code, list of codes, float.
Feature = tuple[str, list[Any], int]

_ARROW_TYPES = {"categorical": pa.int32(), "list": pa.list_(pa.int32()), "numeric": pa.float32()}


def _feature_columns(
    features: dict[str, Feature],
) -> tuple[dict[str, pa.Array], dict[str, dict[str, Any]]]:
    columns = {
        name: pa.array(values, _ARROW_TYPES[kind]) for name, (kind, values, _) in features.items()
    }
    spec = {name: {"kind": kind, "cardinality": card} for name, (kind, _, card) in features.items()}
    return columns, spec


def write_prepared(
    directory: Path,
    sequences: list[list[int]],
    *,
    num_items: int,
    timestamps: list[list[int]] | None = None,
    split: dict[str, Any] | None = None,
    item_features: dict[str, Feature] | None = None,
    user_features: dict[str, Feature] | None = None,
    row_group_size: int = 4,
) -> Path:
    """Write a prepared dir; ``sequences[i]`` is the item list of user ``i + 1``."""
    directory.mkdir(parents=True, exist_ok=True)
    if timestamps is None:
        timestamps = [list(range(100, 100 + len(s))) for s in sequences]
    users = len(sequences)
    pq.write_table(
        pa.table(
            {
                "user_idx": pa.array(np.arange(1, users + 1), pa.int32()),
                "length": pa.array([len(s) for s in sequences], pa.int32()),
                "item_idx": pa.array(sequences, pa.list_(pa.int32())),
                "timestamp": pa.array(timestamps, pa.list_(pa.int64())),
            }
        ),
        directory / layout.SEQUENCES,
        row_group_size=row_group_size,
    )
    counts = np.bincount(
        np.concatenate([np.asarray(s, np.int64) for s in sequences] + [np.zeros(0, np.int64)]),
        minlength=num_items + 1,
    )
    item_cols, item_spec = _feature_columns(item_features or {})
    pq.write_table(
        pa.table(
            {
                "item_idx": pa.array(np.arange(1, num_items + 1), pa.int32()),
                "item_id": pa.array([f"item{i}" for i in range(1, num_items + 1)]),
                "count": pa.array(counts[1:], pa.int64()),
                **item_cols,
            }
        ),
        directory / layout.ITEMS,
    )
    user_cols, user_spec = _feature_columns(user_features or {})
    pq.write_table(
        pa.table(
            {
                "user_idx": pa.array(np.arange(1, users + 1), pa.int32()),
                "user_id": pa.array([f"user{u}" for u in range(1, users + 1)]),
                "count": pa.array([len(s) for s in sequences], pa.int64()),
                **user_cols,
            }
        ),
        directory / layout.USERS,
    )
    manifest = {
        "format_version": layout.FORMAT_VERSION,
        "split": split or {"type": "leave-one-out"},
        "users": users,
        "items": num_items,
        "features": {"item": item_spec, "user": user_spec},
        "sequences_row_group_size": row_group_size,
    }
    (directory / layout.MANIFEST).write_text(json.dumps(manifest))
    return directory


def random_prepared(
    directory: Path,
    *,
    users: int = 150,
    items: int = 60,
    max_length: int = 25,
    seed: int = 0,
    row_group_size: int = 7,
) -> tuple[Path, list[list[int]]]:
    """Random users with distinct items each (so (user, target) names a two-tower example)."""
    rng = np.random.default_rng(seed)
    sequences = [
        rng.choice(
            np.arange(1, items + 1), size=int(rng.integers(1, max_length + 1)), replace=False
        ).tolist()
        for _ in range(users)
    ]
    item_features: dict[str, Feature] = {
        "genre": ("categorical", [i % 4 for i in range(1, items + 1)], 4),
        "tags": ("list", [[(i + k) % 5 + 1 for k in range(i % 3)] for i in range(1, items + 1)], 6),
        "price": ("numeric", [float(i) for i in range(1, items + 1)], 0),
    }
    user_features: dict[str, Feature] = {
        "country": ("categorical", [u % 3 for u in range(1, users + 1)], 3)
    }
    write_prepared(
        directory,
        sequences,
        num_items=items,
        item_features=item_features,
        user_features=user_features,
        row_group_size=row_group_size,
    )
    return directory, sequences
