"""`data prepare`, `data validate` and the loader on s3:// against a real S3-API server (moto's
standalone server in its own process; see tests/s3_server.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from recforge.data import storage
from recforge.data.datamodule import SequenceDataModule
from recforge.data.prepare import PrepareConfig, prepare
from recforge.data.synth import SynthConfig, generate
from recforge.data.validate import validate


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("raw") / "raw"
    generate(SynthConfig(out=str(out), users=300, items=120, mean_length=12, seed=3))
    return out


def upload(local: Path, uri: str) -> None:
    fs, path = storage.filesystem(uri)
    pafs.copy_files(
        str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recforge", "data", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_prepare_from_and_to_s3_equals_the_local_prepare(
    raw: Path, s3_bucket: str, tmp_path: Path
) -> None:
    upload(raw / "interactions.parquet", f"{s3_bucket}/logs/day1/interactions.parquet")
    upload(raw / "item_features.parquet", f"{s3_bucket}/logs/items.parquet")
    local = tmp_path / "local"
    common = dict(format="parquet", min_user=2)
    prepare(
        PrepareConfig(
            input=[str(raw / "interactions.parquet")],
            out=str(local),
            item_features=str(raw / "item_features.parquet"),
            **common,
        )
    )
    remote = f"{s3_bucket}/prepared/v1"
    spill = tmp_path / "spill"
    manifest = prepare(
        PrepareConfig(
            input=[f"{s3_bucket}/logs/day1"],  # a prefix, as a directory would be
            out=remote,
            item_features=f"{s3_bucket}/logs/items.parquet",
            spill_dir=str(spill),
            **common,
        )
    )
    assert list(spill.iterdir()) == []  # staging removed
    assert [f["path"] for f in manifest["source"]["files"]] == [
        f"{s3_bucket}/logs/day1/interactions.parquet"
    ]
    assert manifest["feature_files"]["item"]["path"] == f"{s3_bucket}/logs/items.parquet"
    for name in ("sequences.parquet", "items.parquet", "users.parquet"):
        assert storage.read_table(storage.join(remote, name)).equals(pq.read_table(local / name))
    report = validate(remote)
    assert report.ok, report.lines(10)

    # The loader streams the same batches from s3 as from disk.
    batches = []
    for data_dir in (str(local), remote):
        dm = SequenceDataModule(data_dir=data_dir, batch_format="sequence", batch_size=16)
        batch = next(iter(dm.train_dataloader()))
        batches.append({k: v.numpy() for k, v in batch.items()})
    for key in batches[0]:
        np.testing.assert_array_equal(batches[0][key], batches[1][key])

    # Tomorrow's prepare keeps today's indices, reading today's vocabularies from s3.
    again = prepare(
        PrepareConfig(
            input=[f"{s3_bucket}/logs/day1"],
            out=str(tmp_path / "day2"),
            vocab_from=remote,
            **common,
        )
    )
    assert again["vocab_from"]["path"] == remote
    assert again["vocab_from"]["users_new"] == 0 and again["vocab_from"]["items_new"] == 0
    assert pq.read_table(
        tmp_path / "day2" / "items.parquet", columns=["item_idx", "item_id"]
    ).equals(pq.read_table(local / "items.parquet", columns=["item_idx", "item_id"]))

    # An existing output is kept unless --overwrite is given.
    again = cli("prepare", "--format", "parquet", "--input", str(raw), "--out", remote)
    assert again.returncode == 2
    assert "output exists (pass --overwrite" in again.stderr


def test_unreachable_storage_is_one_line_exit_2_and_nothing_written(
    raw: Path, s3_bucket: str, s3_server, tmp_path: Path
) -> None:
    spill = tmp_path / "spill"
    missing = cli(
        "prepare",
        "--format",
        "parquet",
        "--input",
        str(raw / "interactions.parquet"),
        "--out",
        "s3://no-such-bucket/prepared",
        "--spill-dir",
        str(spill),
    )
    assert missing.returncode == 2
    lines = [line for line in missing.stderr.splitlines() if "error" in line]
    assert lines == [
        "recforge data prepare: error: s3://no-such-bucket/prepared: "
        "bucket 'no-such-bucket' does not exist"
    ]
    assert not spill.exists() or list(spill.iterdir()) == []

    unreachable = cli(
        "prepare",
        "--format",
        "parquet",
        "--input",
        f"{s3_bucket}/nothing.parquet",
        "--out",
        str(tmp_path / "out"),
        env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
    )
    assert unreachable.returncode == 2
    assert f"{s3_bucket}/nothing.parquet: cannot reach the S3 endpoint" in unreachable.stderr
    assert not (tmp_path / "out").exists()

    bad = cli("validate", "s3://no-such-bucket/prepared")
    assert bad.returncode == 2
    assert "bucket 'no-such-bucket' does not exist" in bad.stderr
