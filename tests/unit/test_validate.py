"""`recforge data validate`: passes what `recforge data prepare` writes, names what is broken."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from recforge.cli import main
from recforge.data import layout
from recforge.data.validate import validate

ROW_GROUP = 16  # several row groups, so checks that carry state across them are exercised


def write_parquet(path: Path, **columns) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def prepare_cli(tmp: Path, out: Path, *extra: str) -> Path:
    """A prepared directory from the real CLI: string item ids, ties, rating, features."""
    rng = np.random.default_rng(0)
    n = 900
    src = write_parquet(
        tmp / "in.parquet",
        user_id=rng.integers(0, 70, n),
        item_id=[f"i{x:03d}" for x in rng.integers(0, 50, n)],
        timestamp=rng.integers(0, 60, n),  # few distinct values: many ties
        rating=rng.integers(1, 6, n).astype(float),
    )
    items = write_parquet(
        tmp / "item_features.parquet",
        item_id=[f"i{x:03d}" for x in range(55)],
        genre=[["a", "b", "c"][: x % 4] for x in range(55)],
        brand=[["x", "y", None][x % 3] for x in range(55)],
        price=[float(x) if x % 5 else None for x in range(55)],
    )
    users = write_parquet(
        tmp / "user_features.parquet",
        user_id=list(range(0, 70, 2)),
        country=[["de", "fr", "jp"][x % 3] for x in range(35)],
    )
    args = ["--input", str(src), "--format", "parquet", "--out", str(out)]
    args += ["--rating-col", "rating", "--item-features", str(items)]
    args += ["--user-features", str(users), "--row-group-size", str(ROW_GROUP), "--min-user", "3"]
    assert main(["data", "prepare", *args, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("validate")
    return prepare_cli(tmp, tmp / "prepared")


def validate_cli(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recforge", "data", "validate", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def rewrite(path: Path, change: Callable[[pa.Table], pa.Table]) -> None:
    pq.write_table(change(pq.read_table(path)), path, row_group_size=ROW_GROUP)


def replace_column(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def edit_manifest(directory: Path, change: Callable[[dict], None]) -> None:
    path = directory / layout.MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def edit_lists(directory: Path, column: str, change: Callable[[list[list]], None]) -> None:
    def apply(table: pa.Table) -> pa.Table:
        values = table[column].to_pylist()
        change(values)
        return replace_column(table, column, pa.array(values, table.schema.field(column).type))

    rewrite(directory / layout.SEQUENCES, apply)


def test_prepared_directory_passes(prepared: Path) -> None:
    proc = validate_cli(prepared)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((prepared / layout.MANIFEST).read_text())
    row_groups = pq.ParquetFile(prepared / layout.SEQUENCES).num_row_groups
    assert row_groups > 1
    assert proc.stdout.strip() == (
        f"{prepared}: valid: {manifest['users']} users, {manifest['items']} items, "
        f"{manifest['interactions']} interactions, {row_groups} row groups checked"
    )
    assert proc.stderr == ""


def test_time_split_passes(tmp_path: Path) -> None:
    out = prepare_cli(tmp_path, tmp_path / "timed", "--split", "time")
    report = validate(out)
    assert report.ok, report.lines()
    assert report.row_groups == pq.ParquetFile(out / layout.SEQUENCES).num_row_groups


# --- broken copies: one thing wrong each, exit code 2, a line naming file and column ---


def item_idx_gap(d: Path) -> list[str]:
    def gap(t: pa.Table) -> pa.Table:
        idx = np.arange(1, t.num_rows + 1, dtype=np.int32)
        idx[10:] += 1  # 11 is missing
        return replace_column(t, "item_idx", pa.array(idx))

    rewrite(d / layout.ITEMS, gap)
    return ["items.parquet", "column 'item_idx'", "row 11", "item_idx 12, expected 11"]


def item_index_above_n(d: Path) -> list[str]:
    n = json.loads((d / layout.MANIFEST).read_text())["items"]
    edit_lists(d, "item_idx", lambda seqs: seqs[20].__setitem__(1, n + 1))
    return ["sequences.parquet", "column 'item_idx'", "row 21", f"{n + 1}", f"expected 1..{n}"]


def timestamp_out_of_order(d: Path) -> list[str]:
    ts = pq.read_table(d / layout.SEQUENCES, columns=["timestamp"])["timestamp"].to_pylist()
    user = next(u for u, t in enumerate(ts) if u > ROW_GROUP and t[0] < t[-1])

    def swap(seqs: list[list]) -> None:
        seqs[user][0], seqs[user][-1] = seqs[user][-1], seqs[user][0]

    edit_lists(d, "timestamp", swap)
    return ["sequences.parquet", "column 'timestamp'", f"row {user + 1}", "time order"]


def interactions_off_by_one(d: Path) -> list[str]:
    edit_manifest(d, lambda m: m.update(interactions=m["interactions"] + 1))
    return ["manifest.json", "field 'interactions'", "but sequences.parquet holds"]


def eval_users_off_by_one(d: Path) -> list[str]:
    edit_manifest(d, lambda m: m["split_counts"].update(users_with_test=0))
    return ["manifest.json", "field 'split_counts.users_with_test'", "0, but the sequences give"]


def wrong_column_type(d: Path) -> list[str]:
    rewrite(
        d / layout.SEQUENCES, lambda t: replace_column(t, "length", pc.cast(t["length"], "int64"))
    )
    return ["sequences.parquet", "column 'length'", "has type int64; expected int32"]


def missing_file(d: Path) -> list[str]:
    (d / layout.USERS).unlink()
    return ["users.parquet", "missing"]


BROKEN: list[Callable[[Path], list[str]]] = [
    item_idx_gap,
    item_index_above_n,
    timestamp_out_of_order,
    interactions_off_by_one,
    eval_users_off_by_one,
    wrong_column_type,
    missing_file,
]


@pytest.fixture(scope="module")
def broken_runs(
    prepared: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, list[str], subprocess.Popen]]:
    """Every broken copy's CLI run, started at once: the interpreter start dominates each."""
    runs = {}
    for break_it in BROKEN:
        copy = Path(shutil.copytree(prepared, tmp_path_factory.mktemp(break_it.__name__) / "d"))
        expected = break_it(copy)
        command = [sys.executable, "-m", "recforge", "data", "validate", str(copy)]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs[break_it.__name__] = (copy, expected, proc)
    return runs


@pytest.mark.parametrize("case", [f.__name__ for f in BROKEN])
def test_broken_copy_is_refused_with_a_named_problem(
    case: str, broken_runs: dict[str, tuple[Path, list[str], subprocess.Popen]]
) -> None:
    copy, expected, proc = broken_runs[case]
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stdout
    lines = stderr.strip().splitlines()
    assert lines[-1] == f"recforge data validate: error: {copy}: {len(lines) - 1} problem(s)"
    assert any(all(part in line for part in expected) for line in lines), (expected, lines)


# --- the report itself, in process (no subprocess per case) ---


def broken(prepared: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(prepared, tmp_path / "copy"))


def test_each_user_once_and_sorted_ids(prepared: Path, tmp_path: Path) -> None:
    d = broken(prepared, tmp_path)

    def repeat_user(t: pa.Table) -> pa.Table:
        users = t["user_idx"].to_numpy().copy()
        users[ROW_GROUP] = users[ROW_GROUP - 1]  # across a row-group boundary
        return replace_column(t, "user_idx", pa.array(users))

    rewrite(d / layout.SEQUENCES, repeat_user)
    rewrite(d / layout.USERS, lambda t: t.take(pa.array([1, 0] + list(range(2, t.num_rows)))))
    lines = validate(d).lines()
    assert any(
        f"row {ROW_GROUP + 1}: user_idx {ROW_GROUP} appears again" in line
        and "sequences.parquet, column 'user_idx'" in line
        for line in lines
    ), lines
    assert any("users.parquet, column 'user_id', row 2" in line for line in lines), lines


def test_feature_codes_and_vocabularies(prepared: Path, tmp_path: Path) -> None:
    d = broken(prepared, tmp_path)
    card = json.loads((d / layout.MANIFEST).read_text())["features"]["item"]["brand"]["cardinality"]
    rewrite(d / layout.ITEMS, lambda t: replace_column(t, "brand", pc.add(t["brand"], card)))
    vocabs = json.loads((d / layout.FEATURE_VOCABS).read_text())
    vocabs["user"]["country"].append("zz")
    (d / layout.FEATURE_VOCABS).write_text(json.dumps(vocabs))
    lines = validate(d).lines()
    assert any(line.startswith("items.parquet, column 'brand', row 1: code") for line in lines), (
        lines
    )
    assert any("feature_vocabs.json, key 'user.country'" in line for line in lines), lines


def test_problems_are_capped(prepared: Path, tmp_path: Path) -> None:
    d = broken(prepared, tmp_path)
    edit_manifest(d, lambda m: m.update(split_counts={k: -1 for k in m["split_counts"]}))
    edit_manifest(d, lambda m: m.update(users=1, items=1, interactions=1))
    report = validate(d)
    assert len(report.problems) > 3
    lines = report.lines(limit=3)
    assert len(lines) == 4 and lines[-1] == f"... and {len(report.problems) - 3} more"


def test_not_a_prepared_directory(tmp_path: Path) -> None:
    report = validate(tmp_path)
    assert [str(p) for p in report.problems] == ["manifest.json: missing; not a prepared directory"]
