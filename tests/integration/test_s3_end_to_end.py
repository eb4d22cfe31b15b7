"""The whole path on object storage, against a real S3-API server (moto's standalone server in
its own process): prepare from s3 -> fit on 2 processes streaming from s3, checkpointing to s3
and logging MLflow artifacts to s3 -> SIGKILL -> resume from s3 -> test and export reading the
s3 checkpoint; the metrics equal an uninterrupted local run's."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from recforge.data import storage
from recforge.data.synth import SynthConfig, generate

REPO = Path(__file__).resolve().parents[2]
RECFORGE = str(Path(sys.executable).with_name("recforge"))
TINY = str(REPO / "configs" / "sasrec" / "tiny.yaml")
KEYS = ("ndcg@10_filtered", "hr@10", "mrr", "ndcg@100", "coverage@10")


def recforge(*args: str, cwd: Path, env: dict[str, str], timeout: int = 400) -> str:
    proc = subprocess.run(
        [RECFORGE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def fit_args(root: Path, data: str, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        TINY,
        "--data.data_dir",
        data,
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.save_dir",
        str(root),
        "--trainer.devices",
        "2",
        "--trainer.max_epochs",
        "4",
        *extra,
    ]


def test_metrics(root: Path, data: str, ckpt: str, cwd: Path, env: dict[str, str]) -> dict:
    recforge(
        "test",
        "--config",
        TINY,
        "--data.data_dir",
        data,
        "--ckpt_path",
        ckpt,
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.save_dir",
        str(root),
        "--mlflow.enabled",
        "false",
        cwd=cwd,
        env=env,
    )
    path = root / "sasrec-tiny" / "version_0" / "test_metrics.json"
    return json.loads(path.read_text())["metrics"]


test_metrics.__test__ = False  # a helper, not a test


def remote_epoch(uri: str) -> int:
    """The epoch of the committed checkpoint at ``uri``; -1 while there is none."""
    try:
        state = torch.load(
            io.BytesIO(storage.read_bytes(storage.join(uri, "trainer_state.pt"))),
            weights_only=False,
        )
    except (FileNotFoundError, storage.StorageError, EOFError, RuntimeError):
        return -1
    return int(state["epoch"])


@pytest.mark.timeout(1500)
def test_prepare_fit_kill_resume_test_export_on_s3_match_local(
    s3_bucket: str, s3_server, tmp_path: Path
) -> None:
    env = {**os.environ, **s3_server.env}
    raw = tmp_path / "raw"
    generate(SynthConfig(out=str(raw), users=1500, items=300, mean_length=20, seed=1))
    fs, root = storage.filesystem(s3_bucket)
    pafs.copy_files(
        str(raw / "interactions.parquet"),
        f"{root}/logs/interactions.parquet",
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=fs,
    )
    local_data, remote_data = tmp_path / "data", f"{s3_bucket}/prepared"
    for source, out in (
        (str(raw / "interactions.parquet"), str(local_data)),
        (f"{s3_bucket}/logs/interactions.parquet", remote_data),
    ):
        recforge(
            "data",
            "prepare",
            "--format",
            "parquet",
            "--input",
            source,
            "--out",
            out,
            cwd=tmp_path,
            env=env,
        )

    # The uninterrupted local reference.
    recforge(
        *fit_args(tmp_path / "ref", str(local_data), "--mlflow.enabled", "false"),
        cwd=tmp_path,
        env=env,
    )
    local_last = tmp_path / "ref" / "sasrec-tiny" / "version_0" / "checkpoints" / "last.ckpt"
    reference = test_metrics(tmp_path / "ref_test", str(local_data), str(local_last), tmp_path, env)

    # The same run on s3, killed (every rank, SIGKILL) once epoch 1 is checkpointed.
    ckpts = f"{s3_bucket}/runs/ckpt"
    remote = [
        "--checkpoint.dirpath",
        ckpts,
        "--mlflow.tracking_uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--mlflow.artifact_location",
        f"{s3_bucket}/mlflow",
        "--mlflow.system_metrics",
        "false",
    ]
    proc = subprocess.Popen(
        [RECFORGE, *fit_args(tmp_path / "killed", remote_data, *remote)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    last = f"{ckpts}/last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and remote_epoch(last) < 1:
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read().decode()[-4000:] if proc.stderr else ""
    assert remote_epoch(last) >= 1, "no epoch-1 checkpoint on s3 in time"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = remote_epoch(last)
    assert 1 <= killed_at < 3, f"killed after epoch {killed_at}: too late to test resuming"

    recforge(
        *fit_args(tmp_path / "killed", remote_data, *remote, "--ckpt_path", last),
        cwd=tmp_path,
        env=env,
    )
    assert remote_epoch(last) == 3
    resumed = test_metrics(tmp_path / "resumed_test", remote_data, last, tmp_path, env)
    for key in KEYS:
        assert resumed[key] == pytest.approx(reference[key], abs=1e-5), key

    # MLflow wrote the runs' artifacts to the bucket.
    listing = fs.get_file_info(pafs.FileSelector(f"{root}/mlflow", recursive=True))
    names = [info.path for info in listing if info.type == pafs.FileType.File]
    assert any(name.endswith("config.yaml") or "eval" in name for name in names), names

    # Export reads the s3 checkpoint and its s3 data; the artifact serves the same model.
    artifact = tmp_path / "artifact"
    recforge("export", "--checkpoint", last, "--out", str(artifact), cwd=tmp_path, env=env)
    manifest = (artifact / "manifest.json").read_text()
    assert json.dumps(remote_data) in manifest and json.dumps(last) in manifest
