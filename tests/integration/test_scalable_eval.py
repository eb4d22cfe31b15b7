"""Evaluation that scales (docs/architecture.md §7) through the real CLI on the tiny SASRec config:
item-chunked scoring equals one score matrix exactly, item-sharded scoring over 2 gloo processes
equals 1 process, and ``data.eval_max_users`` evaluates the same fixed sample under any ranks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECFORGE = str(Path(sys.executable).with_name("recforge"))
TINY = str(REPO / "configs" / "sasrec" / "tiny.yaml")
EVAL = "--model.init_args.evaluation"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [RECFORGE, args[0], "--config", TINY, *args[1:]],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("scalable_eval")
    data, root = tmp / "data", tmp / "fit"
    _run(
        "fit",
        "--data.data_dir",
        str(data),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.save_dir",
        str(root),
        "--trainer.max_epochs",
        "1",
        "--test_after_fit",
        "false",
        cwd=tmp,
    )
    ckpt = root / "sasrec-tiny" / "version_0" / "checkpoints" / "last.ckpt"
    return {"tmp": tmp, "data": data, "ckpt": ckpt}


def _test(trained: dict[str, Path], name: str, devices: int, *extra: str) -> tuple[dict, str]:
    root = trained["tmp"] / name
    proc = _run(
        "test",
        "--data.data_dir",
        str(trained["data"]),
        "--ckpt_path",
        str(trained["ckpt"]),
        "--trainer.devices",
        str(devices),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.save_dir",
        str(root),
        *extra,
        cwd=trained["tmp"],
    )
    report = json.loads((root / "sasrec-tiny" / "version_0" / "test_metrics.json").read_text())
    return report, proc.stderr


def _close(a: dict[str, float], b: dict[str, float], abs_: float) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        if math.isnan(value):
            assert math.isnan(b[key]), key
        else:
            assert b[key] == pytest.approx(value, abs=abs_), key


def test_chunked_and_item_sharded_equal_one_matrix(trained: dict[str, Path]) -> None:
    whole, _ = _test(trained, "whole", 1)
    assert whole["users_evaluated"] == whole["users_eligible"] == whole["metrics"]["count"] > 0
    assert whole["sampled"] is False
    chunked, log = _test(trained, "chunked", 1, f"{EVAL}.item_chunk", "7")
    assert "in chunks of 7" in log
    assert chunked["metrics"] == whole["metrics"]  # exact
    # 2 processes, the item table row-wise: each scores both ranks' users against its rows.
    sharded, log = _test(trained, "sharded", 2, f"{EVAL}.item_chunk", "13")
    assert "(item-sharded)" in log
    _close(whole["metrics"], sharded["metrics"], 1e-12)  # only float summation order differs


def test_eval_max_users_is_a_fixed_sample(trained: dict[str, Path]) -> None:
    one, _ = _test(trained, "sample1", 1, "--data.eval_max_users", "150")
    assert (one["users_evaluated"], one["sampled"]) == (150, True)
    assert one["users_eligible"] > 150 and one["metrics"]["count"] == 150
    two, _ = _test(trained, "sample2", 2, "--data.eval_max_users", "150")
    assert {k: two[k] for k in ("users_evaluated", "users_eligible", "sampled")} == {
        k: one[k] for k in ("users_evaluated", "users_eligible", "sampled")
    }
    _close(one["metrics"], two["metrics"], 1e-12)
