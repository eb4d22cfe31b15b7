"""`recforge data prepare --vocab-from PREV`: id vocabularies that extend a previous prepare's.

Every id that PREV's ``users.parquet``/``items.parquet`` know keeps its index, so a model
trained on PREV lines up with the new data (warm starts); ids PREV does not know are appended
after them in sorted original-id order (the rule of a fresh vocabulary). Ids of PREV that the
new data lacks stay in the vocabulary with count 0, and such users have no row in
``sequences.parquet``. Both engines call :func:`extend` on the distinct ids they keep, so the
numbering cannot differ between them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recforge.artifact import file_sha256
from recforge.data import layout
from recforge.data.errors import DataError

_FILES = {"user": layout.USERS, "item": layout.ITEMS}


@dataclass
class Extended:
    """One side's vocabulary after extending PREV's."""

    ids: pa.Array
    """Original ids in idx order: PREV's, then the new ones sorted."""
    idx_of_present: np.ndarray
    """int32 idx of each id given to :func:`extend`, in the order given."""
    known: int
    new: int
    absent: int
    """Ids of PREV without interactions in the new data (they keep their idx, count 0)."""


def check_previous(directory: str) -> None:
    """Fail fast, before any input is read: PREV is a prepared directory whose vocabulary files
    have the id and idx columns of data/layout.py."""
    _manifest(directory)
    for kind, name in _FILES.items():
        path = Path(directory) / name
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(
                f"--vocab-from: cannot read Parquet ({_short(exc)})", path=str(path)
            ) from None
        for column in (f"{kind}_idx", f"{kind}_id"):
            if column not in schema.names:
                raise DataError(
                    f"--vocab-from: missing; expected the {column} column of data/layout.py",
                    path=str(path),
                    column=column,
                )
        _id_type(schema.field(f"{kind}_id").type, str(path), f"{kind}_id")


def read_previous(directory: str, kind: str) -> pa.Array:
    """PREV's ``kind`` ids in idx order (int64 or string), checked to be idx 1..N, unique."""
    path = Path(directory) / _FILES[kind]
    idx_col, id_col = f"{kind}_idx", f"{kind}_id"
    try:
        table = pq.read_table(path, columns=[idx_col, id_col])
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"--vocab-from: cannot read Parquet ({_short(exc)})", path=str(path)
        ) from None
    ids = table[id_col].combine_chunks()
    if pa.types.is_dictionary(ids.type):
        ids = ids.dictionary_decode()
    ids = ids.cast(_id_type(ids.type, str(path), id_col))
    if ids.null_count:
        raise DataError(
            "--vocab-from: null id; expected one per row", path=str(path), column=id_col
        )
    idx = table[idx_col].combine_chunks()
    idx = idx.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.argsort(idx, kind="stable")
    if not np.array_equal(idx[order], np.arange(1, len(idx) + 1)):
        raise DataError(
            f"--vocab-from: expected {idx_col} 1..{len(idx)}, each once (0 is padding)",
            path=str(path),
            column=idx_col,
        )
    ids = ids.take(pa.array(order))
    if pc.count_distinct(ids).as_py() != len(ids):
        raise DataError(
            "--vocab-from: an id repeats; expected one row per id", path=str(path), column=id_col
        )
    return ids


def extend(previous: pa.Array, present: pa.Array, directory: str, kind: str) -> Extended:
    """Number ``present`` (distinct ids the new data keeps, any order) after ``previous``."""
    path, column = str(Path(directory) / _FILES[kind]), f"{kind}_id"
    if pa.types.is_integer(previous.type) and not pa.types.is_integer(present.type):
        example = pc.min_max(present)["min"].as_py()  # not present[0]: engines differ in order
        raise DataError(
            f"--vocab-from: has integer ids, but the new data's {kind} ids are strings "
            f"(e.g. {example!r}); expected integer {kind} ids, as in this file",
            path=path,
            column=column,
        )
    if pa.types.is_string(previous.type) and pa.types.is_integer(present.type):
        # The readers turn integer-looking string ids into integers, so a day whose ids all
        # look like integers meets PREV's strings; compare as strings, as the readers do
        # across input files.
        present = pc.cast(present, pa.string())
    pos = pc.index_in(present, value_set=previous)
    is_new = pc.is_null(pos).to_numpy(zero_copy_only=False)
    idx = np.empty(len(present), np.int64)
    idx[~is_new] = pos.filter(pc.invert(pc.is_null(pos))).to_numpy().astype(np.int64) + 1
    new_ids = present.filter(pa.array(is_new))
    order = pc.sort_indices(new_ids).to_numpy()
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    idx[is_new] = len(previous) + 1 + rank
    known_here = int((~is_new).sum())
    return Extended(
        ids=pa.concat_arrays([previous, new_ids.take(pa.array(order))]),
        idx_of_present=idx.astype(np.int32),
        known=len(previous),
        new=len(order),
        absent=len(previous) - known_here,
    )


def renumber(
    directory: str,
    user_idx: np.ndarray,
    item_idx: np.ndarray,
    user_ids: pa.Array,
    item_ids: pa.Array,
) -> tuple[np.ndarray, np.ndarray, pa.Array, pa.Array, np.ndarray, dict[str, Any]]:
    """The memory engine's step: per-row idx 1..P over the sorted present ids -> extended idx.

    Returns the new per-row user and item idx, the vocabularies, the row order that puts the
    rows in user_idx order again (ties kept, so each user's time order stays) and the manifest
    entry. Rows come back already in that order; other per-row arrays need ``[order]``."""
    users = extend(read_previous(directory, "user"), user_ids, directory, "user")
    items = extend(read_previous(directory, "item"), item_ids, directory, "item")
    user_idx = users.idx_of_present[user_idx - 1]
    order = np.argsort(user_idx, kind="stable")
    item_idx = items.idx_of_present[item_idx - 1][order]
    entry = manifest_entry(directory, users, items)
    return user_idx[order], item_idx, users.ids, items.ids, order, entry


def manifest_entry(directory: str, users: Extended, items: Extended) -> dict[str, Any]:
    """The manifest's ``vocab_from``: where the carried-over indices come from, and how many."""
    digest = hashlib.sha256()
    for name in (layout.USERS, layout.ITEMS):
        digest.update(f"{name}:{file_sha256(Path(directory) / name)}\n".encode())
    entry: dict[str, Any] = {"path": str(directory), "fingerprint": digest.hexdigest()}
    for kind, ext in (("users", users), ("items", items)):
        entry[f"{kind}_known"] = ext.known
        entry[f"{kind}_new"] = ext.new
        entry[f"{kind}_absent"] = ext.absent
    return entry


def _manifest(directory: str) -> dict[str, Any]:
    try:
        return layout.read_manifest(directory)
    except FileNotFoundError:
        msg = f"--vocab-from: not a prepared directory (no {layout.MANIFEST})"
        raise DataError(msg, path=str(directory)) from None
    except ValueError as exc:  # its message names the file
        raise DataError(f"--vocab-from: {exc}") from None


def _id_type(t: pa.DataType, path: str, column: str) -> pa.DataType:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t):
        return pa.int64()
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pa.string()
    raise DataError(
        f"--vocab-from: has type {t}; expected integer or string ids", path=path, column=column
    )


def _short(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:300]
