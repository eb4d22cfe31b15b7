"""Shape statistics of a prepared dataset, the ones training settings are derived from.

``recforge data prepare`` (both engines) and ``recforge data forget`` write two manifest
entries beside ``sequence_length`` (docs/architecture.md §3):

- ``train_length``: per user with at least one training item, the length of the training part
  of the sequence (what the model trains on): ``p50``, ``p90``, ``p95``, ``p99`` (the smallest
  length that at least that share of users do not exceed) and ``mean``.
- ``item_interactions``: interactions per item (every split), ``mean`` and ``median``.

Manifests written before these entries existed still work: :func:`with_statistics` derives
the missing entries from ``sequences.parquet`` and ``items.parquet``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from recforge.data import layout, storage

log = logging.getLogger(__name__)

PERCENTILES = (50, 90, 95, 99)
TRAIN_LENGTH = "train_length"
ITEM_INTERACTIONS = "item_interactions"


def train_length_stats(train_lengths: np.ndarray) -> dict[str, float]:
    """Percentiles and mean of the training lengths of the users that have any."""
    lengths = np.asarray(train_lengths, dtype=np.int64)
    lengths = lengths[lengths > 0]
    if len(lengths) == 0:
        return {**{f"p{q}": 0 for q in PERCENTILES}, "mean": 0.0}
    stats: dict[str, float] = {
        f"p{q}": int(np.percentile(lengths, q, method="inverted_cdf")) for q in PERCENTILES
    }
    stats["mean"] = float(lengths.mean())
    return stats


def item_interaction_stats(item_counts: np.ndarray) -> dict[str, float]:
    """Mean and median interactions per item of the vocabulary."""
    counts = np.asarray(item_counts, dtype=np.int64)
    if len(counts) == 0:
        return {"mean": 0.0, "median": 0.0}
    return {"mean": float(counts.mean()), "median": float(np.median(counts))}


def manifest_entries(train_lengths: np.ndarray, item_counts: np.ndarray) -> dict[str, Any]:
    """The manifest's ``train_length`` and ``item_interactions`` entries."""
    return {
        TRAIN_LENGTH: train_length_stats(train_lengths),
        ITEM_INTERACTIONS: item_interaction_stats(item_counts),
    }


def has_statistics(manifest: dict[str, Any]) -> bool:
    return TRAIN_LENGTH in manifest and ITEM_INTERACTIONS in manifest


def with_statistics(directory: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with its shape statistics; a manifest written before they existed gets them
    from the directory's parquet files (a ``length`` and an ``items`` ``count`` column read; the
    timestamps too under a time split). The manifest file itself is left as it is."""
    if has_statistics(manifest):
        return manifest
    log.info(
        "%s: the manifest predates %s/%s; deriving them from %s (re-prepare to store them)",
        directory,
        TRAIN_LENGTH,
        ITEM_INTERACTIONS,
        layout.SEQUENCES,
    )
    columns = ["length"] + (["timestamp"] if manifest["split"]["type"] == "time" else [])
    sequences = storage.read_table(storage.join(directory, layout.SEQUENCES), columns=columns)
    lengths = sequences["length"].to_numpy().astype(np.int64)
    flat_ts = None
    if "timestamp" in columns:
        import pyarrow.compute as pc

        flat_ts = pc.list_flatten(sequences["timestamp"]).to_numpy()
    train_end, _ = layout.split_bounds(manifest["split"], lengths, flat_ts)
    counts = storage.read_table(storage.join(directory, layout.ITEMS), columns=["count"])
    return {**manifest, **manifest_entries(train_end, counts["count"].to_numpy())}
