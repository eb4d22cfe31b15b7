"""The DuckDB engine of `recforge data prepare` writes what the in-memory reference writes.

Random small interaction tables (shuffled, with timestamp ties, exact duplicates, string and
integer ids, one or two files, with and without ratings) go through both engines; the three
Parquet files must hold equal Arrow tables and the manifests must agree on everything but the
creation time, and `recforge data validate` must pass on the DuckDB output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recforge.data import layout
from recforge.data.errors import DataError
from recforge.data.prepare import PrepareConfig, prepare
from recforge.data.readers import Columns
from recforge.data.validate import validate

# Timing fields: the only ones allowed to differ between the engines.
VOLATILE = {"created_at"}


@st.composite
def interaction_tables(draw: st.DrawFn) -> dict:
    n = draw(st.integers(1, 40))
    n_users = draw(st.integers(1, 6))
    n_items = draw(st.integers(1, 8))
    # "mixed": integer-looking strings and others, so one file may read as integer ids and
    # the other as strings (then both compare as strings).
    user_style = draw(st.sampled_from(["int", "str", "mixed"]))
    item_style = draw(st.sampled_from(["int", "str", "mixed"]))
    users = draw(st.lists(st.integers(0, n_users - 1), min_size=n, max_size=n))
    items = draw(st.lists(st.integers(0, n_items - 1), min_size=n, max_size=n))
    # Few distinct timestamps, so ties within a user are common.
    ts = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    with_rating = draw(st.booleans())
    # NaN equals nothing and -0.0 equals 0.0 in the reference's duplicate check.
    ratings = draw(
        st.lists(st.sampled_from([1.0, 2.5, 0.0, -0.0, float("nan")]), min_size=n, max_size=n)
    )
    rows = list(zip(users, items, ts, ratings))
    dups = draw(st.lists(st.integers(0, n - 1), max_size=10))
    rows += [rows[i] for i in dups]
    perm = draw(st.permutations(range(len(rows))))
    rows = [rows[i] for i in perm]
    return {
        "user_id": [_id(u, user_style, "u") for u, _, _, _ in rows],
        "item_id": [_id(i * 7 - 20, item_style, "i") for _, i, _, _ in rows],
        "timestamp": [t for _, _, t, _ in rows],
        **({"rating": [r for _, _, _, r in rows]} if with_rating else {}),
    }


def _id(value: int, style: str, prefix: str) -> int | str:
    if style == "int":
        return value
    if style == "str" or value % 2:
        return f"{prefix}{value}"
    return str(value)


def _write_inputs(tmp: Path, data: dict, fmt: str, files: int) -> list[str]:
    table = pa.table(data)
    cut = table.num_rows // 2 if files == 2 and table.num_rows > 1 else table.num_rows
    parts = [table.slice(0, cut), table.slice(cut)] if cut < table.num_rows else [table]
    paths = []
    for k, part in enumerate(parts):
        path = tmp / f"part{k}.{fmt}"
        if fmt == "csv":
            pacsv.write_csv(part, path)
        else:
            pq.write_table(part, path)
        paths.append(str(path))
    return paths


def _run(config: PrepareConfig) -> tuple[dict | None, str | None]:
    try:
        return prepare(config), None
    except DataError as exc:
        return None, str(exc)


@settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    data=interaction_tables(),
    fmt=st.sampled_from(["parquet", "csv"]),
    files=st.integers(1, 2),
    min_user=st.integers(1, 3),
    min_item=st.integers(1, 3),
    split=st.sampled_from(["leave-one-out", "time"]),
    row_group_size=st.sampled_from([1, 2, 4096]),
)
def test_duckdb_matches_memory(
    tmp_path_factory: pytest.TempPathFactory,
    data: dict,
    fmt: str,
    files: int,
    min_user: int,
    min_item: int,
    split: str,
    row_group_size: int,
) -> None:
    tmp = tmp_path_factory.mktemp("engines")
    inputs = _write_inputs(tmp, data, fmt, files)
    assert_engines_agree(
        tmp,
        input=inputs,
        format=fmt,
        columns=Columns(rating="rating" if "rating" in data else None),
        min_user=min_user,
        min_item=min_item,
        split=split,
        row_group_size=row_group_size,
    )


def test_integer_ids_in_one_file_and_strings_in_another(tmp_path: Path) -> None:
    # The first file's ids read as integers, the second's as strings: all compare as strings.
    for name, users, items in (("a", ["10", "2", "2"], [5, 6, 5]), ("b", ["x", "10"], ["7", "y"])):
        pq.write_table(
            pa.table({"user_id": users, "item_id": items, "timestamp": list(range(len(users)))}),
            tmp_path / f"{name}.parquet",
        )
    manifest = assert_engines_agree(tmp_path, input=[str(tmp_path / "*.parquet")])
    assert manifest["users"] == 3
    users = pq.read_table(tmp_path / "duckdb" / layout.USERS)["user_id"].to_pylist()
    assert users == ["10", "2", "x"]


def assert_engines_agree(tmp: Path, **config) -> dict | None:
    """Prepare with both engines into tmp/memory and tmp/duckdb; the duckdb manifest."""
    outs = {}
    results = {}
    for engine in ("memory", "duckdb"):
        outs[engine] = tmp / engine
        results[engine] = _run(
            PrepareConfig(min_eval_users=0, out=str(outs[engine]), engine=engine, **config)
        )
    (m_mem, err_mem), (m_duck, err_duck) = results["memory"], results["duckdb"]
    assert err_duck == err_mem
    if err_mem is not None:
        assert not outs["duckdb"].exists()
        return None
    for name in (layout.ITEMS, layout.USERS, layout.SEQUENCES):
        mem = pq.read_table(outs["memory"] / name)
        duck = pq.read_table(outs["duckdb"] / name)
        assert duck.schema == mem.schema, name
        # Byte equality where NaN ratings make Arrow's equals() false on identical tables.
        same_bytes = (outs["duckdb"] / name).read_bytes() == (outs["memory"] / name).read_bytes()
        assert duck.equals(mem) or same_bytes, name
    mem_meta = pq.ParquetFile(outs["memory"] / layout.SEQUENCES).metadata
    duck_meta = pq.ParquetFile(outs["duckdb"] / layout.SEQUENCES).metadata
    assert [duck_meta.row_group(i).num_rows for i in range(duck_meta.num_row_groups)] == [
        mem_meta.row_group(i).num_rows for i in range(mem_meta.num_row_groups)
    ]
    on_disk = {e: json.loads((outs[e] / layout.MANIFEST).read_text()) for e in outs}
    for manifest in (m_mem, m_duck, on_disk["memory"], on_disk["duckdb"]):
        for key in VOLATILE:
            manifest.pop(key)
    assert m_duck == m_mem
    assert on_disk["duckdb"] == on_disk["memory"]
    report = validate(outs["duckdb"])
    assert report.ok, report.lines(10)
    assert not [p for p in tmp.iterdir() if p.name.startswith(".")]  # spill dir removed
    return m_duck


def test_duckdb_spill_dir_is_removed_on_failure(tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"user_id": [1, 2], "item_id": [1, 2], "timestamp": [1, 2]}), src)
    spill = tmp_path / "spill"
    spill.mkdir()
    with pytest.raises(DataError, match="no interactions left"):
        prepare(
            PrepareConfig(
                min_eval_users=0,
                input=[str(src)],
                out=str(tmp_path / "o"),
                min_user=5,
                spill_dir=str(spill),
            )
        )
    assert list(spill.iterdir()) == [] and not (tmp_path / "o").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "spill"]


def test_parquet_streamed_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from recforge.data import prepare_duckdb

    monkeypatch.setattr(prepare_duckdb, "_BATCH_ROWS", 3)
    n = 20
    table = pa.table(
        {
            "user_id": [i % 4 for i in range(n)],
            "item_id": [i % 2 for i in range(n)],
            "timestamp": pa.array([(i * 3) % 4 for i in range(n)], pa.timestamp("ms")),
            "rating": [float(i % 2) for i in range(n)],
        }
    )
    for k in range(2):
        pq.write_table(table.slice(k * 10, 10), tmp_path / f"p{k}.parquet", row_group_size=4)
    manifest = assert_engines_agree(
        tmp_path, input=[str(tmp_path / "*.parquet")], columns=Columns(rating="rating")
    )
    assert manifest["rows_removed"]["exact_duplicates"] > 0
    assert manifest["source"]["files"][1]["extra"]["timestamp_unit"] == "ms"


def test_error_in_a_later_batch_names_the_file_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recforge.data import prepare_duckdb

    monkeypatch.setattr(prepare_duckdb, "_BATCH_ROWS", 2)
    src = tmp_path / "in.parquet"
    items = pa.array([1, 2, 3, 4, None, 6], pa.int64())
    pq.write_table(
        pa.table({"user_id": [1] * 6, "item_id": items, "timestamp": list(range(6))}), src
    )
    assert assert_engines_agree(tmp_path, input=[str(src)]) is None
    with pytest.raises(DataError, match="row 5"):
        prepare(PrepareConfig(min_eval_users=0, input=[str(src)], out=str(tmp_path / "o")))
