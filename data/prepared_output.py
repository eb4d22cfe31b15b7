"""What both prepare engines write once the sequences are in the temporary directory: the
manifest, ``items``/``users.parquet``, the feature vocabularies and the fingerprint over them,
and the atomic rename into place (docs/architecture.md §3)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recforge.atomic import TargetExistsError, atomic_directory
from recforge.data import consent, layout, stats
from recforge.data.errors import DataError
from recforge.data.features import EncodedFeatures
from recforge.data.readers import SourceFile

if TYPE_CHECKING:
    from recforge.data.prepare import PrepareConfig


def build_manifest(
    config: PrepareConfig,
    sources: list[SourceFile],
    n_input: int,
    removed: dict[str, int],
    out_of_order: int,
    kcore: dict[str, int],
    interactions: int,
    n_users: int,
    n_items: int,
    has_rating: bool,
    split: dict[str, Any],
    split_counts: dict[str, int],
    lengths: np.ndarray,
    item_feats: EncodedFeatures | None,
    user_feats: EncodedFeatures | None,
    vocab_from: dict[str, Any] | None = None,
    exclusion: consent.Exclusion | None = None,
    *,
    train_lengths: np.ndarray,
    item_counts: np.ndarray,
) -> dict[str, Any]:
    """The manifest both engines write; one builder so their fields cannot drift apart.

    ``n_users``/``n_items`` are the vocabulary sizes; ``lengths`` are those of the users with
    a sequence (fewer than ``n_users`` only under ``vocab_from``), ``train_lengths`` the
    training part of each (the split's ``train_end``), ``item_counts`` the interactions per
    item of the vocabulary."""
    manifest = {
        "format_version": layout.FORMAT_VERSION,
        "created_by": "recforge data prepare",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {
            "format": config.format,
            "files": [asdict(s) for s in sources],
            "columns": asdict(config.columns),
        },
        "input_rows": n_input,
        "rows_removed": removed,
        "rows_out_of_time_order": out_of_order,
        "tie_rule": "interactions of a user with equal timestamps keep their input order",
        "filters": {
            "min_user": config.min_user,
            "min_item": config.min_item,
            "k_core_iterations": kcore["iterations"],
            "users_removed": kcore["users_removed"],
            "items_removed": kcore["items_removed"],
        },
        "interactions": interactions,
        "users": n_users,
        "items": n_items,
        "has_rating": has_rating,
        "split": split,
        "split_counts": split_counts,
        "sequence_length": {
            "min": int(lengths.min()),
            "median": float(np.median(lengths)),
            "mean": float(lengths.mean()),
            "max": int(lengths.max()),
        },
        **stats.manifest_entries(train_lengths, item_counts),
        "features": {
            "item": item_feats.spec if item_feats else {},
            "user": user_feats.spec if user_feats else {},
        },
        "feature_files": {
            k: v.report for k, v in (("item", item_feats), ("user", user_feats)) if v
        },
        "sequences_row_group_size": config.row_group_size,
    }
    if vocab_from is not None:
        manifest["vocab_from"] = vocab_from
    if exclusion is not None:
        manifest.update(exclusion.manifest_entries(config))
    return manifest


def write_atomic(out: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    try:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            write(tmp)
    except TargetExistsError:
        raise DataError("output directory appeared while preparing", path=str(out)) from None


def write_tables_and_manifest(
    tmp: Path,
    manifest: dict,
    user_ids: pa.Array,
    item_ids: pa.Array,
    user_counts: np.ndarray,
    item_counts: np.ndarray,
    item_feats: EncodedFeatures | None,
    user_feats: EncodedFeatures | None,
) -> None:
    """items/users.parquet, the feature vocabularies and the manifest, once sequences.parquet is
    in ``tmp`` (the fingerprint covers it)."""
    for name, ids, counts, feats, idx_col in (
        (layout.ITEMS, item_ids, item_counts, item_feats, "item_idx"),
        (layout.USERS, user_ids, user_counts, user_feats, "user_idx"),
    ):
        id_col = "item_id" if idx_col == "item_idx" else "user_id"
        cols = {
            idx_col: pa.array(np.arange(1, len(ids) + 1, dtype=np.int32)),
            id_col: ids,
            "count": pa.array(counts.astype(np.int64)),
        }
        if feats is not None:
            clash = set(feats.columns) & set(cols)
            if clash:
                raise DataError(
                    f"feature column(s) {sorted(clash)} clash with recforge's own columns; "
                    "rename them"
                )
            cols.update(feats.columns)
        pq.write_table(pa.table(cols), tmp / name)

    vocabs = {
        "item": item_feats.vocabs if item_feats else {},
        "user": user_feats.vocabs if user_feats else {},
    }
    with open(tmp / layout.FEATURE_VOCABS, "w") as f:
        json.dump(vocabs, f)
    manifest["fingerprint"] = data_fingerprint(tmp)
    with open(tmp / layout.MANIFEST, "w") as f:
        json.dump(manifest, f, indent=2, default=_json_default)
        f.write("\n")


def data_fingerprint(directory: Path) -> str:
    """The manifest's ``fingerprint``: sha256 over the data files' names and bytes."""
    digest = hashlib.sha256()
    for name in (layout.SEQUENCES, layout.ITEMS, layout.USERS, layout.FEATURE_VOCABS):
        digest.update(name.encode())
        with open(directory / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")
