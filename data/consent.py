"""Consent at ingest: the users and rows `recforge data prepare` must leave out
(docs/architecture.md §3, "Personal data").

Three sources, applied before any other step so that nothing downstream (duplicates, k-core,
vocabularies, counts) ever sees the excluded rows:

- ``--opt-out FILE``: user ids one per line, or a Parquet file with a user id column; every row
  of those users is dropped (``rows_removed["opt_out"]``);
- the erasure ledger (:mod:`recforge.data.erasure`): users erased from an earlier dataset of the
  same input are dropped again (``rows_removed["erased"]``), so a re-prepare cannot bring back
  a forgotten user;
- ``--consent-col COL``: rows whose consent is false/0 are dropped (``rows_removed["no_consent"]``).

A row is counted once, under the first rule in that order that drops it. The manifest's
``consent`` entry counts rows and users per rule and records the opt-out list's sha256
fingerprint (over its sorted, canonical ids), never the ids.

Ids are compared in one canonical text form (``recforge.artifact.canonical_user_id``, shared
with serving's hashed user stores): what the readers turn into
an integer (``"007"`` -> 7) compares as that integer, anything else as its trimmed text. Both
engines decide on the distinct user ids only (one Python pass per distinct user), then drop rows
by membership, vectorised.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recforge.artifact import canonical_user_id as canonical_id
from recforge.data.errors import DataError

if TYPE_CHECKING:
    from recforge.data.prepare import PrepareConfig

_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


@dataclass
class OptOut:
    path: str
    ids: frozenset[str]
    """Canonical ids (:func:`canonical_id`)."""

    @property
    def fingerprint(self) -> str:
        """sha256 of the sorted canonical ids, one per line: the same list gives the same
        fingerprint whatever its file format or order. It identifies the list; it does not hide
        a list of one guessable id from someone who tries ids one by one."""
        return hashlib.sha256("\n".join(sorted(self.ids)).encode()).hexdigest()


def read_user_list(path: str, user_col: str = "user_id") -> OptOut:
    """User ids from ``path``: a Parquet file (column ``user_col``, else ``user_id``, else its
    only column) or text with one id per line (blank lines and ``#`` comments skipped)."""
    from recforge.data import storage

    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise DataError("no such user list file", path=path) from None
    except OSError as exc:
        raise DataError(f"cannot read the user list ({exc})", path=path) from None
    if data[:4] == b"PAR1":
        import io

        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"cannot read Parquet user list ({exc})", path=path) from None
        names = table.column_names
        column = next((c for c in (user_col, "user_id") if c in names), None)
        if column is None and len(names) == 1:
            column = names[0]
        if column is None:
            raise DataError(
                f"no user id column {user_col!r} (the file has {', '.join(map(repr, names))}; "
                "set it with --user-col)",
                path=path,
                column=user_col,
            )
        col = table[column]
        if col.null_count:
            row = int(np.argmax(pc.is_null(col).to_numpy(zero_copy_only=False))) + 1
            raise DataError("null user id", path=path, column=column, row=row)
        values = col.to_pylist()
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(
                "not UTF-8 text with one user id per line, nor a Parquet file", path=path
            ) from None
        values = [
            line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
        ]
    ids = frozenset(canonical_id(v) for v in values)
    if "" in ids:
        raise DataError("empty user id", path=path)
    return OptOut(path=path, ids=ids)


def consent_values(col: pa.ChunkedArray, path: str, name: str) -> pa.ChunkedArray:
    """The consent column as booleans: booleans, the integers 0/1, or the text
    true/false/1/0/yes/no (any case). Anything else, nulls included, is a DataError: a row of
    unknown consent must not be trained on, nor silently dropped."""

    def bad(mask: Any, what: str) -> DataError:
        row = int(np.argmax(np.asarray(mask.to_numpy(zero_copy_only=False)))) + 1
        value = col[row - 1].as_py()
        return DataError(
            f"consent value {value!r} is {what}; expected true/false or 1/0",
            path=path,
            column=name,
            row=row,
        )

    if col.null_count:
        raise bad(pc.is_null(col), "missing")
    t = col.type
    if pa.types.is_boolean(t):
        return col
    if pa.types.is_integer(t):
        outside = pc.invert(pc.is_in(col, value_set=pa.array([0, 1], t)))
        if pc.any(outside).as_py():
            raise bad(outside, "not boolean")
        return pc.not_equal(col, pa.scalar(0, t))
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        lower = pc.utf8_lower(pc.utf8_trim_whitespace(col))
        truthy = pc.is_in(lower, value_set=pa.array(sorted(_TRUE)))
        falsy = pc.is_in(lower, value_set=pa.array(sorted(_FALSE)))
        neither = pc.invert(pc.or_(truthy, falsy))
        if pc.any(neither).as_py():
            raise bad(neither, "not boolean")
        return truthy
    raise DataError(f"has type {t}; expected a boolean consent column", path=path, column=name)


def check_options(fmt: str, consent_col: str | None) -> None:
    """MovieLens and SASRec text files have fixed columns: none of them is a consent flag."""
    if consent_col and fmt in ("movielens", "sasrec-txt"):
        raise DataError(
            f"--consent-col {consent_col!r}: {fmt} files have fixed columns and no consent "
            "column; convert to Parquet or CSV with the column, or use --opt-out"
        )


def excluded_users(distinct: pa.Array, opt_out: OptOut | None, erased: Any) -> dict[str, pa.Array]:
    """Of the distinct user ids of the input (the readers' type), those to drop whole:
    ``opt_out`` (listed) and ``erased`` (matched by the ledger, not already opted out).
    ``erased`` is a :class:`recforge.data.erasure.Ledger` or None."""
    canonical = [canonical_id(v) for v in distinct.to_pylist()]
    listed = np.array([c in opt_out.ids for c in canonical], bool) if opt_out else None
    out: dict[str, pa.Array] = {}
    if opt_out is not None:
        out["opt_out"] = distinct.filter(pa.array(listed))
    if erased is not None:
        hit = erased.matches(canonical)
        if listed is not None:
            hit &= ~listed
        out["erased"] = distinct.filter(pa.array(hit))
    return out


def manifest_entry(
    opt_out: OptOut | None,
    consent_col: str | None,
    counts: dict[str, dict[str, int]],
) -> dict[str, Any]:
    """The manifest's ``consent`` entry: per rule, rows and users excluded; no id."""
    entry: dict[str, Any] = {}
    if opt_out is not None:
        entry["opt_out"] = {
            "fingerprint": opt_out.fingerprint,
            "ids_listed": len(opt_out.ids),
            **counts["opt_out"],
        }
    if consent_col is not None:
        entry["consent_column"] = {"column": consent_col, **counts["no_consent"]}
    return entry


def filter_table(
    table: pa.Table, opt_out: OptOut | None, consent_col: str | None, ledger: Any
) -> tuple[pa.Table, dict[str, int], dict[str, dict[str, int]]]:
    """The memory engine's exclusion: ``table`` (the readers' columns, plus ``consent`` when a
    consent column was read) without the excluded rows and the consent column; the rows removed
    per rule and the counts of :func:`manifest_entry`."""
    removed: dict[str, int] = {}
    counts: dict[str, dict[str, int]] = {}
    users = table["user_id"]
    keep = np.ones(table.num_rows, bool)
    if opt_out is not None or ledger is not None:
        groups = excluded_users(pc.unique(users), opt_out, ledger)
        for rule, ids in groups.items():
            hit = pc.is_in(users, value_set=ids).to_numpy(zero_copy_only=False) & keep
            removed[rule] = int(hit.sum())
            counts[rule] = {"rows_excluded": int(hit.sum()), "users_excluded": len(ids)}
            keep &= ~hit
    if consent_col is not None:
        refused = ~table["consent"].to_numpy(zero_copy_only=False) & keep
        before = pc.unique(users.filter(pa.array(keep)))
        after = pc.unique(users.filter(pa.array(keep & ~refused)))
        touched = pc.unique(users.filter(pa.array(refused)))
        removed["no_consent"] = int(refused.sum())
        counts["no_consent"] = {
            "rows_excluded": int(refused.sum()),
            "users_excluded": len(before) - len(after),
            "users_with_rows_excluded": len(touched),
        }
        keep &= ~refused
        table = table.drop_columns(["consent"])
    if not keep.all():
        table = table.filter(pa.array(keep))
    return table, removed, counts


def opt_out_path_exists(path: str | None) -> None:
    """Refuse a missing local opt-out file before any input is read."""
    if path is not None and "://" not in path and not Path(path).is_file():
        raise DataError("no such opt-out file", path=path)


@dataclass
class Exclusion:
    """What consent at ingest leaves out (:mod:`recforge.data.consent`), read before the input
    so that a bad opt-out list or ledger is named before any work."""

    opt_out: Any
    ledger: Any
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, config: PrepareConfig) -> Exclusion:
        from recforge.data import erasure  # erasure reads user lists through this module

        opt_out = read_user_list(config.opt_out, config.columns.user) if config.opt_out else None
        ledger = erasure.read_ledger(config.erasure_ledger) if config.erasure_ledger else None
        return cls(opt_out, ledger if ledger is not None and ledger.entries else None)

    def manifest_entries(self, config: PrepareConfig) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.opt_out is not None or config.columns.consent is not None:
            out["consent"] = manifest_entry(self.opt_out, config.columns.consent, self.counts)
        if config.erasure_ledger is not None:
            out["erasure_ledger"] = {
                "path": config.erasure_ledger,
                "applied": self.ledger.ids if self.ledger is not None else [],
                **self.counts.get("erased", {}),
            }
        return out


def exclude_in_duckdb(con: Any, config: PrepareConfig, exclusion: Exclusion) -> dict[str, int]:
    """Consent at ingest in the DuckDB engine's ``raw`` table, as :func:`filter_table` does it:
    whole users (opt-out, then the ledger's) decided on the distinct ids in Python, their rows
    deleted in SQL; then rows without consent. Returns the rows removed per rule and fills
    ``exclusion.counts``."""
    removed: dict[str, int] = {}
    if exclusion.opt_out is not None or exclusion.ledger is not None:
        distinct = con.sql("SELECT DISTINCT user_id FROM raw").to_arrow_table()["user_id"]
        distinct = distinct.combine_chunks()
        distinct = distinct.cast(pa.int64() if pa.types.is_integer(distinct.type) else pa.string())
        groups = excluded_users(distinct, exclusion.opt_out, exclusion.ledger)
        for rule, ids in groups.items():
            con.register("excluded_ids", pa.table({"user_id": ids}))
            try:
                rows = _count(
                    con, "DELETE FROM raw WHERE user_id IN (SELECT user_id FROM excluded_ids)"
                )
            finally:
                con.unregister("excluded_ids")
            removed[rule] = rows
            exclusion.counts[rule] = {"rows_excluded": rows, "users_excluded": len(ids)}
    if config.columns.consent is not None:
        before = _count(con, "SELECT count(DISTINCT user_id) FROM raw")
        touched = _count(con, "SELECT count(DISTINCT user_id) FROM raw WHERE NOT consent")
        rows = _count(con, "DELETE FROM raw WHERE NOT consent")
        after = _count(con, "SELECT count(DISTINCT user_id) FROM raw")
        removed["no_consent"] = rows
        exclusion.counts["no_consent"] = {
            "rows_excluded": rows,
            "users_excluded": before - after,
            "users_with_rows_excluded": touched,
        }
        con.execute("ALTER TABLE raw DROP COLUMN consent")
    if removed and _count(con, "SELECT count(*) FROM raw") == 0:
        raise DataError(
            f"no interactions left after consent and opt-out ({removed})",
            path=", ".join(config.input),
        )
    return removed


def _count(con: Any, sql: str) -> int:
    rows = con.execute(sql).fetchall()
    return int(rows[0][0]) if rows and rows[0][0] is not None else 0
