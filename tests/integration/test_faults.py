"""Faults during 2-process training on the tiny SASRec config: a rank killed (either one)
ends the other promptly with a line naming it; torchrun restarts resume from the run's last
checkpoint and end with the uninterrupted run's test metrics; a checkpoint that cannot be
written (file size limit) leaves the previous one intact, no partial directory, and one line."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
RECFORGE = str(Path(sys.executable).with_name("recforge"))
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TINY = str(REPO / "configs" / "sasrec" / "tiny.yaml")
METRICS = ("ndcg@10_filtered", "hr@10", "mrr", "ndcg@100", "coverage@10")


def fit_args(root: Path, data: Path, *extra: str) -> list[str]:
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
        "--mlflow.enabled",
        "false",
        *extra,
    ]


def torchrun(port: int, *extra: str) -> list[str]:
    return [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(port), *extra]


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def checkpoint_epoch(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt / "trainer_state.pt", weights_only=False)["epoch"])
    except Exception:  # absent, or being replaced at this moment
        return -1


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An uninterrupted torchrun run, 2 ranks, 4 epochs, checkpoints in an explicit directory."""
    tmp = tmp_path_factory.mktemp("faults")
    data, root, ckpts = tmp / "data", tmp / "ref", tmp / "ref_ckpts"
    proc = subprocess.run(
        [
            *torchrun(29681),
            "-m",
            "recforge.cli",
            *fit_args(root, data, "--trainer.max_epochs", "4", "--checkpoint.dirpath", str(ckpts)),
        ],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"tmp": tmp, "data": data, "run": root / "sasrec-tiny" / "version_0", "ckpts": ckpts}


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_rank_ends_the_other_naming_it(reference: dict[str, Path], victim: int) -> None:
    """Lightning's launcher: rank 0 is the parent of rank 1. SIGKILL either one mid-training;
    the other must be gone within a minute (not the 30-minute collective timeout) and say which
    rank died."""
    tmp = reference["tmp"] / f"kill{victim}"
    proc = subprocess.Popen(
        [RECFORGE, *fit_args(tmp, reference["data"], "--trainer.max_epochs", "50")],
        cwd=reference["tmp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        last = tmp / "sasrec-tiny" / "version_0" / "checkpoints" / "last.ckpt"
        wait_for(lambda: checkpoint_epoch(last) >= 0, proc, "the first checkpoint")
        ranks = {0: proc.pid}
        ranks.update({int(environ(c).get("LOCAL_RANK", -1)): c for c in children(proc.pid)})
        survivor = ranks[1 - victim]
        killed_at = time.time()
        os.kill(ranks[victim], signal.SIGKILL)
        while alive(survivor) and time.time() - killed_at < 60:
            time.sleep(0.2)
        assert not alive(survivor), "the surviving rank still runs a minute after the kill"
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    errors = [line for line in stderr.splitlines() if "error:" in line]
    # Rank 0 reaps rank 1 and knows the signal; rank 1 sees its parent gone.
    dead = "rank 1 died (SIGKILL)" if victim == 1 else "rank 0 (pid"
    assert any(dead in line and "died" in line for line in errors), stderr[-3000:]


def test_torchrun_restart_resumes_from_the_last_checkpoint(
    reference: dict[str, Path],
) -> None:
    tmp, data = reference["tmp"], reference["data"]
    root, ckpts = tmp / "restarted", tmp / "restarted_ckpts"
    proc = subprocess.Popen(
        [
            *torchrun(29682, "--max-restarts", "1"),
            "-m",
            "recforge.cli",
            *fit_args(root, data, "--trainer.max_epochs", "4", "--checkpoint.dirpath", str(ckpts)),
        ],
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: checkpoint_epoch(ckpts / "last.ckpt") >= 1, proc, "the epoch-1 checkpoint")
        workers = {int(environ(c)["RANK"]): c for c in children(proc.pid)}
        os.kill(workers[1], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-4000:]
    assert "torchrun restart 1: resuming from" in stderr, stderr[-4000:]
    assert checkpoint_epoch(ckpts / "last.ckpt") == 3
    # The restarted attempt's logger has its own version directory; the test after fit ran there.
    resumed = json.loads((root / "sasrec-tiny" / "version_1" / "test_metrics.json").read_text())[
        "metrics"
    ]
    expected = json.loads((reference["run"] / "test_metrics.json").read_text())["metrics"]
    for key in METRICS:
        assert resumed[key] == pytest.approx(expected[key], abs=1e-5), key


def _limit_file_size() -> None:
    # Files over 150 kB fail with EFBIG: the checkpoint's trainer_state.pt (rank 0's; the DCP
    # shards are smaller), not the metrics or configs. SIGXFSZ would kill the process instead.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))


def test_a_checkpoint_that_cannot_be_written(reference: dict[str, Path]) -> None:
    tmp = reference["tmp"]
    ckpts = tmp / "full_ckpts"
    shutil.copytree(reference["ckpts"], ckpts)
    last = ckpts / "last.ckpt"
    before = {p.name: p.stat().st_size for p in last.iterdir()}
    start = time.time()
    proc = subprocess.run(
        [
            RECFORGE,
            *fit_args(
                tmp / "full",
                reference["data"],
                "--trainer.max_epochs",
                "5",
                "--checkpoint.dirpath",
                str(ckpts),
                "--ckpt_path",
                str(last),
            ),
        ],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=240,
        preexec_fn=_limit_file_size,
    )
    assert time.time() - start < 200
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-4000:]
    assert "could not be written" in errors[0] and "File too large" in errors[0], errors
    assert str(ckpts) in errors[0] and "no partial directory is left" in errors[0]
    assert "Traceback" not in proc.stderr
    assert {p.name: p.stat().st_size for p in last.iterdir()} == before
    assert checkpoint_epoch(last) == 3
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith((".partial", ".old"))]
