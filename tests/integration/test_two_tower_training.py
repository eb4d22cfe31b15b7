"""The real `recforge fit/test` CLI on the tiny two-tower config: it learns (beats most-popular),
shards the item table row-wise and the feature tables table-wise across 2 processes, and 1 and 2
ranks evaluate a checkpoint identically."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recforge.trainer.evaluation.baselines import evaluate_baseline

REPO = Path(__file__).resolve().parents[2]
RECFORGE = str(Path(sys.executable).with_name("recforge"))
TINY = str(REPO / "configs" / "two_tower" / "tiny.yaml")
FEATURE_TABLES = ("item_category", "item_tags", "user_age_bucket", "user_country", "user_id")
ITEM_TABLE_KEY = "embedding_collection.embeddings.item_table.weight"
# The tiny model gains nothing from intra-op threads, and on a loaded 2-core machine OpenMP
# threads contending for the cores slow a single-process run down by orders of magnitude
# (Lightning already gives each of 2 processes one thread).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_ok(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [RECFORGE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


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
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


def version_dir(root: Path) -> Path:
    return root / "two-tower-tiny" / "version_0"


def val_ndcg(run: Path) -> list[float]:
    with open(run / "metrics.csv") as f:
        return [
            float(r["val/ndcg@10_filtered"])
            for r in csv.DictReader(f)
            if r.get("val/ndcg@10_filtered")
        ]


def test_metrics(root: Path, data: Path, ckpt: Path, devices: int, cwd: Path) -> dict[str, float]:
    run_ok(
        "test",
        "--config",
        TINY,
        "--data.data_dir",
        str(data),
        "--ckpt_path",
        str(ckpt),
        "--trainer.devices",
        str(devices),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.save_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        cwd=cwd,
    )
    return json.loads((version_dir(root) / "test_metrics.json").read_text())["metrics"]


test_metrics.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One real 2-process CPU training run of the tiny config, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("two_tower2")
    data, root = tmp / "data", tmp / "run"
    run_ok(*fit_args(root, data, "--trainer.devices", "2"), cwd=tmp)
    return {"tmp": tmp, "data": data, "run": version_dir(root)}


def test_two_processes_shard_items_row_wise_and_features_table_wise_and_learn(
    two_process_run: dict[str, Path],
) -> None:
    run, data = two_process_run["run"], two_process_run["data"]
    plan = json.loads((run / "sharding_plan.json").read_text())
    assert plan["item_table"]["sharding_type"] == "row_wise" and plan["item_table"]["ranks"] == [
        0,
        1,
    ]
    assert plan["item_table"]["module"].endswith("embedding_collection")
    for table in FEATURE_TABLES:
        assert plan[table]["sharding_type"] == "table_wise", table
        assert len(plan[table]["ranks"]) == 1 and plan[table]["module"].endswith(
            "feature_collection"
        )
    assert len({plan[t]["ranks"][0] for t in FEATURE_TABLES}) == 2  # the planner used both ranks

    # Each rank holds one block of item rows and not the others: together exactly the whole table.
    num_rows = json.loads((data / "manifest.json").read_text())["items"] + 1
    local = [json.loads((run / f"local_shards_rank{r}.json").read_text()) for r in (0, 1)]
    (s0,), (s1,) = (shards[ITEM_TABLE_KEY] for shards in local)
    assert s0["offsets"] == [0, 0] and s1["offsets"] == [s0["sizes"][0], 0]
    assert s0["sizes"][0] + s1["sizes"][0] == num_rows and 0 < s0["sizes"][0] < num_rows
    # A table-wise feature table lives whole on its rank and nowhere else.
    for table in FEATURE_TABLES:
        key = f"feature_collection.embedding_bags.{table}.weight"
        owner = plan[table]["ranks"][0]
        assert [len(local[r][key]) for r in (0, 1)] == [int(owner == 0), int(owner == 1)], table
        assert local[owner][key][0]["offsets"] == [0, 0]

    ndcg = val_ndcg(run)
    assert len(ndcg) == 4 and ndcg[-1] > ndcg[0]
    popular = evaluate_baseline(str(data), "most_popular", stage="validate")["ndcg@10_filtered"]
    assert ndcg[-1] > 3 * popular, (ndcg, popular)
    ckpt = run / "checkpoints" / "last.ckpt"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "trainer_state.pt"} <= {
        p.name for p in ckpt.iterdir()
    }


def test_one_and_two_ranks_give_identical_test_metrics(two_process_run: dict[str, Path]) -> None:
    tmp, data = two_process_run["tmp"], two_process_run["data"]
    ckpt = two_process_run["run"] / "checkpoints" / "last.ckpt"
    one = test_metrics(tmp / "test1", data, ckpt, 1, tmp)
    two = test_metrics(tmp / "test2", data, ckpt, 2, tmp)
    assert one["count"] == two["count"] > 0
    for key, value in one.items():
        assert value == pytest.approx(two[key], abs=1e-6, nan_ok=True), key


def test_one_process_fit_beats_most_popular(
    two_process_run: dict[str, Path], tmp_path: Path
) -> None:
    data = two_process_run["data"]  # already synthesised
    run_ok(*fit_args(tmp_path / "run", data, "--trainer.max_epochs", "2"), cwd=tmp_path)
    ndcg = val_ndcg(version_dir(tmp_path / "run"))
    popular = evaluate_baseline(str(data), "most_popular", stage="validate")["ndcg@10_filtered"]
    assert len(ndcg) == 2 and ndcg[-1] > 3 * popular, (ndcg, popular)
