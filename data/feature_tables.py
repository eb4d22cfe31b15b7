"""Prepared item and user feature tables in memory (``items.parquet``, ``users.parquet``), indexed
by ``item_idx``/``user_idx``, as the loader, the exporter and the bias report read them; how
they are encoded at prepare time is :mod:`recforge.data.features`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recforge.data import storage
from recforge.data.errors import DataError
from recforge.data.layout import ITEMS, USERS
from recforge.data.ragged import gather_ragged, list_column


@dataclass(frozen=True)
class FeatureTable:
    """Encoded features of items or users, indexed by ``item_idx``/``user_idx`` (row 0 = padding).

    ``sparse_columns``: categorical and list features in manifest order, each ``(offsets (N + 2,),
    codes)``; a categorical feature has one code per row (none for the padding row).
    """

    sparse_columns: dict[str, tuple[np.ndarray, np.ndarray]]
    cardinalities: dict[str, int]
    dense_names: list[str]
    dense: np.ndarray  # (N + 1, n_numeric) float32, NaN and null -> 0

    def sparse(self, ids: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per sparse feature, ``(codes, lengths)`` of the rows ``ids`` (jagged)."""
        out = {}
        for name, (offsets, codes) in self.sparse_columns.items():
            lens = offsets[ids + 1] - offsets[ids]
            out[name] = (gather_ragged(codes, offsets[ids], lens), lens)
        return out


@dataclass(frozen=True)
class FeatureTables:
    item: FeatureTable
    user: FeatureTable


def load_feature_table(
    path: str | Path, id_column: str, num_rows: int, features: dict[str, dict[str, Any]]
) -> FeatureTable:
    """Read ``items.parquet``/``users.parquet`` features as described by the manifest."""
    names = storage.read_schema(path).names
    for column in [id_column, *features]:
        if column not in names:
            raise DataError(
                "column named by the manifest is missing", path=str(path), column=column
            )
    table = storage.read_table(path, columns=[id_column, *features])
    ids = table.column(id_column).to_numpy().astype(np.int64)
    if not np.array_equal(np.sort(ids), np.arange(1, num_rows + 1)):
        raise DataError(
            f"ids must be exactly 1..{num_rows} (the manifest's count)",
            path=str(path),
            column=id_column,
        )
    table = table.take(pa.array(np.argsort(ids)))  # row i <-> id i + 1
    sparse: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    cards: dict[str, int] = {}
    dense_names: list[str] = []
    dense_cols: list[np.ndarray] = []
    for name, spec in features.items():
        kind, col = spec.get("kind"), table.column(name)
        if kind == "numeric":
            values = col.to_numpy(zero_copy_only=False).astype(np.float32)
            dense_names.append(name)
            dense_cols.append(
                np.nan_to_num(np.concatenate([[0.0], values]).astype(np.float32), nan=0.0)
            )
            continue
        if kind == "categorical":
            codes = pc.fill_null(col, 0).to_numpy().astype(np.int64)
            lens = np.ones(num_rows, np.int64)
        elif kind == "list":
            codes, lens = list_column(table, name)
            codes = codes.astype(np.int64)
        else:
            raise DataError(
                f"manifest feature kind {kind!r}: expected categorical, list or numeric",
                path=str(path),
                column=name,
            )
        card = int(spec.get("cardinality", 0))
        if len(codes) and (codes.min() < 0 or codes.max() >= card):
            raise DataError(
                f"codes must lie in [0, cardinality={card})", path=str(path), column=name
            )
        sparse[name] = (np.concatenate([[0, 0], np.cumsum(lens)]), codes)
        cards[name] = card
    dense = np.stack(dense_cols, axis=1) if dense_cols else np.zeros((num_rows + 1, 0), np.float32)
    return FeatureTable(sparse, cards, dense_names, dense)


def load_feature_tables(data_dir: str | Path, manifest: dict[str, Any]) -> FeatureTables:
    features = manifest.get("features", {})
    return FeatureTables(
        item=load_feature_table(
            storage.join(data_dir, ITEMS),
            "item_idx",
            int(manifest["items"]),
            features.get("item", {}),
        ),
        user=load_feature_table(
            storage.join(data_dir, USERS),
            "user_idx",
            int(manifest["users"]),
            features.get("user", {}),
        ),
    )
