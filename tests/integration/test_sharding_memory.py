"""Memory-aware planning on 2 CPU processes: `sharding.memory_per_rank` feeds TorchRec's
planner, a table bigger than one rank's budget is split, and a plan that cannot fit stops
before training with one line (table sizes, budget, world size)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "sasrec" / "tiny.yaml")


def recforge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recforge", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A catalogue large enough (~10k items) that the item table, not the planner's per-batch
    buffers, dominates what each rank holds."""
    tmp = tmp_path_factory.mktemp("wide")
    synth = recforge(
        "data",
        "synth",
        "--out",
        str(tmp / "raw"),
        "--users",
        "3000",
        "--items",
        "20000",
        "--mean-length",
        "20",
        "--seed",
        "0",
        cwd=tmp,
    )
    assert synth.returncode == 0, synth.stderr[-3000:]
    prepared = recforge(
        "data",
        "prepare",
        "--format",
        "parquet",
        "--input",
        str(tmp / "raw" / "interactions.parquet"),
        "--out",
        str(tmp / "data"),
        cwd=tmp,
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    items = json.loads((tmp / "data" / "manifest.json").read_text())["items"]
    return tmp / "data", (items + 1) * 32 * 4  # fp32 rows of dim 32, row 0 = padding


def fit(data: Path, root: Path, sharding: str, budget: int) -> subprocess.CompletedProcess:
    return recforge(
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
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "3",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.limit_test_batches",
        "1",
        "--mlflow.enabled",
        "false",
        "--model.init_args.sharding.sharding_types",
        sharding,
        "--model.init_args.sharding.memory_per_rank",
        f"{budget}B",
        cwd=root.parent,
    )


def test_a_table_over_one_ranks_budget_is_split(data: tuple[Path, int], tmp_path: Path) -> None:
    path, table = data
    # TorchRec keeps 15% of the budget and an estimate of the dense model and input buffers
    # (~0.56 MB for this config) in reserve: at 1.25x the table, half of it fits each rank and
    # the whole of it fits none.
    budget = int(table * 1.25)
    proc = fit(path, tmp_path / "run", '{"item_table": "auto"}', budget)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = next((tmp_path / "run").glob("*/version_0"))
    plan = json.loads((run / "sharding_plan.json").read_text())["item_table"]
    assert plan["sharding_type"] in ("row_wise", "column_wise", "table_row_wise")
    held = plan["bytes_per_rank"]
    assert set(held) == {"0", "1"}
    assert sum(held.values()) == table
    assert max(held.values()) <= budget
    assert "item_table (" in (run / "sharding_plan.txt").read_text().splitlines()[0]


@pytest.mark.parametrize(
    ("sharding", "fraction", "named"),
    [
        ('{"item_table": "auto"}', 0.3, "item_table"),
        ('{"item_table": "table_wise"}', 0.75, "item_table"),
    ],
)
def test_a_plan_that_cannot_fit_stops_before_training_in_one_line(
    data: tuple[Path, int], tmp_path: Path, sharding: str, fraction: float, named: str
) -> None:
    path, table = data
    budget = int(table * fraction)
    proc = fit(path, tmp_path / "run", sharding, budget)
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-4000:]
    line = errors[0]
    assert line.startswith("recforge fit: error: sharding: the embedding tables do not fit")
    assert named in line and "world size 2" in line and f"memory_per_rank={budget}B" in line
    assert not list((tmp_path / "run").rglob("*.ckpt")), "nothing may be trained or saved"
