"""`recforge data prepare`: raw interactions -> the prepared directory of docs/architecture.md §3.

This module is ``--engine memory``, the reference; the default engine, ``duckdb``
(:mod:`recforge.data.prepare_duckdb`), does the same steps out of core. Both apply the split
rules of :mod:`recforge.data.split_rules` and write everything but ``sequences.parquet`` with
:mod:`recforge.data.prepared_output`.

All work is vectorised over Arrow/numpy arrays (no Python loop per row). The output is written
to a temporary directory beside ``out`` and renamed into place, so a failure leaves nothing.

Order of operations, each counted in the manifest:
1. read and validate every input file (errors name file, column and row), and leave out the
   rows of opted-out and erased users and rows without consent (:mod:`recforge.data.consent`);
2. sort each user's interactions by timestamp; ties keep input order (``rows_out_of_time_order``
   counts rows that came in the input before an earlier-timestamped row of the same user);
3. drop exact duplicate rows (same user, item, timestamp and rating; the first one stays);
4. k-core: drop users with < ``min_user`` and items with < ``min_item`` interactions, repeated
   until nothing changes;
5. id vocabularies over what is left: idx 1..N in sorted original-id order, 0 is padding
   (``--vocab-from``: a previous directory's indices kept, unknown ids appended sorted);
6. split (leave-one-out, or global time cut points) and write.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recforge.data import consent, erasure, layout, vocab
from recforge.data.errors import DataError
from recforge.data.features import EncodedFeatures, encode_features, read_feature_table
from recforge.data.prepared_output import build_manifest, write_atomic, write_tables_and_manifest
from recforge.data.readers import FORMATS, Columns, read_interactions
from recforge.data.split_rules import require_eval_users, split_counts, time_split
from recforge.data.staging import involves_remote, prepare_staged

log = logging.getLogger(__name__)


@dataclass
class PrepareConfig:
    input: list[str]
    """Interaction files, directories or globs."""
    out: str
    """Prepared dataset directory to create."""
    format: Literal["parquet", "csv", "movielens", "recbole", "sasrec-txt"] = "parquet"
    """Input format."""
    columns: Columns = field(default_factory=Columns)
    """Names of the user, item, timestamp and optional rating columns (parquet, csv, recbole)."""
    item_features: str | None = None
    """Item features: Parquet or RecBole ``.item``. For recbole input, a ``.item`` beside the
    ``.inter`` is used unless ``no_features`` is set."""
    user_features: str | None = None
    """User features: Parquet or RecBole ``.user`` (same rule as ``item_features``)."""
    item_feature_columns: list[str] | None = None
    """Item feature columns to keep (default: all but the id)."""
    user_feature_columns: list[str] | None = None
    """User feature columns to keep (default: all but the id)."""
    list_columns: list[str] = field(default_factory=list)
    """Feature columns holding several values separated by whitespace or '|' (e.g. genres)."""
    categorical_columns: list[str] = field(default_factory=list)
    """Numeric feature columns to treat as categories (e.g. an occupation code)."""
    no_features: bool = False
    """Do not pick up RecBole ``.item``/``.user`` files automatically."""
    min_user: int = 0
    """k-core: drop users with fewer interactions (0 = off)."""
    min_item: int = 0
    """k-core: drop items with fewer interactions (0 = off)."""
    min_eval_users: int = 1
    """Fewest users with a validation and with a test example (a target and a history before
    it) the dataset must have; fewer is an error rather than a dataset nothing can evaluate."""
    split: Literal["leave-one-out", "time"] = "leave-one-out"
    """Evaluation split."""
    val_fraction: float = 0.1
    """Time split: share of interactions (by time) in validation."""
    test_fraction: float = 0.1
    """Time split: share of interactions (by time) in test."""
    row_group_size: int = 4096
    """Users per row group of sequences.parquet (the loader's unit of streaming)."""
    overwrite: bool = False
    """Replace ``out`` if it exists."""
    engine: Literal["duckdb", "memory"] = "duckdb"
    """``duckdb``: out of core, spilling to ``spill_dir``; ``memory``: everything in RAM, the
    reference the DuckDB engine is tested against."""
    memory_limit: str = "4GB"
    """DuckDB engine: the whole process's memory limit (e.g. ``4GB``); DuckDB gets about three
    quarters of it, the rest is kept for Arrow, numpy and Python, and work beyond it spills."""
    spill_dir: str | None = None
    """DuckDB engine: where to spill (default: beside ``out``); a fresh folder in it is used
    and removed afterwards."""
    vocab_from: str | None = None
    """A previous prepared directory whose user/item indices are kept; ids it does not know
    are appended after them (see :mod:`recforge.data.vocab`)."""
    opt_out: str | None = None
    """User ids whose rows are left out: text, one per line, or Parquet with a user id column
    (:mod:`recforge.data.consent`). Consent column: ``columns.consent``."""
    erasure_ledger: str | None = None
    """The erasure ledger of this input (default: ``erasures.jsonl`` beside the first input,
    :mod:`recforge.data.erasure`); its users are left out and its location recorded."""

    def validate(self) -> None:
        if not self.input:
            raise ValueError("input: at least one file, directory or glob is required")
        if self.format not in FORMATS:
            raise ValueError(f"format: {self.format!r}; expected one of {', '.join(FORMATS)}")
        if self.min_user < 0 or self.min_item < 0:
            raise ValueError("min_user/min_item: must be >= 0")
        if self.min_eval_users < 0:
            raise ValueError("min_eval_users: must be >= 0")
        if self.split not in ("leave-one-out", "time"):
            raise ValueError(f"split: {self.split!r}; expected 'leave-one-out' or 'time'")
        if not (
            0 < self.val_fraction < 1
            and 0 < self.test_fraction < 1
            and self.val_fraction + self.test_fraction < 1
        ):
            raise ValueError("val_fraction/test_fraction: each in (0, 1) and their sum < 1")
        if self.row_group_size < 1:
            raise ValueError("row_group_size: must be >= 1")
        if self.engine not in ("duckdb", "memory"):
            raise ValueError(f"engine: {self.engine!r}; expected 'duckdb' or 'memory'")


def prepare(config: PrepareConfig) -> dict[str, Any]:
    """Prepare a dataset directory; returns its manifest."""
    config.validate()
    consent.check_options(config.format, config.columns.consent)
    consent.opt_out_path_exists(config.opt_out)
    if config.erasure_ledger is None:
        # Fixed before staging, so the manifest names the ledger beside the original input.
        config = replace(config, erasure_ledger=erasure.default_ledger_path(config.input))
    if involves_remote(config):
        return prepare_staged(config, prepare)
    out = Path(config.out)
    if out.exists() and not config.overwrite:
        raise DataError("output directory exists (pass --overwrite to replace it)", path=str(out))
    if config.vocab_from is not None:
        vocab.check_previous(config.vocab_from)
    if config.engine == "duckdb":
        from recforge.data.prepare_duckdb import prepare_duckdb

        return prepare_duckdb(config)
    started = time.perf_counter()
    exclusion = consent.Exclusion.of(config)
    table, sources = read_interactions(config.input, config.format, config.columns)
    n_input = table.num_rows
    log.info("read %d interactions from %d file(s)", n_input, len(sources))
    # Consent first: no later step (duplicates, k-core, vocabularies) sees an excluded row.
    table, removed, exclusion.counts = consent.filter_table(
        table, exclusion.opt_out, config.columns.consent, exclusion.ledger
    )
    if table.num_rows == 0:
        raise DataError(
            f"no interactions left after consent and opt-out ({removed})",
            path=", ".join(s.path for s in sources),
        )

    user_code, user_dict = _sorted_codes(table["user_id"])
    item_code, item_dict = _sorted_codes(table["item_id"])
    ts = table["timestamp"].to_numpy()
    rating = table["rating"].to_numpy() if "rating" in table.column_names else None
    del table

    order = _time_order(user_code, ts)
    out_of_order = _count_out_of_order(user_code[order], order)
    user_code, item_code, ts = user_code[order], item_code[order], ts[order]
    rating = rating[order] if rating is not None else None
    del order

    dup = _exact_duplicates(user_code, item_code, ts, rating)
    removed["exact_duplicates"] = int(dup.sum())
    keep = ~dup
    kcore = _k_core(user_code, item_code, keep, config.min_user, config.min_item)
    removed["min_user"] = kcore["rows_removed_min_user"]
    removed["min_item"] = kcore["rows_removed_min_item"]
    if not keep.any():
        raise DataError(
            f"no interactions left after filtering ({removed}); lower --min-user/--min-item",
            path=", ".join(s.path for s in sources),
        )
    user_code, item_code, ts = user_code[keep], item_code[keep], ts[keep]
    rating = rating[keep] if rating is not None else None

    user_idx, user_ids = _compact(user_code, user_dict)
    item_idx, item_ids = _compact(item_code, item_dict)
    vocab_from = None
    if config.vocab_from is not None:
        user_idx, item_idx, user_ids, item_ids, order, vocab_from = vocab.renumber(
            config.vocab_from, user_idx, item_idx, user_ids, item_ids
        )
        ts = ts[order]
        rating = rating[order] if rating is not None else None
    n_users, n_items = len(user_ids), len(item_ids)
    user_counts = np.bincount(user_idx, minlength=n_users + 1)[1:]
    item_counts = np.bincount(item_idx, minlength=n_items + 1)[1:]
    # Users carried over by --vocab-from without interactions now have no sequence.
    seq_users = np.flatnonzero(user_counts) + 1
    lengths = user_counts[seq_users - 1]

    split, split_counts, bounds = _split(config, lengths, ts)

    item_feats = features(config, "item", item_ids)
    user_feats = features(config, "user", user_ids)
    # After every input has been read and checked: bad input is named before a degenerate split.
    require_eval_users(config, split, lengths, *bounds)

    manifest = build_manifest(
        config,
        sources,
        n_input,
        removed,
        out_of_order,
        kcore,
        int(len(item_idx)),
        n_users,
        n_items,
        rating is not None,
        split,
        split_counts,
        lengths,
        item_feats,
        user_feats,
        vocab_from,
        exclusion,
        train_lengths=bounds[0],
        item_counts=item_counts,
    )
    assert sum(removed.values()) + manifest["interactions"] == n_input

    write_atomic(
        out,
        config.overwrite,
        lambda tmp: _write_files(
            tmp,
            manifest,
            seq_users,
            item_idx,
            ts,
            rating,
            lengths,
            user_ids,
            item_ids,
            user_counts,
            item_counts,
            item_feats,
            user_feats,
            config.row_group_size,
        ),
    )
    log.info(
        "prepared %s: %d users, %d items, %d interactions in %.1fs",
        out,
        n_users,
        n_items,
        manifest["interactions"],
        time.perf_counter() - started,
    )
    return manifest


# --- steps ---


def _sorted_codes(ids: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Dense codes whose order follows the sorted original ids, and the sorted distinct ids."""
    encoded = pc.dictionary_encode(ids).combine_chunks()
    dictionary = encoded.dictionary
    perm = pc.sort_indices(dictionary).to_numpy()
    rank = np.empty_like(perm)
    rank[perm] = np.arange(len(perm))
    codes = rank[encoded.indices.to_numpy(zero_copy_only=False)].astype(np.int64)
    return codes, dictionary.take(pa.array(perm))


def _time_order(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Stable order by (user, timestamp): ties keep input order."""
    span = int(ts.max()) - int(ts.min()) + 1 if len(ts) else 1
    n_users = int(user.max()) + 1 if len(user) else 1
    if span * n_users < 2**62:
        # One int64 key sorts several times faster than a two-key lexsort.
        key = user * span + (ts - ts.min())
        return np.argsort(key, kind="stable")
    return np.lexsort((ts, user))


def _count_out_of_order(user_sorted: np.ndarray, order: np.ndarray) -> int:
    """Rows that came in the input before an earlier-timestamped row of the same user."""
    n = len(order)
    if n < 2:
        return 0
    # Users are increasing in time order, so user * n + input position keeps users apart and a
    # running maximum never crosses from one user to the next.
    key = user_sorted * n + order
    running = np.maximum.accumulate(key)
    return int((key[1:] < running[:-1]).sum())


def _exact_duplicates(
    user: np.ndarray, item: np.ndarray, ts: np.ndarray, rating: np.ndarray | None
) -> np.ndarray:
    """Mask of rows that repeat an earlier row exactly. Rows are in (user, time, input) order."""
    dup = np.zeros(len(user), dtype=bool)
    if len(user) < 2:
        return dup
    same = (user[1:] == user[:-1]) & (ts[1:] == ts[:-1])
    if not same.any():
        return dup
    # Only rows sharing (user, timestamp) with another row can be duplicates: sort those few by
    # item and rating too (stable, so the first in input order stays).
    cand = np.flatnonzero(np.concatenate([same, [False]]) | np.concatenate([[False], same]))
    keys = [item[cand], ts[cand], user[cand]]
    if rating is not None:
        keys.insert(0, rating[cand])
    sub = cand[np.lexsort(keys)]
    eq = (
        (user[sub][1:] == user[sub][:-1])
        & (ts[sub][1:] == ts[sub][:-1])
        & (item[sub][1:] == item[sub][:-1])
    )
    if rating is not None:
        eq &= rating[sub][1:] == rating[sub][:-1]
    dup[sub[1:][eq]] = True
    return dup


def empty_k_core_stats() -> dict[str, int]:
    """The k-core counts of the manifest, before any pass (both engines fill the same keys)."""
    return dict.fromkeys(
        (
            "rows_removed_min_user",
            "rows_removed_min_item",
            "iterations",
            "users_removed",
            "items_removed",
        ),
        0,
    )


def _k_core(
    user: np.ndarray, item: np.ndarray, keep: np.ndarray, min_user: int, min_item: int
) -> dict[str, int]:
    """Filter ``keep`` in place to the (min_user, min_item)-core."""
    stats = empty_k_core_stats()
    if min_user <= 1 and min_item <= 1:
        return stats
    users_before = len(np.unique(user[keep]))
    items_before = len(np.unique(item[keep]))
    n_u, n_i = int(user.max()) + 1, int(item.max()) + 1
    while True:
        stats["iterations"] += 1
        changed = False
        if min_user > 1:
            counts = np.bincount(user[keep], minlength=n_u)
            drop = keep & (counts[user] < min_user)
            if drop.any():
                stats["rows_removed_min_user"] += int(drop.sum())
                keep &= ~drop
                changed = True
        if min_item > 1:
            counts = np.bincount(item[keep], minlength=n_i)
            drop = keep & (counts[item] < min_item)
            if drop.any():
                stats["rows_removed_min_item"] += int(drop.sum())
                keep &= ~drop
                changed = True
        if not changed or not keep.any():
            break
    stats["users_removed"] = users_before - len(np.unique(user[keep]))
    stats["items_removed"] = items_before - len(np.unique(item[keep]))
    return stats


def _compact(codes: np.ndarray, dictionary: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Renumber the codes that are left to 1..N (order kept); returns idx per row and the ids."""
    present = np.zeros(len(dictionary), dtype=bool)
    present[codes] = True
    new = np.cumsum(present).astype(np.int64)  # 1-based for present codes
    return new[codes].astype(np.int32), dictionary.filter(pa.array(present))


def _split(
    config: PrepareConfig, lengths: np.ndarray, ts: np.ndarray
) -> tuple[dict, dict, tuple[np.ndarray, np.ndarray]]:
    if config.split == "leave-one-out":
        split: dict[str, Any] = {"type": "leave-one-out"}
        train_end, val_end = layout.split_bounds(split, lengths)
    else:
        split = time_split(config, lambda q: int(np.quantile(ts, q, method="higher")))
        train_end, val_end = layout.split_bounds(split, lengths, ts)
    return split, split_counts(lengths, train_end, val_end), (train_end, val_end)


def features(config: PrepareConfig, kind: str, vocab_ids: pa.Array) -> EncodedFeatures | None:
    path = getattr(config, f"{kind}_features")
    if path is None and config.format == "recbole" and not config.no_features:
        inter = next((Path(p) for p in config.input if Path(p).suffix == ".inter"), None)
        if inter is None:
            inter = next(
                (
                    f
                    for p in config.input
                    if Path(p).is_dir()
                    for f in sorted(Path(p).glob("*.inter"))
                ),
                None,
            )
        sibling = inter.with_suffix(f".{kind}") if inter is not None else None
        if sibling is not None and sibling.is_file():
            path = str(sibling)
    if path is None:
        return None
    id_column = config.columns.user if kind == "user" else config.columns.item
    table, info = read_feature_table(path, id_column)
    encoded = encode_features(
        table,
        path,
        id_column,
        vocab_ids,
        getattr(config, f"{kind}_feature_columns"),
        config.list_columns,
        config.categorical_columns,
    )
    encoded.report = {**info, **encoded.report}
    return encoded


# --- writing ---


def _write_files(
    tmp: Path,
    manifest: dict,
    seq_users: np.ndarray,
    item_idx: np.ndarray,
    ts: np.ndarray,
    rating: np.ndarray | None,
    lengths: np.ndarray,
    user_ids: pa.Array,
    item_ids: pa.Array,
    user_counts: np.ndarray,
    item_counts: np.ndarray,
    item_feats: EncodedFeatures | None,
    user_feats: EncodedFeatures | None,
    row_group_size: int,
) -> None:
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    seq_cols = {
        "user_idx": pa.array(seq_users.astype(np.int32)),
        "length": pa.array(lengths.astype(np.int32)),
        "item_idx": pa.ListArray.from_arrays(offsets, pa.array(item_idx.astype(np.int32))),
        "timestamp": pa.ListArray.from_arrays(offsets, pa.array(ts.astype(np.int64))),
    }
    if rating is not None:
        seq_cols["rating"] = pa.ListArray.from_arrays(offsets, pa.array(rating.astype(np.float32)))
    pq.write_table(pa.table(seq_cols), tmp / layout.SEQUENCES, row_group_size=row_group_size)
    write_tables_and_manifest(
        tmp, manifest, user_ids, item_ids, user_counts, item_counts, item_feats, user_feats
    )
