"""The per-file checks of `recforge data validate` (:mod:`recforge.data.validate`): schema
expectations, and streaming readers of the vocabulary files and ``sequences.parquet`` that
report through the validator's ``add``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recforge.data import layout

BATCH_ROWS = 65536  # rows per batch where a file is not read by row group
SPLIT_COUNTS = (
    "train_interactions",
    "val_interactions",
    "test_interactions",
    "users_with_val",
    "users_with_test",
    "users_without_eval",
)
Specs = dict[str, dict[str, Any]]


class Recorder(Protocol):
    """What the checks need of the validator: where to report, and what earlier files said."""

    counts: dict[str, int | None]
    split: dict[str, Any] | None
    carried: dict[str, int] | None
    """Per side, the ids a ``--vocab-from`` prepare carried over (idx 1..known); None if none."""

    def add(
        self, file: str, where: str | None, msg: str, row: int = 0, n: int = 1, key: str = ""
    ) -> None: ...


def col(name: str) -> str:
    return f"column '{name}'"


def fld(name: str) -> str:
    return f"field '{name}'"


# (description, predicate) per expected Arrow type. Lists match on the value type only: Spark
# names the list field "element" where pyarrow says "item".
Expect = tuple[str, Callable[[pa.DataType], bool]]
INT32: Expect = ("int32", lambda t: t == pa.int32())
INT64: Expect = ("int64", lambda t: t == pa.int64())
ID: Expect = (
    "integer or string (the original ids)",
    lambda t: pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t),
)


def list_of(value: pa.DataType) -> Expect:
    return (f"list<{value}>", lambda t: pa.types.is_list(t) and t.value_type == value)


FEATURE_TYPES: dict[str, Expect] = {
    # layout.py says int32, but features.py's `code + 1` widens to int64 and the loader reads
    # either; both pass until the two agree.
    "categorical": ("int32", lambda t: t in (pa.int32(), pa.int64())),
    "list": list_of(pa.int32()),
    "numeric": ("float32", lambda t: t == pa.float32()),
}


def _first(mask: np.ndarray) -> tuple[int, int]:
    """Index of the first True and how many there are (the mask has at least one)."""
    hits = np.flatnonzero(mask)
    return int(hits[0]), len(hits)


def _filled(arr: pa.Array | pa.ChunkedArray, value: Any) -> pa.Array:
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    # Only when needed: the fill value's pa.scalar imports pandas, 0.4 s per process.
    return pc.fill_null(arr, value) if arr.null_count else arr


def _ints(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return _filled(arr, 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _list_parts(arr: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """``(flat values, per-row lengths, row offsets)`` of a list column (a null list counts 0)."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    lens = _ints(pc.list_value_length(arr))
    return arr.flatten(), lens, np.concatenate([[0], np.cumsum(lens)])


def _row_of(offsets: np.ndarray, positions: np.ndarray | int) -> np.ndarray:
    return np.searchsorted(offsets, positions, side="right") - 1


class RowBatches:
    """A Parquet file's rows in order, handed out in runs of any length (one batch held)."""

    def __init__(self, v: Recorder, name: str, pf: pq.ParquetFile, columns: list[str]) -> None:
        self._batches = pf.iter_batches(BATCH_ROWS, columns=columns)
        self._pending = pa.table({})
        self.v, self.name = v, name

    def _next(self) -> pa.RecordBatch | None:
        try:
            return next(self._batches, None)
        except (pa.ArrowException, OSError) as exc:
            self.v.add(self.name, None, f"cannot read ({str(exc).splitlines()[0][:200]})")
            self._batches = iter(())
            return None

    def take(self, n: int) -> pa.Table | None:
        parts: list[pa.Table] = []
        while n > 0:
            if self._pending.num_rows == 0:
                batch = self._next()
                if batch is None:
                    break
                self._pending = pa.Table.from_batches([batch])
            parts.append(self._pending.slice(0, n))
            self._pending = self._pending.slice(n)
            n -= parts[-1].num_rows
        return pa.concat_tables(parts) if parts else None


class VocabFile:
    """items.parquet or users.parquet: idx 1..n in row order, sorted unique ids, counts, codes."""

    def __init__(self, v: Recorder, side: str, good: set[str], specs: Specs) -> None:
        self.v, self.side, self.good = v, side, good
        self.n = v.counts[f"{side}s"]
        self.file = layout.ITEMS if side == "item" else layout.USERS
        self.idx, self.id = f"{side}_idx", f"{side}_id"
        self.specs = {k: s for k, s in specs.items() if k in good}
        self.missing = dict.fromkeys(self.specs, 0)
        self.rows = 0
        self.last_id: pa.Array | None = None
        # Carried-over ids keep PREV's order, and may have no interactions now.
        self.known = (v.carried or {}).get(side, 0)

    def columns(self) -> list[str]:
        return [c for c in (self.idx, self.id, "count", *self.specs) if c in self.good]

    def add(self, column: str, msg: str, row: int, n: int, key: str) -> None:
        self.v.add(self.file, col(column), msg, row, n, key)

    def check(self, chunk: pa.Table, counts: np.ndarray | None) -> None:
        """``counts``: per row, the interactions sequences.parquet holds for that idx."""
        row0, k = self.rows, chunk.num_rows
        self.rows += k
        for name in chunk.column_names:
            nulls = chunk[name].null_count
            if nulls and self.specs.get(name, {}).get("kind") != "numeric":
                i, _ = _first(np.asarray(pc.is_null(chunk[name])))
                what = "code 0 or [] for missing" if name in self.specs else "a value in every row"
                self.add(name, f"null; expected {what}", row0 + i + 1, nulls, "null")
        if self.idx in chunk.column_names:
            got, want = _ints(chunk[self.idx]), np.arange(row0 + 1, row0 + k + 1)
            if (got != want).any():
                i, bad = _first(got != want)
                msg = (
                    f"{self.idx} {got[i]}, expected {want[i]}: rows hold {self.idx} "
                    f"1..{self.n or 'N'} in order (no gaps, no repeats; 0 is padding)"
                )
                self.add(self.idx, msg, row0 + i + 1, bad, "order")
        if self.id in chunk.column_names:
            self._check_ids(chunk[self.id].combine_chunks(), row0)
        if "count" in chunk.column_names and counts is not None:
            got = _ints(chunk["count"])
            if (got != counts).any():
                i, bad = _first(got != counts)
                msg = f"{got[i]}, but sequences.parquet holds {counts[i]} interactions for it"
                self.add("count", msg, row0 + i + 1, bad, "count")
        # Users with no interactions cannot arise but through vocab_from (length >= 1).
        checks_unused = self.side == "item" or self.v.carried is not None
        if counts is not None and checks_unused:
            unused = (counts == 0) & (np.arange(row0 + 1, row0 + k + 1) > self.known)
        if counts is not None and checks_unused and unused.any():
            i, bad = _first(unused)
            msg = (
                f"{self.side} never occurs in sequences.parquet; a vocabulary holds only used "
                "ids (and, under manifest 'vocab_from', those carried over)"
            )
            self.add(self.idx, msg, row0 + i + 1, bad, "unused")
        for name, spec in self.specs.items():
            self._check_codes(name, spec, chunk[name].combine_chunks(), row0)

    def _check_ids(self, ids: pa.Array, row0: int) -> None:
        # The previous chunk's last id goes first, so order is checked across chunks too.
        shift = 0 if self.last_id is None else 1
        both = ids if self.last_id is None else pa.concat_arrays([self.last_id, ids])
        self.last_id = ids[-1:] if len(ids) else self.last_id
        prev, cur = both[:-1], both[1:]
        # The row of cur[i] is row0 + i + 2 - shift; order holds only among appended ids.
        ordered = np.arange(row0 + 2 - shift, row0 + 2 - shift + len(cur)) > self.known + 1
        for key, op, why in (
            ("repeat", pc.equal, "equals the previous row's; original ids are unique"),
            ("sort", pc.less, "sorts before the previous row's {}; idx follows sorted id order"),
        ):
            mask = _filled(op(cur, prev), False).to_numpy(zero_copy_only=False) if len(cur) else []
            if key == "sort" and len(cur):
                mask = mask & ordered
            if np.any(mask):
                i, bad = _first(mask)
                msg = f"{cur[i].as_py()!r} {why.format(repr(prev[i].as_py()))}"
                self.add(self.id, msg, row0 + i + 2 - shift, bad, key)

    def _check_codes(self, name: str, spec: dict[str, Any], values: pa.Array, row0: int) -> None:
        if spec["kind"] == "numeric":
            self.missing[name] += int(np.isnan(values.to_numpy(zero_copy_only=False)).sum())
            return
        if spec["kind"] == "list":
            flat, lens, _ = _list_parts(values)
            codes, row_of = _ints(flat), np.repeat(np.arange(len(lens)), lens)
            self.missing[name] += int((lens == 0).sum())
        else:
            codes, row_of = _ints(values), np.arange(len(values))
            self.missing[name] += int((codes == 0).sum())
        card = spec["cardinality"]
        out = (codes < 0) | (codes >= card)
        if out.any():
            i, _ = _first(out)
            msg = f"code {codes[i]}; expected 0..{card - 1} (manifest cardinality {card})"
            self.add(name, msg, row0 + int(row_of[i]) + 1, len(np.unique(row_of[out])), "code")

    def finish(self) -> None:
        if self.n is not None and self.rows != self.n:
            msg = f"{self.n}, but {self.file} holds {self.rows} rows"
            self.v.add(layout.MANIFEST, fld(f"{self.side}s"), msg)
        for name, spec in self.specs.items():
            if "missing" in spec and spec["missing"] != self.missing[name]:
                msg = f"{spec['missing']}, but {self.file} has {self.missing[name]} missing values"
                self.v.add(layout.MANIFEST, fld(f"features.{self.side}.{name}.missing"), msg)


class SequencesCheck:
    """sequences.parquet, one row group at a time; keeps running totals and item counts."""

    def __init__(self, v: Recorder, good: set[str]) -> None:
        self.v, self.n_items, self.split = v, v.counts["items"], v.split
        # Under vocab_from, carried-over users without interactions have no row: gaps allowed.
        self.sparse = v.carried is not None
        self.group_users = np.zeros(0, np.int64)  # user_idx of the last row group checked
        self.rows = self.interactions = self.last_user = 0
        self.item_counts = np.zeros((self.n_items or 0) + 1, np.int64)
        self.lengths_ok = "length" in good or "item_idx" in good
        timed = self.split is not None and self.split["type"] == "time"
        self.split_ok = bool(self.split) and self.lengths_ok and ("timestamp" in good or not timed)
        self.split_counts = dict.fromkeys(SPLIT_COUNTS, 0)

    def add(self, where: str | None, msg: str, row: int, n: int = 1, key: str = "") -> None:
        self.v.add(layout.SEQUENCES, where, msg, row, n, key)

    def check(self, t: pa.Table) -> np.ndarray | None:
        """Check one row group; returns its users' lengths (None if no column gives them)."""
        row0, k = self.rows, t.num_rows
        self.rows += k
        most = self.v.counts["sequences_row_group_size"]
        if most is not None and k > most:
            msg = f"a row group of {k} users; manifest sequences_row_group_size is the most"
            self.add(None, msg, row0 + 1, key="group")
        for name in t.column_names:
            if t[name].null_count:
                i, bad = _first(np.asarray(pc.is_null(t[name])))
                self.add(col(name), "null; expected a value in every row", row0 + i + 1, bad)
        want = np.arange(row0 + 1, row0 + k + 1)
        user = _ints(t["user_idx"]) if "user_idx" in t.column_names else want
        self.group_users = user
        if self.sparse and "user_idx" in t.column_names:
            self._sparse_order(user, row0)
        elif (user != want).any():
            i, bad = _first(user != want)
            msg = (
                f"user_idx {user[i]} appears again; each user has one row"
                if user[i] == (user[i - 1] if i else self.last_user)
                else f"user_idx {user[i]}, expected {want[i]}: one row per user, sorted by "
                "user_idx, 1..U without gaps"
            )
            self.add(col("user_idx"), msg, row0 + i + 1, bad, "user order")
        self.last_user = int(user[-1]) if k else self.last_user
        names = [n for n in ("item_idx", "timestamp", "rating") if n in t.column_names]
        lists = {n: _list_parts(t[n]) for n in names}
        lengths = _ints(t["length"]) if "length" in t.column_names else None
        if lengths is None and "item_idx" in lists:
            lengths = lists["item_idx"][1]
        if lengths is not None and (lengths < 1).any():
            i, bad = _first(lengths < 1)
            msg = f"user_idx {user[i]} has length {lengths[i]}; every user has >= 1 interaction"
            self.add(col("length"), msg, row0 + i + 1, bad, "empty")
            self.split_ok = False
        aligned = {}
        for name, (flat, lens, offsets) in lists.items():
            if flat.null_count:
                i = int(_row_of(offsets, _first(np.asarray(pc.is_null(flat)))[0]))
                self.add(col(name), f"user_idx {user[i]}: null inside the list", row0 + i + 1)
            aligned[name] = lengths is None or np.array_equal(lens, lengths)
            if not aligned[name]:
                i, bad = _first(lens != lengths)
                msg = f"user_idx {user[i]}: {lens[i]} values, but 'length' is {lengths[i]}"
                self.add(col(name), msg, row0 + i + 1, bad, "list length")
        if "item_idx" in lists and self.n_items is not None:
            self._items(_ints(lists["item_idx"][0]), lists["item_idx"][2], user, row0)
        ts = None
        if "timestamp" in lists and aligned["timestamp"]:
            ts = _ints(lists["timestamp"][0])
            self._time_order(ts, lists["timestamp"][2], user, row0)
        elif "timestamp" in lists:
            self.split_ok = False
        if lengths is not None:
            self._totals(lengths, ts)
        return lengths

    def _sparse_order(self, user: np.ndarray, row0: int) -> None:
        before = np.concatenate([[self.last_user], user[:-1]])
        top = self.v.counts["users"]
        bad = (user <= before) | (user < 1) | (top is not None and user > top)
        if bad.any():
            i, n = _first(bad)
            msg = (
                f"user_idx {user[i]} after {before[i]}: one row per user, sorted by user_idx, "
                f"in 1..{top or 'U'} (gaps only for users carried over by manifest 'vocab_from')"
            )
            self.add(col("user_idx"), msg, row0 + i + 1, n, "user order")

    def _items(self, items: np.ndarray, offsets: np.ndarray, user: np.ndarray, row0: int) -> None:
        out = (items < 1) | (items > self.n_items)
        if out.any():
            pos, _ = _first(out)
            rows_of = _row_of(offsets, np.flatnonzero(out))
            i = int(rows_of[0])
            msg = (
                f"user_idx {user[i]}: item index {items[pos]} at position {pos - offsets[i] + 1}; "
                f"expected 1..{self.n_items} (manifest 'items'; 0 is padding)"
            )
            self.add(col("item_idx"), msg, row0 + i + 1, len(np.unique(rows_of)), "item range")
        values, counts = np.unique(items[~out], return_counts=True)
        self.item_counts[values] += counts

    def _time_order(self, ts: np.ndarray, offsets: np.ndarray, user: np.ndarray, row0: int) -> None:
        later = np.flatnonzero(ts[1:] < ts[:-1]) + 1
        later = later[~np.isin(later, offsets)]  # a drop at a row start is the next user's
        if len(later):
            rows_of = _row_of(offsets, later)
            i, pos = int(rows_of[0]), int(later[0])
            msg = (
                f"user_idx {user[i]}: timestamp {ts[pos]} at position {pos - offsets[i] + 1} is "
                f"earlier than {ts[pos - 1]} before it; expected time order (non-decreasing)"
            )
            self.add(col("timestamp"), msg, row0 + i + 1, len(np.unique(rows_of)), "time order")

    def _totals(self, lengths: np.ndarray, ts: np.ndarray | None) -> None:
        self.interactions += int(lengths.sum())
        if not self.split_ok or not len(lengths):
            return
        train, val = layout.split_bounds(self.split, lengths, ts)
        has_val, has_test = val > train, lengths > val
        values = (train, val - train, lengths - val, has_val, has_test, ~has_val & ~has_test)
        for name, value in zip(SPLIT_COUNTS, values):
            self.split_counts[name] += int(value.sum())
