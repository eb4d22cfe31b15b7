"""`recforge data prepare --vocab-from PREV`: PREV's indices kept, unknown ids appended sorted,
in both engines; and a corrupt row group in a multi-file input named in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_prepare_engines import _write_inputs, assert_engines_agree, interaction_tables

from recforge.data import layout
from recforge.data.errors import DataError
from recforge.data.prepare import PrepareConfig, prepare
from recforge.data.readers import Columns
from recforge.data.validate import validate


def write(path: Path, **columns) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def vocab(out: Path, name: str) -> dict[str, list]:
    return pq.read_table(out / name).to_pydict()


def sequences(out: Path) -> dict[int, list[int]]:
    t = pq.read_table(out / layout.SEQUENCES)
    return dict(zip(t["user_idx"].to_pylist(), t["item_idx"].to_pylist()))


@pytest.fixture
def prev(tmp_path: Path) -> Path:
    src = write(
        tmp_path / "day1.parquet",
        user_id=["bob", "amy", "cat", "amy"],
        item_id=[50, 30, 90, 50],
        timestamp=[1, 2, 3, 4],
    )
    prepare(PrepareConfig(min_eval_users=0, input=[src], out=str(tmp_path / "prev")))
    return tmp_path / "prev"


def test_known_ids_keep_their_index_and_new_ids_are_appended_sorted(
    tmp_path: Path, prev: Path
) -> None:
    before_users = vocab(prev, layout.USERS)
    before_items = vocab(prev, layout.ITEMS)
    assert before_users["user_id"] == ["amy", "bob", "cat"]
    assert before_items["item_id"] == [30, 50, 90]
    src = write(
        tmp_path / "day2.parquet",
        user_id=["eve", "amy", "dan", "amy", "eve"],
        item_id=[70, 50, 10, 10, 50],
        timestamp=[1, 2, 3, 4, 5],
    )
    manifest = assert_engines_agree(tmp_path, input=[src], vocab_from=str(prev))
    for out in (tmp_path / "memory", tmp_path / "duckdb"):
        users, items = vocab(out, layout.USERS), vocab(out, layout.ITEMS)
        # PREV's ids at PREV's indices, then the new ones in sorted order.
        assert users["user_id"] == ["amy", "bob", "cat", "dan", "eve"]
        assert users["user_idx"] == [1, 2, 3, 4, 5]
        assert items["item_id"] == [30, 50, 90, 10, 70]
        # Ids the new data lacks stay, with count 0; such users have no sequence.
        assert items["count"] == [0, 2, 0, 2, 1]
        assert users["count"] == [2, 0, 0, 1, 2]
        assert sequences(out) == {1: [2, 4], 4: [4], 5: [5, 2]}
        assert validate(out).ok
    assert manifest["users"] == 5 and manifest["items"] == 5
    entry = manifest["vocab_from"]
    assert entry["path"] == str(prev) and len(entry["fingerprint"]) == 64
    assert {k: v for k, v in entry.items() if k not in ("path", "fingerprint")} == {
        "users_known": 3,
        "users_new": 2,
        "users_absent": 2,
        "items_known": 3,
        "items_new": 2,
        "items_absent": 2,
    }
    assert manifest["split_counts"]["users_without_eval"] == 3  # users with a sequence only


def test_chained_vocab_from_and_features_for_carried_ids(tmp_path: Path, prev: Path) -> None:
    # Day 2 from day 1, day 3 from day 2: PREV's own vocabulary is no longer in sorted order.
    day2 = write(tmp_path / "day2.parquet", user_id=["abe"], item_id=[10], timestamp=[1])
    prepare(
        PrepareConfig(
            min_eval_users=0, input=[day2], out=str(tmp_path / "day2"), vocab_from=str(prev)
        )
    )
    day3 = write(
        tmp_path / "day3.parquet", user_id=["aaa", "bob"], item_id=[5, 90], timestamp=[1, 2]
    )
    feats = write(tmp_path / "feats.parquet", item_id=[90, 5, 30], genre=["x", "y", "x"])
    manifest = assert_engines_agree(
        tmp_path, input=[day3], vocab_from=str(tmp_path / "day2"), item_features=feats
    )
    items = vocab(tmp_path / "duckdb", layout.ITEMS)
    assert items["item_id"] == [30, 50, 90, 10, 5]
    # Genre codes: x = 1, y = 2; ids without a feature row get 0 (missing), as today.
    assert items["genre"] == [1, 0, 1, 0, 2]
    assert vocab(tmp_path / "duckdb", layout.USERS)["user_id"] == [
        "amy",
        "bob",
        "cat",
        "abe",
        "aaa",
    ]
    assert manifest["vocab_from"]["items_known"] == 4 and manifest["vocab_from"]["items_new"] == 1


def test_string_vocabulary_meets_integer_looking_ids(tmp_path: Path) -> None:
    first = write(tmp_path / "a.parquet", user_id=["u1", "7"], item_id=[1, 2], timestamp=[1, 2])
    prepare(PrepareConfig(min_eval_users=0, input=[first], out=str(tmp_path / "prev")))
    # All of today's user ids look like integers, so the readers make them integers.
    today = write(tmp_path / "b.parquet", user_id=["7", "10"], item_id=[2, 3], timestamp=[1, 2])
    assert_engines_agree(tmp_path, input=[today], vocab_from=str(tmp_path / "prev"))
    users = vocab(tmp_path / "duckdb", layout.USERS)["user_id"]
    assert users == ["7", "u1", "10"]


def test_mismatched_id_type_is_a_named_error(tmp_path: Path, prev: Path) -> None:
    src = write(tmp_path / "day2.parquet", user_id=["amy"], item_id=["sku-1"], timestamp=[1])
    for engine in ("memory", "duckdb"):
        with pytest.raises(DataError) as info:
            prepare(
                PrepareConfig(
                    min_eval_users=0,
                    input=[src],
                    out=str(tmp_path / engine),
                    engine=engine,
                    vocab_from=str(prev),
                )
            )
        message = str(info.value)
        assert str(prev / layout.ITEMS) in message and "'item_id'" in message
        assert "integer" in message and "'sku-1'" in message
        assert not (tmp_path / engine).exists()


def test_not_a_prepared_directory(tmp_path: Path) -> None:
    src = write(tmp_path / "in.parquet", user_id=[1], item_id=[1], timestamp=[1])
    with pytest.raises(DataError, match="not a prepared directory"):
        prepare(
            PrepareConfig(
                min_eval_users=0, input=[src], out=str(tmp_path / "o"), vocab_from=str(tmp_path)
            )
        )


def test_cli_flag(tmp_path: Path, prev: Path) -> None:
    src = write(tmp_path / "day2.parquet", user_id=["zed"], item_id=[30], timestamp=[1])
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "recforge", "data", "prepare", "--input", src]
        + ["--format", "parquet", "--out", str(out), "--vocab-from", str(prev)]
        + ["--min-eval-users", "0"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert vocab(out, layout.USERS)["user_id"] == ["amy", "bob", "cat", "zed"]
    assert sequences(out) == {4: [1]}
    assert json.loads((out / layout.MANIFEST).read_text())["vocab_from"]["users_new"] == 1


@settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    before=interaction_tables(),
    after=interaction_tables(),
    fmt=st.sampled_from(["parquet", "csv"]),
    min_user=st.integers(1, 3),
    split=st.sampled_from(["leave-one-out", "time"]),
    row_group_size=st.sampled_from([1, 4096]),
)
def test_engines_agree_with_vocab_from(
    tmp_path_factory: pytest.TempPathFactory,
    before: dict,
    after: dict,
    fmt: str,
    min_user: int,
    split: str,
    row_group_size: int,
) -> None:
    tmp = tmp_path_factory.mktemp("vocab_from")
    (tmp / "prev_in").mkdir()
    (tmp / "new_in").mkdir()
    # Rating columns need not agree between the days; only the ids matter to the vocabulary.
    before = {k: v for k, v in before.items() if k != "rating"}
    prev_inputs = _write_inputs(tmp / "prev_in", before, "parquet", 1)
    try:
        prepare(
            PrepareConfig(
                min_eval_users=0, input=prev_inputs, out=str(tmp / "prev"), engine="memory"
            )
        )
    except DataError:
        event("PREV refused")
        return  # PREV itself cannot be prepared (ids read as mixed types)
    manifest = assert_engines_agree(
        tmp,
        input=_write_inputs(tmp / "new_in", after, fmt, 2),
        format=fmt,
        columns=Columns(rating="rating" if "rating" in after else None),
        min_user=min_user,
        split=split,
        row_group_size=row_group_size,
        vocab_from=str(tmp / "prev"),
    )
    event("refused by both engines" if manifest is None else "prepared by both engines")
    if manifest is None:
        return
    prev_users = vocab(tmp / "prev", layout.USERS)["user_id"]
    users = vocab(tmp / "duckdb", layout.USERS)["user_id"]
    if not any(isinstance(u, str) for u in users) or all(isinstance(u, str) for u in prev_users):
        assert users[: len(prev_users)] == prev_users
    entry = manifest["vocab_from"]
    assert entry["users_known"] + entry["users_new"] == manifest["users"]
    assert entry["items_known"] + entry["items_new"] == manifest["items"]


# --- a corrupt row group in the middle of a multi-file input ---


def corrupt_row_group(path: Path, group: int) -> None:
    """Overwrite the data pages of ``group``'s first column chunk; the footer stays valid."""
    chunk = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    end = start + chunk.total_compressed_size
    data = bytearray(path.read_bytes())
    data[chunk.data_page_offset : end] = b"\xff" * (end - chunk.data_page_offset)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("engine", ["duckdb", "memory"])
def test_corrupt_row_group_is_named_in_one_line(tmp_path: Path, engine: str) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for k in range(3):
        n = 40
        pq.write_table(
            pa.table(
                {
                    "user_id": [(i + k) % 7 for i in range(n)],
                    "item_id": [(3 * i + k) % 11 for i in range(n)],
                    "timestamp": list(range(n)),
                }
            ),
            inputs / f"part{k}.parquet",
            row_group_size=10,
        )
    corrupt_row_group(inputs / "part1.parquet", 2)
    assert pq.ParquetFile(inputs / "part1.parquet").metadata.num_row_groups == 4  # still opens
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "recforge", "data", "prepare", "--input", str(inputs)]
        + ["--format", "parquet", "--out", str(out), "--engine", engine],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(inputs / "part1.parquet") in lines[0]
    assert "row group 2 (of 4, counted from 0) cannot be read (" in lines[0]
    assert lines[0].isprintable()
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no spill folder left


def test_validate_allows_gaps_only_for_carried_over_ids(tmp_path: Path, prev: Path) -> None:
    src = write(tmp_path / "day2.parquet", user_id=["zed"], item_id=[10], timestamp=[1])
    out = tmp_path / "out"
    prepare(PrepareConfig(min_eval_users=0, input=[src], out=str(out), vocab_from=str(prev)))
    assert validate(out).ok
    manifest = json.loads((out / layout.MANIFEST).read_text())
    manifest["vocab_from"]["users_known"] = 1
    manifest["vocab_from"]["items_known"] = 0
    (out / layout.MANIFEST).write_text(json.dumps(manifest))
    problems = "\n".join(validate(out).lines())
    assert "users.parquet, column 'user_idx', row 2: user never occurs" in problems
    assert "items.parquet, column 'item_idx', row 1: item never occurs" in problems
    assert "items.parquet, column 'item_id', row 4: 10 sorts before" in problems
    del manifest["vocab_from"]
    (out / layout.MANIFEST).write_text(json.dumps(manifest))
    assert "1..U without gaps" in "\n".join(validate(out).lines())
