"""Reading raw interaction files into one normalised Arrow table.

Every reader returns the same shape: columns ``user_id`` (int64 or string), ``item_id`` (int64 or
string), ``timestamp`` (int64), optional ``rating`` (float32), in input row order. Anything that
cannot be read that way raises :class:`~data.errors.DataError` naming the file and column.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recforge.artifact import file_sha256
from recforge.data.errors import DataError

FORMATS = ("parquet", "csv", "movielens", "recbole", "sasrec-txt")
_SUFFIXES = {
    "parquet": (".parquet", ".pq"),
    "csv": (".csv", ".tsv", ".txt"),
    "movielens": (".dat", ".data"),
    "recbole": (".inter",),
    "sasrec-txt": (".txt",),
}


@dataclass
class Columns:
    """Names of the interaction columns in the input."""

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"
    rating: str | None = None
    """Optional rating/weight column; kept as float32 when given."""
    delimiter: str | None = None
    """CSV delimiter; default ',' (tab for .tsv)."""
    consent: str | None = None
    """Optional consent column (true/false or 1/0): read as ``consent`` so that prepare can drop
    the rows without consent (:mod:`recforge.data.consent`)."""


@dataclass
class SourceFile:
    path: str
    format: str
    bytes: int
    sha256: str
    rows: int = 0
    extra: dict = field(default_factory=dict)


def resolve_inputs(inputs: list[str], fmt: str) -> list[Path]:
    """Files named by paths, directories and globs, in a stable order."""
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    files: list[Path] = []
    for spec in inputs:
        path = Path(spec)
        if any(ch in spec for ch in "*?["):
            matched = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not matched:
                raise DataError("glob matched no files", path=spec)
            files.extend(matched)
        elif path.is_dir():
            matched = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix in _SUFFIXES[fmt] and not p.name.startswith((".", "_"))
            )
            if not matched:
                raise DataError(
                    f"directory holds no {fmt} files ({'/'.join(_SUFFIXES[fmt])})", path=spec
                )
            files.extend(matched)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError("no such file or directory", path=spec)
    return files


def read_interactions(
    inputs: list[str], fmt: str, columns: Columns
) -> tuple[pa.Table, list[SourceFile]]:
    files = resolve_inputs(inputs, fmt)
    tables, sources = [], []
    row_offset = 0
    for path in files:
        source = SourceFile(str(path), fmt, os.path.getsize(path), file_sha256(path))
        if source.bytes == 0:
            raise DataError("file is empty", path=str(path))
        table = READERS[fmt](path, columns, row_offset)
        # MovieLens and SASRec text files have fixed columns; the others use the given names.
        names = {"movielens": Columns(rating="rating"), "sasrec-txt": Columns()}.get(fmt, columns)
        table, unit = normalise(table, str(path), names)
        source.rows = table.num_rows
        source.extra["timestamp_unit"] = unit
        if fmt == "sasrec-txt":
            source.extra["timestamp_unit"] = "line number (the file is in time order per user)"
        row_offset += table.num_rows
        tables.append(table)
        sources.append(source)
    if sum(t.num_rows for t in tables) == 0:
        raise DataError("no interactions in the input", path=", ".join(str(f) for f in files))
    table = _concat(tables, files)
    return table, sources


def _concat(tables: list[pa.Table], files: list[Path]) -> pa.Table:
    for name in ("user_id", "item_id"):
        kinds = {pa.types.is_string(t.schema.field(name).type) for t in tables}
        if len(kinds) > 1:
            # One file has integer ids and another string ids: compare them as strings.
            tables = [
                t.set_column(t.schema.get_field_index(name), name, pc.cast(t[name], pa.string()))
                for t in tables
            ]
    has_rating = {"rating" in t.column_names for t in tables}
    if len(has_rating) > 1:
        raise DataError(
            "some input files have the rating column and others do not",
            path=", ".join(str(f) for f in files),
        )
    return pa.concat_tables(tables).combine_chunks()


# --- per-format readers: each returns a table whose columns are named as in `columns` ---


def _read_parquet(path: Path, columns: Columns, row_offset: int) -> pa.Table:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read Parquet file ({_short(exc)})", path=str(path)) from None
    wanted = _wanted(columns)
    _require(schema.names, wanted, str(path))
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"cannot read Parquet file, truncated or corrupt? ({_short(exc)})", path=str(path)
        ) from None
    # Row group by row group, so that a corrupt one is named in a file of many.
    groups = [read_row_group(parquet, i, path, wanted) for i in range(parquet.num_row_groups)]
    return pa.concat_tables(groups) if groups else parquet.schema_arrow.empty_table().select(wanted)


def read_row_group(parquet: pq.ParquetFile, i: int, path: Path, columns: list[str]) -> pa.Table:
    """Row group ``i`` (counted from 0, as Parquet tools do) of ``path``, or a DataError."""
    try:
        return parquet.read_row_group(i, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise row_group_error(parquet, i, path, exc) from None


def row_group_error(parquet: pq.ParquetFile, i: int, path: Path, exc: Exception) -> DataError:
    # Arrow quotes the corrupt bytes it met; escape them so the message stays printable.
    reason = "".join(c if c.isprintable() else repr(c)[1:-1] for c in _short(exc))
    return DataError(
        f"row group {i} (of {parquet.num_row_groups}, counted from 0) cannot be read ({reason})",
        path=str(path),
    )


def _read_csv(path: Path, columns: Columns, row_offset: int) -> pa.Table:
    delimiter = columns.delimiter or ("\t" if path.suffix == ".tsv" else ",")
    wanted = _wanted(columns)
    try:
        table = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(include_columns=None),
        )
    except pa.ArrowInvalid as exc:
        raise DataError(f"cannot parse CSV ({_short(exc)})", path=str(path)) from None
    _require(table.column_names, wanted, str(path))
    return table.select(wanted)


def _read_movielens(path: Path, columns: Columns, row_offset: int) -> pa.Table:
    """``ratings.dat`` (``user::item::rating::timestamp``) or ``u.data`` (tab-separated)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    double_colon = b"::" in head
    names = (
        ["user_id", "_a", "item_id", "_b", "rating", "_c", "timestamp"]
        if double_colon
        else ["user_id", "item_id", "rating", "timestamp"]
    )
    try:
        # '::' is read as ':' with an empty field between, which Arrow's CSV reader streams fast.
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names),
            parse_options=pacsv.ParseOptions(
                delimiter=":" if double_colon else "\t", quote_char=False
            ),
            convert_options=pacsv.ConvertOptions(
                include_columns=["user_id", "item_id", "rating", "timestamp"],
                column_types={
                    "user_id": pa.int64(),
                    "item_id": pa.int64(),
                    "rating": pa.float32(),
                    "timestamp": pa.int64(),
                },
            ),
        )
    except pa.ArrowInvalid as exc:
        match = re.search(r"CSV column #(\d+)", str(exc))
        column = names[int(match.group(1))] if match and int(match.group(1)) < len(names) else None
        raise DataError(
            f"not a MovieLens ratings file ({_short(exc)})", path=str(path), column=column
        ) from None
    return table.select(["user_id", "item_id", "timestamp", "rating"])


def _read_recbole(path: Path, columns: Columns, row_offset: int) -> pa.Table:
    """RecBole atomic ``.inter``: tab-separated, header ``name:type``."""
    table = read_recbole_table(path)
    _require(table.column_names, _wanted(columns), str(path))
    return table.select(_wanted(columns))


def read_recbole_table(path: Path) -> pa.Table:
    """Any RecBole atomic file; ``token`` -> string, ``token_seq`` -> list<string>, ``float`` ->
    float64."""
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline().rstrip("\r\n")
    if not header:
        raise DataError("empty RecBole file", path=str(path))
    names, types = [], {}
    for i, spec in enumerate(header.split("\t")):
        name, sep, kind = spec.partition(":")
        if not sep or kind not in ("token", "token_seq", "float", "float_seq"):
            raise DataError(
                f"header field {i + 1} is {spec!r}; "
                "expected 'name:token|token_seq|float|float_seq'",
                path=str(path),
            )
        names.append(name)
        types[name] = kind
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names}, strings_can_be_null=False
            ),
        )
    except pa.ArrowInvalid as exc:
        raise DataError(f"cannot parse RecBole file ({_short(exc)})", path=str(path)) from None
    out = {}
    for name in names:
        col = table[name]
        kind = types[name]
        if kind == "token":
            out[name] = col
        elif kind == "token_seq":
            out[name] = pc.split_pattern(pc.utf8_trim_whitespace(col), " ")
        elif kind == "float":
            out[name] = _cast_strict(col, pa.float64(), str(path), name)
        else:
            out[name] = pc.cast(
                pc.split_pattern(pc.utf8_trim_whitespace(col), " "), pa.list_(pa.float64())
            )
    return pa.table(out)


def _read_sasrec_txt(path: Path, columns: Columns, row_offset: int) -> pa.Table:
    """``user item`` per line, lines in time order per user: the line number is the timestamp."""
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=["user_id", "item_id"]),
            parse_options=pacsv.ParseOptions(delimiter=" ", quote_char=False),
            convert_options=pacsv.ConvertOptions(
                column_types={"user_id": pa.string(), "item_id": pa.string()}
            ),
        )
    except pa.ArrowInvalid as exc:
        raise DataError(f"expected 'user item' per line ({_short(exc)})", path=str(path)) from None
    for name in ("user_id", "item_id"):
        # The format's ids are integers; read as text first only so the error can quote a value.
        bad = pc.invert(pc.match_substring_regex(table[name], r"^[0-9]+$"))
        if pc.any(bad).as_py():
            line = _first_true(bad)
            raise DataError(
                f"line {line}: {table[name][line - 1].as_py()!r} is not an integer "
                "(sasrec-txt ids are non-negative integers)",
                path=str(path),
                column=name,
            )
        table = table.set_column(
            table.schema.get_field_index(name), name, pc.cast(table[name], pa.int64())
        )
    ts = pa.array(np.arange(row_offset, row_offset + table.num_rows, dtype=np.int64))
    return table.append_column("timestamp", ts)


READERS = {
    "parquet": _read_parquet,
    "csv": _read_csv,
    "movielens": _read_movielens,
    "recbole": _read_recbole,
    "sasrec-txt": _read_sasrec_txt,
}


# --- normalisation: names and types ---


def normalise(table: pa.Table, path: str, columns: Columns) -> tuple[pa.Table, str]:
    """The table with the canonical names and types, and the timestamp unit."""
    ts_type = table[columns.timestamp].type
    unit = (
        ts_type.unit
        if pa.types.is_timestamp(ts_type)
        else "s"
        if pa.types.is_date(ts_type)
        else "as given"
    )
    out = {
        "user_id": _id_column(table[columns.user], path, columns.user),
        "item_id": _id_column(table[columns.item], path, columns.item),
        "timestamp": _timestamp_column(table[columns.timestamp], path, columns.timestamp),
    }
    if columns.rating:
        out["rating"] = _numeric_column(table[columns.rating], path, columns.rating)
    if columns.consent:
        from recforge.data.consent import consent_values

        out["consent"] = consent_values(table[columns.consent], path, columns.consent)
    return pa.table(out), unit


def _id_column(col: pa.ChunkedArray, path: str, name: str) -> pa.ChunkedArray:
    _no_nulls(col, path, name)
    t = col.type
    if pa.types.is_dictionary(t):
        col = pc.cast(col, t.value_type)
        t = col.type
    if pa.types.is_integer(t):
        return pc.cast(col, pa.int64())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        col = pc.cast(col, pa.string())
        stripped = pc.utf8_trim_whitespace(col)
        empty = pc.equal(pc.utf8_length(stripped), 0)
        if pc.any(empty).as_py():
            raise DataError("empty id", path=path, column=name, row=_first_true(empty))
        # Integer-looking string ids (RecBole tokens, text files) become integers so that ids
        # sort numerically and match integer ids from feature files.
        if pc.all(pc.match_substring_regex(stripped, r"^-?[0-9]{1,18}$")).as_py():
            return pc.cast(stripped, pa.int64())
        return col
    raise DataError(f"has type {t}; expected integer or string ids", path=path, column=name)


def _timestamp_column(col: pa.ChunkedArray, path: str, name: str) -> pa.ChunkedArray:
    _no_nulls(col, path, name)
    t = col.type
    if pa.types.is_integer(t):
        return pc.cast(col, pa.int64())
    if pa.types.is_timestamp(t):
        # Keep the column's own unit; the manifest records it.
        return pc.cast(col, pa.int64())
    if pa.types.is_date(t):
        return pc.cast(pc.cast(col, pa.timestamp("s")), pa.int64())
    if pa.types.is_floating(t):
        values = col.to_numpy()
        bad = ~np.isfinite(values) | (values != np.floor(values))
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(
                f"value {float(values[row])!r} is not a whole number of seconds/milliseconds",
                path=path,
                column=name,
                row=row + 1,
            )
        return pa.chunked_array([pa.array(values.astype(np.int64))])
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            return pc.cast(col, pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        try:  # ISO-8601 text, read as seconds
            return pc.cast(pc.cast(col, pa.timestamp("s")), pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        return _cast_strict(col, pa.int64(), path, name)
    raise DataError(
        f"has type {t}; expected integer seconds/milliseconds or an Arrow timestamp",
        path=path,
        column=name,
    )


def _numeric_column(col: pa.ChunkedArray, path: str, name: str) -> pa.ChunkedArray:
    _no_nulls(col, path, name)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        return pc.cast(col, pa.float32())
    if pa.types.is_string(col.type):
        return pc.cast(_cast_strict(col, pa.float64(), path, name), pa.float32())
    raise DataError(f"has type {col.type}; expected a number", path=path, column=name)


def _cast_strict(col: pa.ChunkedArray, to: pa.DataType, path: str, name: str) -> pa.ChunkedArray:
    try:
        return pc.cast(col, to)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    # Find the first value that does not parse, to name it: a vectorised pre-check for numbers,
    # then the slow path only for other types.
    pattern = {
        pa.int64(): r"^\s*[-+]?[0-9]+\s*$",
        pa.float64(): r"^\s*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?\s*$",
    }.get(to)
    if pattern is not None and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        ok = pc.match_substring_regex(col, pattern)
        bad = pc.invert(pc.fill_null(ok, True))
        if pc.any(bad).as_py():
            row = _first_true(bad)
            raise DataError(
                f"value {col[row - 1].as_py()!r} is not a valid {_type_name(to)}",
                path=path,
                column=name,
                row=row,
            )
    values = col.to_pylist()
    for i, v in enumerate(values):
        try:
            pc.cast(pa.array([v]), to)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise DataError(
                f"value {v!r} is not a valid {_type_name(to)}", path=path, column=name, row=i + 1
            ) from None
    raise DataError(f"cannot convert to {to}", path=path, column=name)


def _type_name(t: pa.DataType) -> str:
    return {pa.int64(): "integer", pa.float64(): "number"}.get(t, str(t))


def _no_nulls(col: pa.ChunkedArray, path: str, name: str) -> None:
    if col.null_count:
        raise DataError(
            f"{col.null_count} null value(s); ids and timestamps must be set",
            path=path,
            column=name,
            row=_first_true(pc.is_null(col)),
        )


def _first_true(mask: pa.ChunkedArray | pa.Array) -> int:
    """1-based row of the first true value."""
    return int(np.argmax(np.asarray(mask.to_numpy(zero_copy_only=False)))) + 1


def _wanted(columns: Columns) -> list[str]:
    names = (columns.user, columns.item, columns.timestamp, columns.rating, columns.consent)
    return [c for c in names if c]


def _require(have: list[str], wanted: list[str], path: str) -> None:
    missing = [c for c in wanted if c not in have]
    if missing:
        raise DataError(
            f"missing column(s) {', '.join(repr(m) for m in missing)}; the file has "
            f"{', '.join(repr(h) for h in have)} (set the names with --user-col/--item-col/"
            f"--time-col/--rating-col/--consent-col)",
            path=path,
            column=missing[0],
        )


def _short(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:300]
