"""The real CLI on the shared MovieLens files (docs/architecture.md §3 real-data checks)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from recforge.data import layout

RECFORGE = shutil.which("recforge", path=os.path.dirname(sys.executable)) or "recforge"


def prepare(*args: str) -> dict:
    proc = subprocess.run(
        [RECFORGE, "data", "prepare", *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    out = Path(args[args.index("--out") + 1])
    return json.loads((out / layout.MANIFEST).read_text())


def test_sasrec_ml1m_counts(shared_data: Path, tmp_path: Path) -> None:
    m = prepare(
        "--input",
        str(shared_data / "ml-1m.txt"),
        "--format",
        "sasrec-txt",
        "--out",
        str(tmp_path / "ml1m"),
    )
    assert (m["users"], m["items"], m["interactions"]) == (6040, 3416, 999_611)
    assert m["rows_removed"] == {"exact_duplicates": 0, "min_user": 0, "min_item": 0}
    assert m["split_counts"]["users_with_test"] == 6040
    seqs = pq.read_table(tmp_path / "ml1m" / layout.SEQUENCES)
    assert seqs.num_rows == 6040 and sum(seqs["length"].to_pylist()) == 999_611
    # Integer ids 1..3416 map to themselves: idx order follows sorted ids.
    items = pq.read_table(tmp_path / "ml1m" / layout.ITEMS)
    assert items["item_id"].to_pylist() == list(range(1, 3417))
    # User 1's sequence is the file's first lines, in file order.
    lines = [line.split() for line in (shared_data / "ml-1m.txt").read_text().splitlines()[:5]]
    assert seqs["item_idx"][0].as_py()[:5] == [int(i) for _, i in lines]


def test_recbole_ml100k_with_features(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ml100k"
    m = prepare(
        "--input",
        str(shared_data / "ml-100k"),
        "--format",
        "recbole",
        "--rating-col",
        "rating",
        "--out",
        str(out),
    )
    assert (m["users"], m["items"], m["interactions"]) == (943, 1682, 100_000)
    assert m["features"]["item"]["class"]["kind"] == "list"
    assert (
        m["features"]["item"]["class"]["cardinality"] == 20
    )  # 19 genres (incl. unknown) + missing
    assert {"age", "gender", "occupation", "zip_code"} <= set(m["features"]["user"])
    assert (
        m["feature_files"]["item"]["ids_without_row"] == 0
        and m["feature_files"]["user"]["ids_without_row"] == 0
    )
    vocabs = json.loads((out / layout.FEATURE_VOCABS).read_text())
    items = pq.read_table(out / layout.ITEMS).to_pydict()
    toy_story = items["item_id"].index(1)
    assert [vocabs["item"]["class"][c - 1] for c in items["class"][toy_story]] == [
        "Animation",
        "Children's",
        "Comedy",
    ]
    users = pq.read_table(out / layout.USERS).to_pydict()
    u1 = users["user_id"].index(1)  # 1  24  M  technician  85711
    assert vocabs["user"]["occupation"][users["occupation"][u1] - 1] == "technician"
    assert vocabs["user"]["gender"][users["gender"][u1] - 1] == "M"


def test_recbole_ml1m_string_ids_with_features(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ml1m-f"
    m = prepare(
        "--input",
        str(shared_data / "ml-1m-features" / "ml-1m.inter"),
        "--format",
        "recbole",
        "--list-columns",
        "genre",
        "--categorical-columns",
        "age,occupation",
        "--min-user",
        "5",
        "--min-item",
        "5",
        "--out",
        str(out),
    )
    assert m["input_rows"] == 1_000_209
    assert m["users"] == 6040 and m["items"] == 3416  # the 5-core is the SASRec file's item set
    assert m["interactions"] + sum(m["rows_removed"].values()) == m["input_rows"]
    assert m["features"]["item"]["genre"] == {"kind": "list", "cardinality": 19, "missing": 0}
    users = pq.read_table(out / layout.USERS).to_pydict()
    assert users["user_id"][0].startswith("1m_")
    seqs = pq.read_table(out / layout.SEQUENCES)
    ts = seqs["timestamp"].to_pylist()
    assert all(np.all(np.diff(t) >= 0) for t in ts[:200])
