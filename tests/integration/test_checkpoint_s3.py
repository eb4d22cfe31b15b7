"""Checkpoints on object storage: ``checkpoint.dirpath`` and ``--ckpt_path`` as ``s3://`` URIs,
against a real S3-API server (moto, its own process): the real 2-process fit, resume and export
CLI, the commit-file rule, and the one-line exit 2 for a bucket that does not exist."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recforge.data import storage
from recforge.trainer import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
RECFORGE = str(Path(sys.executable).with_name("recforge"))
TINY = str(REPO / "configs" / "sasrec" / "tiny.yaml")


def recforge(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RECFORGE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def fit_args(root: Path, data: Path, dirpath: str, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        TINY,
        "--data.data_dir",
        str(data),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.save_dir",
        str(root),
        "--trainer.devices",
        "2",
        "--checkpoint.dirpath",
        dirpath,
        "--mlflow.enabled",
        "false",
        *extra,
    ]


def names(uri: str) -> list[str]:
    return storage.list_names(uri)


def test_fit_resume_and_export_with_checkpoints_on_s3(
    s3_server, s3_bucket: str, tmp_path: Path
) -> None:
    data, root = tmp_path / "data", tmp_path / "run"
    dirpath = f"{s3_bucket}/sasrec/checkpoints"
    last = f"{dirpath}/last.ckpt"

    proc = recforge(
        *fit_args(root, data, dirpath, "--trainer.max_epochs", "1"),
        cwd=tmp_path,
        env=s3_server.env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert set(names(dirpath)) == {"last.ckpt", "best-epoch=0.ckpt"}
    for checkpoint in ("last.ckpt", "best-epoch=0.ckpt"):
        uri = f"{dirpath}/{checkpoint}"
        generations = [n for n in names(uri) if n.startswith(ckpt.SHARDS_PREFIX)]
        assert len(generations) == 1, names(uri)
        assert {ckpt.TRAINER_STATE, ckpt.PLAN_TEXT} <= set(names(uri))
        shards = names(f"{uri}/{generations[0]}")
        assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(shards), shards
    run = root / "sasrec-tiny" / "version_0"
    assert not (run / "checkpoints").exists()
    # test_after_fit read the best checkpoint back from s3.
    assert f"loaded sharded checkpoint {dirpath}/best-epoch=0.ckpt" in proc.stderr
    assert (run / "test_metrics.json").is_file()
    first = ckpt.read_trainer_state(last)
    assert first["epoch"] == 0 and first["recforge"]["world_size"] == 2

    # Resume from the URI with one more epoch; last.ckpt is overwritten in place.
    proc = recforge(
        *fit_args(
            root,
            data,
            dirpath,
            "--trainer.max_epochs",
            "2",
            "--ckpt_path",
            last,
            # The first fit already tested its best checkpoint, read back from s3.
            "--test_after_fit",
            "false",
        ),
        cwd=tmp_path,
        env=s3_server.env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"loaded sharded checkpoint {last}" in proc.stderr
    resumed = ckpt.read_trainer_state(last)
    assert resumed["epoch"] == 1 and resumed["global_step"] > first["global_step"]
    # The new generation is committed and the one it replaced is gone.
    generations = [n for n in names(last) if n.startswith(ckpt.SHARDS_PREFIX)]
    assert generations == [resumed["recforge"]["shards"]]
    assert generations != [first["recforge"]["shards"]]

    out = tmp_path / "artifact"
    proc = recforge(
        "export", "--checkpoint", last, "--out", str(out), cwd=tmp_path, env=s3_server.env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "model.onnx").is_file() and (out / "manifest.json").is_file()


def test_missing_bucket_stops_fit_before_training_with_one_line(s3_server, tmp_path: Path) -> None:
    dirpath = "s3://recforge-no-such-bucket/run/checkpoints"
    proc = recforge(
        *fit_args(tmp_path / "run", tmp_path / "data", dirpath, "--trainer.max_epochs", "1"),
        cwd=tmp_path,
        env=s3_server.env,
    )
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    # Every rank fails alike and says so; their writes to the shared stderr may interleave.
    assert (
        f"recforge fit: error: checkpoint directory {dirpath}: "
        "bucket 'recforge-no-such-bucket' does not exist"
    ) in proc.stderr, proc.stderr[-2000:]
    assert not any("train/loss" in p.read_text() for p in (tmp_path / "run").rglob("*.csv"))


def test_commit_file_rule_overwrite_and_remove(s3_bucket: str) -> None:
    """Single process, no training: what a reader sees at each step of the protocol."""
    uri = f"{s3_bucket}/unit/last.ckpt"
    plan = {"t": {"sharding_type": "row_wise", "ranks": [0]}}

    def write(value: float) -> None:
        ckpt.save(
            uri,
            {"state_dict": {}, "epoch": int(value)},
            {"model": {"w": torch.full((4,), value)}},
            plan,
            "plan",
            1,
        )

    def weights() -> torch.Tensor:
        state = ckpt.read_trainer_state(uri)
        skeleton = {"model": {"w": torch.zeros(4)}}
        ckpt.load_sharded(uri, skeleton, state)
        return skeleton["model"]["w"]

    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint {uri} does not exist"):
        ckpt.read_trainer_state(uri)
    write(1.0)
    assert torch.equal(weights(), torch.full((4,), 1.0))
    write(2.0)
    assert torch.equal(weights(), torch.full((4,), 2.0))
    assert len([n for n in names(uri) if n.startswith(ckpt.SHARDS_PREFIX)]) == 1

    # Shards without their commit file (a save cut short, or a removal half done).
    storage.delete_file(f"{uri}/{ckpt.TRAINER_STATE}")
    with pytest.raises(ckpt.CheckpointError, match="incomplete: trainer_state.pt is missing"):
        ckpt.read_trainer_state(uri)
    write(3.0)
    assert torch.equal(weights(), torch.full((4,), 3.0))
    ckpt.remove(uri)
    assert names(uri) == []


def test_last_lookup_on_s3_is_refused_clearly() -> None:
    from recforge.trainer.callbacks import ModelCheckpoint

    callback = ModelCheckpoint(dirpath="s3://bucket/run/checkpoints")
    with pytest.raises(ckpt.CheckpointError, match="--ckpt_path s3://bucket/run/checkpoints/last"):
        callback._find_last_checkpoints(None)  # type: ignore[arg-type]


def test_checkpoint_in_a_missing_bucket_is_a_checkpoint_error(s3_bucket: str) -> None:
    with pytest.raises(ckpt.CheckpointError, match="bucket 'recforge-absent' does not exist"):
        ckpt.read_trainer_state("s3://recforge-absent/x/last.ckpt")
