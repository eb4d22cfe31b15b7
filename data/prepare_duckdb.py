"""The out-of-core engine of `recforge data prepare` (``--engine duckdb``, the default).

Same steps, counts and output as the in-memory engine in :mod:`recforge.data.prepare` (the
reference; tests/unit/test_prepare_engines.py holds them equal), but the rows never have to fit
in RAM at once: each input file goes through the existing readers (their validation and error
messages), is appended with its input row numbers to a table of a DuckDB database file in the
spill folder, and DuckDB does the rest under ``memory_limit``, spilling beside it:

- exact duplicates: one row per (user, item, timestamp[, rating]), the lowest row number stays;
- time order: ``ORDER BY timestamp, row number`` within a user, so ties keep input order;
- k-core: ``DELETE`` users/items under the minimum, user pass then item pass, until a round
  deletes nothing (the memory engine's rounds, so ``k_core_iterations`` agrees);
- vocabularies: ``ROW_NUMBER()`` over the sorted original ids, 0 stays padding;
- sequences: per-user lists ordered by (timestamp, row number), streamed out as Arrow batches
  into ``sequences.parquet`` in row groups of ``row_group_size`` users.

Only per-user and per-item arrays (lengths, counts, ids, features) are held in Python. Parquet
files with integer ids are read in batches; any other file is read whole by its reader (string
ids become integers only if the whole file's are), so the largest such file bounds the memory.

Memory: ``--memory-limit`` bounds the whole process, of which DuckDB's buffer manager gets a
share (:mod:`recforge.data.duckdb_memory`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recforge.artifact import file_sha256
from recforge.data import consent, layout, vocab
from recforge.data.duckdb_memory import apply_memory_limit, shrink_share_for_python
from recforge.data.errors import DataError
from recforge.data.prepare import PrepareConfig, empty_k_core_stats, features
from recforge.data.prepared_output import build_manifest, write_atomic, write_tables_and_manifest
from recforge.data.readers import (
    READERS,
    Columns,
    SourceFile,
    normalise,
    resolve_inputs,
    row_group_error,
)
from recforge.data.split_rules import require_eval_users, split_counts, time_split

log = logging.getLogger(__name__)

# Rows per Parquet batch read when a file can be streamed (see _stream_parquet), and per Arrow
# batch of flat rows fetched back by _write_sequences: small enough that these transient Arrow
# and numpy buffers (and what the allocators keep of them) stay well inside the reserve
# (duckdb_memory._RESERVE_MIN).
_BATCH_ROWS = 1 << 18


def prepare_duckdb(config: PrepareConfig) -> dict[str, Any]:
    import duckdb

    started = time.perf_counter()
    exclusion = consent.Exclusion.of(config)
    out = Path(config.out).absolute()
    if config.spill_dir:
        spill_parent = Path(config.spill_dir)
        spill_parent.mkdir(parents=True, exist_ok=True)
    else:
        # The nearest existing folder above out: creating out's parents is left to the final
        # rename, so a failed run leaves no empty folders either.
        spill_parent = next(p for p in out.parents if p.is_dir())
    # A fresh folder of our own, so removing it can never take a user's files with it.
    spill = Path(tempfile.mkdtemp(prefix=f".{out.name}.spill-", dir=spill_parent))
    con = None
    try:
        con = duckdb.connect(str(spill / "prepare.duckdb"))
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        apply_memory_limit(con, config.memory_limit)
        con.execute(f"SET threads = {threads or os.cpu_count() or 1}")
        con.execute(f"SET temp_directory = '{_sql_str(str(spill / 'tmp'))}'")
        # Every order that matters is spelled out with ORDER BY; this lets DuckDB stream.
        con.execute("SET preserve_insertion_order = false")
        sources, n_input, has_rating = _load_inputs(con, config)
        log.info("read %d interactions from %d file(s)", n_input, len(sources))
        excluded = consent.exclude_in_duckdb(con, config, exclusion)
        manifest_parts = _transform(con, config, has_rating)
        manifest_parts["excluded"], manifest_parts["exclusion"] = excluded, exclusion
        return _finish(con, config, out, sources, n_input, has_rating, started, manifest_parts)
    finally:
        if con is not None:
            con.close()
        shutil.rmtree(spill, ignore_errors=True)


# --- reading: the existing readers, one file at a time, into DuckDB with row numbers ---


def _load_inputs(con: Any, config: PrepareConfig) -> tuple[list[SourceFile], int, bool]:
    """Read each file with the readers and append it, with its input row numbers, to ``raw``.

    Only one file's Arrow table is held at a time; DuckDB keeps ``raw`` in its buffer pool and
    spills it under ``memory_limit``."""
    files = resolve_inputs(config.input, config.format)
    # MovieLens and SASRec text files have fixed columns; the others use the given names.
    names = {"movielens": Columns(rating="rating"), "sasrec-txt": Columns()}.get(
        config.format, config.columns
    )
    sources: list[SourceFile] = []
    raw_types: dict[str, str] = {}
    rating_kinds: set[bool] = set()
    row_offset = 0
    for path in files:
        source = SourceFile(str(path), config.format, os.path.getsize(path), file_sha256(path))
        if source.bytes == 0:
            raise DataError("file is empty", path=str(path))
        streamed = (
            _stream_parquet(con, path, config.columns, row_offset, raw_types)
            if config.format == "parquet"
            else None
        )
        if streamed is not None:
            source.rows, source.extra["timestamp_unit"] = streamed
            rating_kinds.add(config.columns.rating is not None)
            row_offset += source.rows
            sources.append(source)
            continue
        table = READERS[config.format](path, config.columns, row_offset)
        table, unit = normalise(table, str(path), names)
        source.rows = table.num_rows
        source.extra["timestamp_unit"] = unit
        if config.format == "sasrec-txt":
            source.extra["timestamp_unit"] = "line number (the file is in time order per user)"
        rating_kinds.add("rating" in table.column_names)
        if len(rating_kinds) == 1:  # a mismatch is reported once every file has been read
            rn = pa.array(np.arange(row_offset, row_offset + table.num_rows, dtype=np.int64))
            _append(con, table.append_column("rn", rn), raw_types)
        del table
        row_offset += source.rows
        sources.append(source)
    if row_offset == 0:
        raise DataError("no interactions in the input", path=", ".join(str(f) for f in files))
    if len(rating_kinds) > 1:
        raise DataError(
            "some input files have the rating column and others do not",
            path=", ".join(str(f) for f in files),
        )
    return sources, row_offset, rating_kinds == {True}


def _stream_parquet(
    con: Any, path: Path, columns: Columns, row_offset: int, raw_types: dict[str, str]
) -> tuple[int, str] | None:
    """Append a Parquet file batch by batch when the readers' normalisation of a batch is the
    same as of the whole file: integer ids (string ids turn into integers only when the whole
    file's do) and integer, timestamp or date times. Returns (rows, timestamp unit), or None
    for the whole-file path (which also gives a bad value its file-wide row number). A row
    group that cannot be read is a DataError naming it, as the whole-file path would give."""
    names = (columns.user, columns.item, columns.timestamp, columns.rating, columns.consent)
    wanted = [c for c in names if c]
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
    except (pa.ArrowException, OSError):
        return None
    if parquet.metadata.num_rows == 0 or any(c not in schema.names for c in wanted):
        return None
    ts = schema.field(columns.timestamp).type
    numeric = (pa.types.is_integer, pa.types.is_floating)
    if not (
        all(pa.types.is_integer(schema.field(c).type) for c in (columns.user, columns.item))
        and any(f(ts) for f in (pa.types.is_integer, pa.types.is_timestamp, pa.types.is_date))
        and (columns.rating is None or any(f(schema.field(columns.rating).type) for f in numeric))
    ):
        return None
    rows, unit = 0, "as given"
    for i in range(parquet.num_row_groups):
        # One row group at a time, so that a corrupt one is named as the readers name it.
        batches = parquet.iter_batches(batch_size=_BATCH_ROWS, row_groups=[i], columns=wanted)
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as exc:
                raise row_group_error(parquet, i, path, exc) from None
            if batch is None:
                break
            try:
                table, unit = normalise(pa.Table.from_batches([batch]), str(path), columns)
            except (DataError, pa.ArrowException):
                # Undo this file's batches; the whole-file path names the error's row in the
                # file, as the readers do.
                if raw_types:
                    con.execute(f"DELETE FROM raw WHERE rn >= {int(row_offset)}")
                return None
            start = row_offset + rows
            rn = pa.array(np.arange(start, start + table.num_rows, dtype=np.int64))
            _append(con, table.append_column("rn", rn), raw_types)
            rows += table.num_rows
    return rows, unit


def _append(con: Any, table: pa.Table, raw_types: dict[str, str]) -> None:
    kinds = {
        name: "VARCHAR" if pa.types.is_string(table.schema.field(name).type) else "BIGINT"
        for name in ("user_id", "item_id")
    }
    con.register("incoming", table)
    try:
        if not raw_types:
            con.execute("CREATE TABLE raw AS SELECT * FROM incoming")
            raw_types.update(kinds)
            return
        for name, kind in kinds.items():
            # As the memory engine: integer ids in one file and string ids in another compare
            # as strings.
            if kind == "VARCHAR" and raw_types[name] == "BIGINT":
                con.execute(f"ALTER TABLE raw ALTER {name} TYPE VARCHAR")
                raw_types[name] = "VARCHAR"
        columns = ", ".join(
            f"CAST({c} AS {raw_types[c]})" if c in raw_types else c for c in table.column_names
        )
        con.execute(f"INSERT INTO raw SELECT {columns} FROM incoming")
    finally:
        con.unregister("incoming")


# --- the heavy steps, in DuckDB ---


def _transform(con: Any, config: PrepareConfig, has_rating: bool) -> dict[str, Any]:
    # A row is out of time order when an earlier-timestamped row of its user came later in the
    # input: its row number is below the largest one before it in (timestamp, row number) order.
    out_of_order = _scalar(
        con,
        "SELECT count(*) FROM (SELECT rn, max(rn) OVER (PARTITION BY user_id "
        "ORDER BY timestamp, rn ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before "
        "FROM raw) WHERE rn < before",
    )
    if has_rating:
        # Ratings compare as numpy does: a NaN equals nothing (its rn keeps it apart) and 0.0
        # equals -0.0. The first row is fetched back whole, as aggregates drop the sign of -0.0.
        con.execute(
            "CREATE TABLE kept AS SELECT * FROM raw WHERE rn IN (SELECT min(rn) FROM raw "
            "GROUP BY user_id, item_id, timestamp, rating, CASE WHEN isnan(rating) THEN rn END)"
        )
    else:
        con.execute(
            "CREATE TABLE kept AS SELECT user_id, item_id, timestamp, min(rn) AS rn "
            "FROM raw GROUP BY user_id, item_id, timestamp"
        )
    con.execute("DROP TABLE raw")
    after_dedupe = _scalar(con, "SELECT count(*) FROM kept")
    kcore = _k_core(con, config.min_user, config.min_item)
    return {"out_of_order": out_of_order, "after_dedupe": after_dedupe, "kcore": kcore}


def _k_core(con: Any, min_user: int, min_item: int) -> dict[str, int]:
    stats = empty_k_core_stats()
    if min_user <= 1 and min_item <= 1:
        return stats
    users_before = _scalar(con, "SELECT count(DISTINCT user_id) FROM kept")
    items_before = _scalar(con, "SELECT count(DISTINCT item_id) FROM kept")
    passes = (("user_id", min_user, "user"), ("item_id", min_item, "item"))
    while True:
        stats["iterations"] += 1
        changed = False
        for column, minimum, kind in passes:
            if minimum <= 1:
                continue
            deleted = _scalar(
                con,
                f"DELETE FROM kept WHERE {column} IN (SELECT {column} FROM kept "
                f"GROUP BY {column} HAVING count(*) < {int(minimum)})",
            )
            if deleted:
                stats[f"rows_removed_min_{kind}"] += deleted
                changed = True
        if not changed or _scalar(con, "SELECT count(*) FROM kept") == 0:
            break
    stats["users_removed"] = users_before - _scalar(con, "SELECT count(DISTINCT user_id) FROM kept")
    stats["items_removed"] = items_before - _scalar(con, "SELECT count(DISTINCT item_id) FROM kept")
    return stats


def _finish(
    con: Any,
    config: PrepareConfig,
    out: Path,
    sources: list[SourceFile],
    n_input: int,
    has_rating: bool,
    started: float,
    parts: dict[str, Any],
) -> dict[str, Any]:
    kcore = parts["kcore"]
    excluded = parts["excluded"]
    removed = {
        **excluded,
        "exact_duplicates": n_input - sum(excluded.values()) - parts["after_dedupe"],
        "min_user": kcore["rows_removed_min_user"],
        "min_item": kcore["rows_removed_min_item"],
    }
    n_kept = _scalar(con, "SELECT count(*) FROM kept")
    if n_kept == 0:
        raise DataError(
            f"no interactions left after filtering ({removed}); lower --min-user/--min-item",
            path=", ".join(s.path for s in sources),
        )
    vocab_from = None
    if config.vocab_from is None:
        for kind in ("user", "item"):
            con.execute(
                f"CREATE TABLE {kind}_vocab AS SELECT {kind}_id, "
                f"CAST(row_number() OVER (ORDER BY {kind}_id) AS INTEGER) AS {kind}_idx, "
                f"count(*) AS n FROM kept GROUP BY {kind}_id"
            )
        user_ids, user_counts = _vocab(con, "user")
        item_ids, item_counts = _vocab(con, "item")
    else:
        (user_ids, user_counts, users), (item_ids, item_counts, items) = (
            _extended_vocab(con, kind, config.vocab_from) for kind in ("user", "item")
        )
        vocab_from = vocab.manifest_entry(config.vocab_from, users, items)
    # Users carried over by --vocab-from without interactions now have no sequence.
    lengths = user_counts[user_counts > 0]

    if config.split == "leave-one-out":
        split: dict[str, Any] = {"type": "leave-one-out"}
        train_end, val_end = layout.split_bounds(split, lengths)
    else:
        split = time_split(config, lambda q: _quantile_higher(con, n_kept, q))
        bounds = (
            con.sql(
                f"SELECT sum((k.timestamp < {split['val_start']})::BIGINT) AS train_end, "
                f"sum((k.timestamp < {split['test_start']})::BIGINT) AS val_end "
                "FROM kept k JOIN user_vocab u USING (user_id) "
                "GROUP BY u.user_idx ORDER BY u.user_idx"
            )
            .to_arrow_table()
            .combine_chunks()
        )
        train_end = bounds["train_end"].to_numpy().astype(np.int64)
        val_end = bounds["val_end"].to_numpy().astype(np.int64)
    counts = split_counts(lengths, train_end, val_end)

    item_feats = features(config, "item", item_ids)
    user_feats = features(config, "user", user_ids)
    require_eval_users(config, split, lengths, train_end, val_end)
    manifest = build_manifest(
        config,
        sources,
        n_input,
        removed,
        parts["out_of_order"],
        kcore,
        n_kept,
        len(user_ids),
        len(item_ids),
        has_rating,
        split,
        counts,
        lengths,
        item_feats,
        user_feats,
        vocab_from,
        parts["exclusion"],
        train_lengths=train_end,
        item_counts=item_counts,
    )
    assert sum(removed.values()) + manifest["interactions"] == n_input

    def write(tmp: Path) -> None:
        _write_sequences(con, tmp / layout.SEQUENCES, has_rating, config.row_group_size)
        write_tables_and_manifest(
            tmp, manifest, user_ids, item_ids, user_counts, item_counts, item_feats, user_feats
        )

    write_atomic(out, config.overwrite, write)
    log.info(
        "prepared %s (duckdb): %d users, %d items, %d interactions in %.1fs",
        out,
        len(user_ids),
        len(item_ids),
        n_kept,
        time.perf_counter() - started,
    )
    return manifest


def _extended_vocab(
    con: Any, kind: str, previous: str
) -> tuple[pa.Array, np.ndarray, vocab.Extended]:
    """``{kind}_vocab`` for the ids in ``kept``, numbered after ``previous``'s (numbered in
    Python by the function the memory engine uses); the whole vocabulary's ids and counts."""
    t = con.sql(f"SELECT {kind}_id, count(*) AS n FROM kept GROUP BY {kind}_id").to_arrow_table()
    present = t[f"{kind}_id"].combine_chunks()
    present = present.cast(pa.int64() if pa.types.is_integer(present.type) else pa.string())
    ext = vocab.extend(vocab.read_previous(previous, kind), present, previous, kind)
    n = t["n"].to_numpy().astype(np.int64)
    con.register(
        "incoming_vocab",
        pa.table({f"{kind}_id": present, f"{kind}_idx": ext.idx_of_present, "n": n}),
    )
    try:
        con.execute(f"CREATE TABLE {kind}_vocab AS SELECT * FROM incoming_vocab")
    finally:
        con.unregister("incoming_vocab")
    counts = np.zeros(len(ext.ids), np.int64)
    counts[ext.idx_of_present.astype(np.int64) - 1] = n
    return ext.ids, counts, ext


def _vocab(con: Any, kind: str) -> tuple[pa.Array, np.ndarray]:
    """Original ids in idx order and their interaction counts."""
    t = con.sql(f"SELECT {kind}_id, n FROM {kind}_vocab ORDER BY {kind}_idx").to_arrow_table()
    ids = t[f"{kind}_id"].combine_chunks()
    # The readers' types (string or int64), whatever Arrow flavour DuckDB hands back.
    ids = ids.cast(pa.int64() if pa.types.is_integer(ids.type) else pa.string())
    return ids, t["n"].to_numpy().astype(np.int64)


def _quantile_higher(con: Any, n: int, q: float) -> int:
    # numpy's method="higher": the value at index ceil((n - 1) * q) of the sorted timestamps.
    index = min(int(np.ceil((n - 1) * q)), n - 1)
    return _scalar(con, f"SELECT timestamp FROM kept ORDER BY timestamp LIMIT 1 OFFSET {index}")


def _write_sequences(con: Any, path: Path, has_rating: bool, row_group_size: int) -> None:
    fields = [
        pa.field("user_idx", pa.int32()),
        pa.field("length", pa.int32()),
        pa.field("item_idx", pa.list_(pa.int32())),
        pa.field("timestamp", pa.list_(pa.int64())),
    ]
    if has_rating:
        fields.append(pa.field("rating", pa.list_(pa.float32())))
    schema = pa.schema(fields)
    # Flat rows in (user, time, input row) order, cut into lists here: a sort spills to disk,
    # where DuckDB's ordered list() aggregate holds every group in memory (out of memory at
    # 100M rows under 4GB).
    rating = ", k.rating" if has_rating else ""
    shrink_share_for_python(con)
    reader = con.sql(
        f"SELECT u.user_idx, i.item_idx, k.timestamp{rating} "
        "FROM kept k JOIN user_vocab u USING (user_id) JOIN item_vocab i USING (item_id) "
        "ORDER BY u.user_idx, k.timestamp, k.rn"
    ).to_arrow_reader(_BATCH_ROWS)
    pending: list[pa.RecordBatch] = []
    held = 0
    with pq.ParquetWriter(path, schema) as writer:
        # Whole row groups of exactly row_group_size users, as pq.write_table would cut them.
        for batch in _user_lists(reader, schema):
            pending.append(batch)
            held += batch.num_rows
            if held >= row_group_size:
                table = pa.Table.from_batches(pending, schema)
                full = held - held % row_group_size
                writer.write_table(table.slice(0, full), row_group_size=row_group_size)
                rest = table.slice(full)
                pending, held = rest.to_batches(), rest.num_rows
        if held:
            writer.write_table(
                pa.Table.from_batches(pending, schema), row_group_size=row_group_size
            )


def _user_lists(reader: pa.RecordBatchReader, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """One row per user from flat rows sorted by user; a user cut by a batch boundary waits
    for the next batch."""
    carry: pa.Table | None = None
    for batch in reader:
        rows = pa.Table.from_batches([batch])
        if carry is not None:
            rows = pa.concat_tables([carry, rows])
        users = rows.column(0).to_numpy()
        last_start = int(np.flatnonzero(users != users[-1])[-1]) + 1 if users[0] != users[-1] else 0
        if last_start:
            yield _lists(rows.slice(0, last_start), schema)
        carry = rows.slice(last_start)
    if carry is not None and carry.num_rows:
        yield _lists(carry, schema)


def _lists(rows: pa.Table, schema: pa.Schema) -> pa.RecordBatch:
    rows = rows.combine_chunks()
    users = rows.column(0).to_numpy()
    starts = np.concatenate([[0], np.flatnonzero(users[1:] != users[:-1]) + 1])
    offsets = pa.array(np.append(starts, len(users)).astype(np.int32))
    columns = [
        pa.array(users[starts].astype(np.int32)),
        pa.array(np.diff(np.append(starts, len(users))).astype(np.int32)),
    ]
    for field, values in zip(list(schema)[2:], rows.columns[1:]):
        # Plain pa.list_ (child "item"), the layout's type.
        values = values.combine_chunks().cast(field.type.value_type)
        columns.append(pa.ListArray.from_arrays(offsets, values))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _scalar(con: Any, sql: str) -> int:
    # fetchall, not fetchone: DuckDB refuses new work while a result is left unfinished.
    rows = con.execute(sql).fetchall()
    return int(rows[0][0]) if rows and rows[0][0] is not None else 0


def _sql_str(value: str) -> str:
    return value.replace("'", "''")
