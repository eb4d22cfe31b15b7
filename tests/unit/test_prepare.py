"""`recforge data prepare`: what it writes, what it counts, and how it refuses bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recforge.cli import main
from recforge.data import layout
from recforge.data.prepare import PrepareConfig, prepare


def write_parquet(path: Path, **columns) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def run_cli(*args: str) -> int:
    # The inputs here are a few rows: most have no evaluation users, which is not the point.
    return main(["data", "prepare", "--min-eval-users", "0", *args])


def read_sequences(out: Path) -> dict[int, list[int]]:
    t = pq.read_table(out / layout.SEQUENCES)
    return dict(zip(t["user_idx"].to_pylist(), t["item_idx"].to_pylist()))


def test_vocab_order_padding_sequences_and_split(tmp_path: Path) -> None:
    src = write_parquet(
        tmp_path / "in.parquet",
        user_id=["bob", "amy", "bob", "amy", "amy", "bob"],
        item_id=[30, 10, 20, 30, 20, 10],
        timestamp=[3, 5, 1, 9, 7, 2],
    )
    m = prepare(PrepareConfig(min_eval_users=0, input=[str(src)], out=str(tmp_path / "out")))
    out = tmp_path / "out"
    users = pq.read_table(out / layout.USERS).to_pydict()
    items = pq.read_table(out / layout.ITEMS).to_pydict()
    # idx follows sorted original ids; 0 is never used (padding).
    assert users["user_idx"] == [1, 2] and users["user_id"] == ["amy", "bob"]
    assert items["item_idx"] == [1, 2, 3] and items["item_id"] == [10, 20, 30]
    assert items["count"] == [2, 2, 2]
    seqs = read_sequences(out)
    assert seqs == {1: [1, 2, 3], 2: [2, 1, 3]}  # amy: 10@5,20@7,30@9; bob: 20@1,10@2,30@3
    ts = pq.read_table(out / layout.SEQUENCES)["timestamp"].to_pylist()
    assert ts == [[5, 7, 9], [1, 2, 3]]
    assert m["split"] == {"type": "leave-one-out"}
    assert (
        m["split_counts"]["train_interactions"] == 2 and m["split_counts"]["test_interactions"] == 2
    )
    assert m["rows_out_of_time_order"] == 2  # bob's 30@3 before 20@1, and 10@2 after 30@3...
    assert json.loads((out / layout.MANIFEST).read_text())["fingerprint"] == m["fingerprint"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_duplicates_removed_and_ties_keep_input_order(tmp_path: Path) -> None:
    src = write_parquet(
        tmp_path / "in.parquet",
        user_id=[1, 1, 1, 1, 1, 1],
        item_id=[5, 6, 5, 7, 6, 8],
        timestamp=[10, 10, 10, 10, 11, 10],
    )
    m = prepare(PrepareConfig(min_eval_users=0, input=[str(src)], out=str(tmp_path / "out")))
    # (1,5,10) appears twice (non-adjacent); (1,6,10) and (1,6,11) differ in time.
    assert m["rows_removed"]["exact_duplicates"] == 1
    assert m["interactions"] == 5
    items = pq.read_table(tmp_path / "out" / layout.ITEMS)["item_id"].to_pylist()
    seq = [items[i - 1] for i in read_sequences(tmp_path / "out")[1]]
    assert seq == [5, 6, 7, 8, 6]  # ties at t=10 in input order, then t=11


def test_rating_distinguishes_duplicates(tmp_path: Path) -> None:
    src = write_parquet(
        tmp_path / "in.parquet",
        user_id=[1, 1, 1],
        item_id=[5, 5, 5],
        timestamp=[1, 1, 1],
        rating=[4.0, 5.0, 4.0],
    )
    from recforge.data.readers import Columns

    m = prepare(
        PrepareConfig(
            min_eval_users=0,
            input=[str(src)],
            out=str(tmp_path / "out"),
            columns=Columns(rating="rating"),
        )
    )
    assert m["rows_removed"]["exact_duplicates"] == 1 and m["interactions"] == 2
    assert pq.read_table(tmp_path / "out" / layout.SEQUENCES)["rating"].to_pylist() == [[4.0, 5.0]]


def test_k_core_iterates_to_fixed_point(tmp_path: Path) -> None:
    # Item 9 has 1 interaction: removing it leaves user 3 with 1 interaction, which then goes,
    # which leaves item 8 with 1 interaction, which goes too.
    users = [1, 1, 2, 2, 3, 3, 1, 2]
    items = [7, 8, 7, 8, 9, 8, 6, 6]
    src = write_parquet(
        tmp_path / "in.parquet", user_id=users, item_id=items, timestamp=list(range(8))
    )
    m = prepare(
        PrepareConfig(
            min_eval_users=0, input=[str(src)], out=str(tmp_path / "out"), min_user=2, min_item=2
        )
    )
    assert m["users"] == 2 and m["items"] == 3
    assert m["rows_removed"]["min_item"] + m["rows_removed"]["min_user"] == 2
    assert m["interactions"] + sum(m["rows_removed"].values()) == m["input_rows"] == 8
    assert m["filters"]["users_removed"] == 1 and m["filters"]["items_removed"] == 1
    assert m["filters"]["k_core_iterations"] >= 2


def test_k_core_chain_needs_several_passes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 5000
    u = rng.integers(0, 300, n)
    i = rng.zipf(1.5, n) % 400
    src = write_parquet(tmp_path / "in.parquet", user_id=u, item_id=i, timestamp=np.arange(n))
    m = prepare(
        PrepareConfig(
            min_eval_users=0, input=[str(src)], out=str(tmp_path / "out"), min_user=10, min_item=10
        )
    )
    seqs = pq.read_table(tmp_path / "out" / layout.SEQUENCES)
    lengths = np.array(seqs["length"].to_pylist())
    flat = np.concatenate(seqs["item_idx"].to_pylist())
    assert lengths.min() >= 10 and np.bincount(flat)[1:].min() >= 10  # a true fixed point
    assert m["interactions"] + sum(m["rows_removed"].values()) == n


def test_time_split(tmp_path: Path) -> None:
    ts = np.arange(100)
    src = write_parquet(tmp_path / "in.parquet", user_id=ts % 5, item_id=ts % 7, timestamp=ts)
    m = prepare(
        PrepareConfig(
            min_eval_users=0,
            input=[str(src)],
            out=str(tmp_path / "out"),
            split="time",
            val_fraction=0.1,
            test_fraction=0.2,
        )
    )
    assert m["split"]["type"] == "time"
    c = m["split_counts"]
    assert (c["train_interactions"], c["val_interactions"], c["test_interactions"]) == (70, 10, 20)


def test_csv_and_movielens_and_sasrec_and_globs(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("uid,iid,ts\n1,a,3\n1,b,4\n2,a,1\n")
    assert (
        run_cli(
            "--input",
            str(tmp_path / "a.csv"),
            "--format",
            "csv",
            "--user-col",
            "uid",
            "--item-col",
            "iid",
            "--time-col",
            "ts",
            "--out",
            str(tmp_path / "o1"),
        )
        == 0
    )
    (tmp_path / "ratings.dat").write_text("1::10::5::100\n1::20::3::90\n2::10::4::50\n")
    assert (
        run_cli(
            "--input",
            str(tmp_path / "ratings.dat"),
            "--format",
            "movielens",
            "--out",
            str(tmp_path / "o2"),
        )
        == 0
    )
    assert read_sequences(tmp_path / "o2") == {1: [2, 1], 2: [1]}
    (tmp_path / "u.data").write_text("1\t10\t5\t100\n2\t10\t4\t50\n")
    assert (
        run_cli(
            "--input",
            str(tmp_path / "u.data"),
            "--format",
            "movielens",
            "--out",
            str(tmp_path / "o3"),
        )
        == 0
    )
    (tmp_path / "s.txt").write_text("1 5\n1 3\n2 3\n1 4\n")
    assert (
        run_cli(
            "--input",
            str(tmp_path / "s.txt"),
            "--format",
            "sasrec-txt",
            "--out",
            str(tmp_path / "o4"),
        )
        == 0
    )
    assert read_sequences(tmp_path / "o4") == {1: [3, 1, 2], 2: [1]}  # file order is time order
    parts = tmp_path / "parts"
    parts.mkdir()
    write_parquet(parts / "p0.parquet", user_id=[1, 2], item_id=[1, 1], timestamp=[1, 2])
    write_parquet(parts / "p1.parquet", user_id=[1], item_id=[2], timestamp=[0])
    m = prepare(
        PrepareConfig(min_eval_users=0, input=[str(parts / "*.parquet")], out=str(tmp_path / "o5"))
    )
    assert m["interactions"] == 3 and len(m["source"]["files"]) == 2
    assert read_sequences(tmp_path / "o5")[1] == [2, 1]
    m = prepare(PrepareConfig(min_eval_users=0, input=[str(parts)], out=str(tmp_path / "o6")))
    assert m["interactions"] == 3


def test_arrow_timestamps_and_iso_text(tmp_path: Path) -> None:
    src = write_parquet(
        tmp_path / "in.parquet",
        user_id=[1, 1],
        item_id=[1, 2],
        timestamp=pa.array([2_000, 1_000], pa.timestamp("ms")),
    )
    m = prepare(PrepareConfig(min_eval_users=0, input=[str(src)], out=str(tmp_path / "o")))
    assert m["source"]["files"][0]["extra"]["timestamp_unit"] == "ms"
    assert read_sequences(tmp_path / "o")[1] == [2, 1]
    (tmp_path / "t.csv").write_text(
        "user_id,item_id,timestamp\n1,1,2024-01-02T00:00:00\n1,2,2024-01-01T00:00:00\n"
    )
    prepare(
        PrepareConfig(
            min_eval_users=0,
            input=[str(tmp_path / "t.csv")],
            format="csv",
            out=str(tmp_path / "o2"),
        )
    )
    assert read_sequences(tmp_path / "o2")[1] == [2, 1]


def test_item_and_user_features_aligned_and_counted(tmp_path: Path) -> None:
    src = write_parquet(
        tmp_path / "in.parquet", user_id=[1, 1, 2], item_id=[10, 20, 30], timestamp=[1, 2, 3]
    )
    feats = write_parquet(
        tmp_path / "items.parquet",
        item_id=[30, 10, 99],
        genre=[["b", "a"], ["a"], ["c"]],
        brand=["x", None, "y"],
        price=[3.0, 1.5, 9.0],
    )
    ufeats = write_parquet(tmp_path / "users.parquet", user_id=[2], country=["de"])
    m = prepare(
        PrepareConfig(
            min_eval_users=0,
            input=[str(src)],
            out=str(tmp_path / "o"),
            item_features=str(feats),
            user_features=str(ufeats),
        )
    )
    items = pq.read_table(tmp_path / "o" / layout.ITEMS).to_pydict()
    vocabs = json.loads((tmp_path / "o" / layout.FEATURE_VOCABS).read_text())
    # Vocabularies cover the items that are in the data (item 99 is not).
    assert vocabs["item"]["genre"] == ["a", "b"] and vocabs["item"]["brand"] == ["x"]
    assert items["genre"] == [[1], [], [2, 1]]  # item 20 has no feature row: empty list
    assert items["brand"] == [0, 0, 1]  # 10: null, 20: no row, 30: 'x'
    assert np.isnan(items["price"][1]) and items["price"][0] == 1.5
    rep = m["feature_files"]["item"]
    assert rep["rows_for_unknown_ids"] == 1 and rep["ids_without_row"] == 1
    assert m["features"]["item"]["genre"] == {"kind": "list", "cardinality": 3, "missing": 1}
    users = pq.read_table(tmp_path / "o" / layout.USERS).to_pydict()
    assert users["country"] == [0, 1]


def test_overwrite_replaces_atomically(tmp_path: Path) -> None:
    src = write_parquet(tmp_path / "in.parquet", user_id=[1], item_id=[1], timestamp=[1])
    prepare(PrepareConfig(min_eval_users=0, input=[str(src)], out=str(tmp_path / "o")))
    assert run_cli("--input", str(src), "--format", "parquet", "--out", str(tmp_path / "o")) == 2
    prepare(
        PrepareConfig(min_eval_users=0, input=[str(src)], out=str(tmp_path / "o"), overwrite=True)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "o"]


# --- bad input: one line naming file and column, exit code 2, nothing written ---


def bad_input_case(name: str, tmp: Path) -> tuple[list[str], list[str]]:
    """Returns (CLI args, substrings the error must contain)."""
    good = dict(user_id=[1, 2], item_id=[1, 2], timestamp=[1, 2])
    if name == "missing_column":
        p = write_parquet(tmp / "x.parquet", user_id=[1], item_id=[1])
        return ["--input", str(p), "--format", "parquet"], [str(p), "'timestamp'", "missing"]
    if name == "misnamed_column_csv":
        p = tmp / "x.csv"
        p.write_text("userid,item_id,timestamp\n1,1,1\n")
        return ["--input", str(p), "--format", "csv"], [str(p), "'user_id'", "'userid'"]
    if name == "wrong_type_id":
        p = write_parquet(tmp / "x.parquet", **{**good, "user_id": [1.5, 2.0]})
        return ["--input", str(p), "--format", "parquet"], [
            str(p),
            "'user_id'",
            "double",
            "expected integer or string",
        ]
    if name == "wrong_type_timestamp":
        p = write_parquet(tmp / "x.parquet", **{**good, "timestamp": [True, False]})
        return ["--input", str(p), "--format", "parquet"], [str(p), "'timestamp'", "bool"]
    if name == "null_id":
        p = write_parquet(tmp / "x.parquet", **{**good, "item_id": [1, None]})
        return ["--input", str(p), "--format", "parquet"], [str(p), "'item_id'", "row 2", "null"]
    if name == "null_timestamp":
        p = write_parquet(tmp / "x.parquet", **{**good, "timestamp": [None, 2]})
        return ["--input", str(p), "--format", "parquet"], [str(p), "'timestamp'", "row 1", "null"]
    if name == "unparsable_csv_value":
        p = tmp / "x.csv"
        p.write_text("user_id,item_id,timestamp\n1,1,10\n1,2,11\n2,1,soon\n")
        return ["--input", str(p), "--format", "csv"], [str(p), "'timestamp'", "row 3", "'soon'"]
    if name == "fractional_timestamp":
        p = write_parquet(tmp / "x.parquet", **{**good, "timestamp": [1.0, 2.5]})
        return ["--input", str(p), "--format", "parquet"], [str(p), "'timestamp'", "row 2", "2.5"]
    if name == "empty_file":
        p = tmp / "x.csv"
        p.write_text("")
        return ["--input", str(p), "--format", "csv"], [str(p), "empty"]
    if name == "no_rows":
        p = write_parquet(
            tmp / "x.parquet",
            user_id=pa.array([], pa.int64()),
            item_id=pa.array([], pa.int64()),
            timestamp=pa.array([], pa.int64()),
        )
        return ["--input", str(p), "--format", "parquet"], [str(p), "no interactions"]
    if name == "empty_directory":
        d = tmp / "empty"
        d.mkdir()
        return ["--input", str(d), "--format", "parquet"], [str(d), "no parquet files"]
    if name == "truncated_parquet":
        p = write_parquet(tmp / "x.parquet", **good)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return ["--input", str(p), "--format", "parquet"], [str(p), "cannot read Parquet"]
    if name == "not_parquet":
        p = tmp / "x.parquet"
        p.write_text("user_id,item_id\n1,2\n")
        return ["--input", str(p), "--format", "parquet"], [str(p), "cannot read Parquet"]
    if name == "missing_file":
        return ["--input", str(tmp / "nope.parquet"), "--format", "parquet"], [
            "nope.parquet",
            "no such file",
        ]
    if name == "bad_movielens":
        p = tmp / "ratings.dat"
        p.write_text("1::10::5::100\n1::x::3::90\n")
        return ["--input", str(p), "--format", "movielens"], [str(p), "MovieLens"]
    if name == "sasrec_non_integer_id":
        p = tmp / "seq.txt"
        p.write_text("1 10\n1 11\n1 abc\n")
        return ["--input", str(p), "--format", "sasrec-txt"], [
            str(p),
            "'item_id'",
            "line 3",
            "'abc'",
            "not an integer",
        ]
    if name == "no_evaluation_users":
        p = write_parquet(tmp / "x.parquet", **good)
        return ["--input", str(p), "--format", "parquet", "--min-eval-users", "1"], [
            str(p),
            "only 0 user(s) have a validation example",
            "leave-one-out",
            "2 of 2 users have fewer",
        ]
    if name == "bad_recbole_header":
        p = tmp / "x.inter"
        p.write_text("user_id\titem_id:token\n1\t2\n")
        return ["--input", str(p), "--format", "recbole"], [str(p), "header", "user_id"]
    if name == "duplicate_feature_ids":
        p = write_parquet(tmp / "x.parquet", **good)
        f = write_parquet(tmp / "f.parquet", item_id=[1, 1], genre=["a", "b"])
        return ["--input", str(p), "--format", "parquet", "--item-features", str(f)], [
            str(f),
            "'item_id'",
            "duplicate",
        ]
    if name == "feature_id_type_mismatch":
        p = write_parquet(tmp / "x.parquet", **good)
        f = write_parquet(tmp / "f.parquet", item_id=["a", "b"], genre=["a", "b"])
        return ["--input", str(p), "--format", "parquet", "--item-features", str(f)], [
            str(f),
            "'item_id'",
            "match",
        ]
    raise AssertionError(name)


BAD_CASES = [
    "missing_column",
    "misnamed_column_csv",
    "wrong_type_id",
    "wrong_type_timestamp",
    "null_id",
    "null_timestamp",
    "unparsable_csv_value",
    "fractional_timestamp",
    "empty_file",
    "no_rows",
    "empty_directory",
    "truncated_parquet",
    "not_parquet",
    "missing_file",
    "bad_movielens",
    "bad_recbole_header",
    "sasrec_non_integer_id",
    "no_evaluation_users",
    "duplicate_feature_ids",
    "feature_id_type_mismatch",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_refused_with_a_named_error(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args, expected = bad_input_case(case, tmp_path)
    out = tmp_path / "out"
    before = set(tmp_path.iterdir())
    assert run_cli(*args, "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for part in expected:
        assert part.lower() in err.lower(), f"{part!r} not in {err!r}"
    assert not out.exists()
    assert set(tmp_path.iterdir()) == before  # no temp dirs either


def test_bad_input_exit_code_from_the_real_command(tmp_path: Path) -> None:
    p = write_parquet(tmp_path / "x.parquet", user_id=[1], item_id=[1])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "recforge.cli",
            "data",
            "prepare",
            "--input",
            str(p),
            "--format",
            "parquet",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "x.parquet" in proc.stderr and "'timestamp'" in proc.stderr
    assert not (tmp_path / "o").exists()
