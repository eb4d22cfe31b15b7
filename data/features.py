"""Item and user feature tables: read, align to the id vocabulary, encode.

Encoding rules (by Arrow type; RecBole headers decide for ``.item``/``.user`` files):

- string, bool, integer -> ``categorical``: int32 code 1..K in sorted value order, 0 = missing.
- list<string> (RecBole ``token_seq``) -> ``list``: list<int32> codes, empty when missing.
- floating point -> ``numeric``: float32, NaN when missing.

Nothing is dropped silently: feature rows whose id is not in the interactions and ids with no
feature row are counted in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recforge.artifact import file_sha256
from recforge.data.errors import DataError
from recforge.data.readers import read_recbole_table


@dataclass
class EncodedFeatures:
    columns: dict[str, pa.Array] = field(default_factory=dict)
    """Encoded columns aligned to idx 1..N (row i is idx i + 1)."""
    spec: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per feature: kind, cardinality (codes incl. 0) and missing count."""
    vocabs: dict[str, list] = field(default_factory=dict)
    """Per categorical/list feature: the values of codes 1..K."""
    report: dict[str, Any] = field(default_factory=dict)


def read_feature_table(path: str, id_column: str) -> tuple[pa.Table, dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise DataError("feature file not found", path=path)
    if p.suffix in (".item", ".user"):
        table = read_recbole_table(p)
    else:
        try:
            table = pq.read_table(p)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(
                f"cannot read Parquet feature file ({str(exc).splitlines()[0][:200]})", path=path
            ) from None
    if id_column not in table.column_names:
        raise DataError(
            f"missing id column {id_column!r}; the file has {table.column_names}",
            path=path,
            column=id_column,
        )
    if table.num_rows == 0:
        raise DataError("feature file has no rows", path=path)
    return table, {
        "path": str(p),
        "bytes": p.stat().st_size,
        "sha256": file_sha256(p),
        "rows": table.num_rows,
    }


def encode_features(
    table: pa.Table,
    path: str,
    id_column: str,
    vocab_ids: pa.Array,
    columns: list[str] | None = None,
    list_columns: list[str] = (),
    categorical_columns: list[str] = (),
) -> EncodedFeatures:
    """Encode ``table``'s feature columns for the ids in ``vocab_ids`` (idx i+1 <-> vocab_ids[i]).

    ``list_columns``: string columns holding several values separated by whitespace or '|'
    (e.g. genres "Action Comedy"). ``categorical_columns``: numeric columns that are really codes
    (e.g. an occupation number).
    """
    ids = table[id_column]
    if ids.null_count:
        raise DataError("null id in feature file", path=path, column=id_column)
    ids = _as_vocab_type(ids, vocab_ids.type, path, id_column)
    uniq = pc.count_distinct(ids).as_py()
    if uniq != len(ids):
        counts = pc.value_counts(ids)
        dup = next(v["values"] for v in counts.to_pylist() if v["counts"] > 1)
        raise DataError(
            f"{len(ids) - uniq} duplicate id(s), e.g. {dup!r}; expected one row per id",
            path=path,
            column=id_column,
        )
    # Position of each vocabulary id in the feature table (-1 when it has no row).
    pos = pc.index_in(vocab_ids, value_set=ids).to_numpy(zero_copy_only=False)
    has_row = ~np.isnan(pos) if pos.dtype.kind == "f" else pos >= 0
    pos = np.where(has_row, np.nan_to_num(pos, nan=0), 0).astype(np.int64)
    known = pc.is_in(ids, value_set=vocab_ids)
    out = EncodedFeatures(
        report={
            "rows": len(ids),
            "rows_for_unknown_ids": int(len(ids) - pc.sum(known).as_py()),
            "ids_without_row": int((~has_row).sum()),
        }
    )
    names = columns if columns is not None else [c for c in table.column_names if c != id_column]
    for name in names:
        if name not in table.column_names:
            raise DataError(
                f"feature column {name!r} not found; the file has {table.column_names}",
                path=path,
                column=name,
            )
        col = table[name].combine_chunks()
        if pa.types.is_dictionary(col.type):
            col = col.dictionary_decode()
        if name in list_columns:
            if not pa.types.is_string(col.type):
                raise DataError(
                    f"has type {col.type}; a list column must hold strings", path=path, column=name
                )
            col = pc.split_pattern_regex(pc.utf8_trim_whitespace(col), r"[\s|]+")
        elif name in categorical_columns:
            if pa.types.is_floating(col.type):
                values = col.to_numpy(zero_copy_only=False)
                finite = values[np.isfinite(values)]
                if (finite != np.floor(finite)).any():
                    raise DataError(
                        "has fractional values; "
                        "a categorical column needs whole numbers or strings",
                        path=path,
                        column=name,
                    )
                col = pc.cast(col, pa.int64())
            elif not (pa.types.is_integer(col.type) or pa.types.is_string(col.type)):
                raise DataError(
                    f"has type {col.type}; cannot be categorical", path=path, column=name
                )
        aligned = col.take(pa.array(pos))
        missing = pa.array(~has_row)
        _encode_one(out, name, aligned, missing, path)
    return out


def _encode_one(
    out: EncodedFeatures, name: str, col: pa.Array, missing: pa.Array, path: str
) -> None:
    t = col.type
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        values = pc.cast(col, pa.float32()).to_numpy(zero_copy_only=False).astype(np.float32)
        values[np.asarray(missing)] = np.nan
        out.columns[name] = pa.array(values)
        out.spec[name] = {
            "kind": "numeric",
            "cardinality": 0,
            "missing": int(np.isnan(values).sum()),
        }
        return
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        if not (pa.types.is_string(t.value_type) or pa.types.is_integer(t.value_type)):
            raise DataError(
                f"list of {t.value_type}; expected a list of strings or integers",
                path=path,
                column=name,
            )
        col = pc.if_else(missing, pa.scalar(None, type=t), col)
        lens = (
            pc.fill_null(pc.list_value_length(col), 0)
            .to_numpy(zero_copy_only=False)
            .astype(np.int64)
        )
        row_of = np.repeat(np.arange(len(col)), lens)
        flat = pc.cast(pc.list_flatten(col), pa.string())
        # Empty tokens come from doubled separators; they are not values.
        keep = np.asarray(pc.fill_null(pc.greater(pc.utf8_length(flat), 0), False))
        vocab = _sorted_values(flat.filter(pa.array(keep)))
        codes = pc.index_in(flat, value_set=vocab).to_numpy(zero_copy_only=False)
        codes = (np.nan_to_num(codes, nan=-1).astype(np.int64) + 1)[keep].astype(np.int32)
        new_lens = np.bincount(row_of[keep], minlength=len(col))
        offsets = np.concatenate([[0], np.cumsum(new_lens)]).astype(np.int32)
        out.columns[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(codes, pa.int32()))
        out.spec[name] = {
            "kind": "list",
            "cardinality": len(vocab) + 1,
            "missing": int((new_lens == 0).sum()),
        }
        out.vocabs[name] = vocab.to_pylist()
        return
    if (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_integer(t)
        or pa.types.is_boolean(t)
    ):
        col = pc.if_else(missing, None, col)
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            col = pc.if_else(pc.equal(pc.utf8_trim_whitespace(col), ""), None, col)
        vocab = _sorted_values(col)
        codes = pc.index_in(col, value_set=vocab)
        codes = pc.fill_null(pc.add(pc.cast(codes, pa.int32()), 1), 0)
        out.columns[name] = codes
        out.spec[name] = {
            "kind": "categorical",
            "cardinality": len(vocab) + 1,
            "missing": int(pc.sum(pc.equal(codes, 0)).as_py() or 0),
        }
        out.vocabs[name] = vocab.to_pylist()
        return
    raise DataError(
        f"has type {t}; expected string, integer, bool, float or list of strings",
        path=path,
        column=name,
    )


def _sorted_values(col: pa.Array) -> pa.Array:
    uniq = pc.unique(col.drop_null())
    return uniq.take(pc.sort_indices(uniq))


def _as_vocab_type(
    ids: pa.ChunkedArray, want: pa.DataType, path: str, column: str
) -> pa.ChunkedArray:
    if ids.type == want:
        return ids
    if pa.types.is_floating(ids.type) and pa.types.is_integer(want):
        raise DataError(
            f"has type {ids.type}; the interaction ids are integers", path=path, column=column
        )
    try:
        if pa.types.is_string(ids.type) and pa.types.is_integer(want):
            return pc.cast(pc.utf8_trim_whitespace(ids), want)
        return pc.cast(ids, want)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DataError(
            f"ids of type {ids.type} do not match the interaction ids ({want})",
            path=path,
            column=column,
        ) from None
