"""The CUDA code paths (issue 15 item 6), run where a GPU is present and skipped elsewhere
(`gpu` marker, tests/conftest.py): NCCL process groups and CUDA placement of the sharded tables,
the fused Adam kernel that only exists for CUDA tables, bf16-mixed precision, and the loader's
pinned host memory. TorchRec's CUDA wheels must be installed (scripts/install.sh installs the
CPU ones); docs/architecture.md §11 has the pins."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
RECFORGE = str(Path(sys.executable).with_name("recforge"))

pytestmark = pytest.mark.gpu


def _fit(tmp: Path, config: str, devices: int, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            RECFORGE,
            "fit",
            "--config",
            str(REPO / "configs" / config),
            "--data.data_dir",
            str(tmp / "data"),
            "--trainer.default_root_dir",
            str(tmp / "runs"),
            "--trainer.logger.init_args.save_dir",
            str(tmp / "runs"),
            "--trainer.accelerator",
            "gpu",
            "--trainer.devices",
            str(devices),
            "--trainer.precision",
            "bf16-mixed",
            "--trainer.max_epochs",
            "2",
            "--mlflow.enabled",
            "false",
            *extra,
        ],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _plan(tmp: Path) -> dict:
    plans = sorted((tmp / "runs").rglob("sharding_plan.json"))
    assert plans, "no sharding_plan.json written"
    return json.loads(plans[-1].read_text())


@pytest.mark.parametrize("config", ["sasrec/tiny.yaml", "two_tower/tiny.yaml"])
def test_one_gpu_bf16_with_fused_adam_tables(tmp_path: Path, config: str) -> None:
    proc = _fit(tmp_path, config, 1, "--model.init_args.embedding_optimizer.name", "adam")
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = sorted((tmp_path / "runs").rglob("test_metrics.json"))
    assert metrics, proc.stderr[-2000:]
    values = json.loads(metrics[-1].read_text())["metrics"]
    assert all(v == v for v in values.values()), values  # no NaN from bf16
    # Fused Adam has no CPU kernel (trainer/sharding.py refuses it there): success means the
    # tables were placed on the GPU.


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
)
def test_two_gpus_shard_the_item_table_over_nccl(tmp_path: Path) -> None:
    proc = _fit(
        tmp_path,
        "sasrec/tiny.yaml",
        2,
        "--model.init_args.sharding.sharding_types",
        '{"item_table": "row_wise"}',
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _plan(tmp_path)["item_table"]["ranks"] == [0, 1]


def test_loader_batches_are_pinned_for_non_blocking_copies(tmp_path: Path) -> None:
    from recforge.data.datamodule import SequenceDataModule

    dm = SequenceDataModule(
        data_dir=str(tmp_path / "data"),
        batch_size=8,
        synthesize={"users": 50, "items": 30, "mean_length": 8, "seed": 0},
    )
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.is_pinned() for t in tensors)
