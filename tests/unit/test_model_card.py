"""MODEL_CARD.md (trainer/export/model_card.py): with the run's evaluation report beside the
checkpoint it carries every section; without one it says so instead of inventing figures. (The
card of a real fit + export is checked in tests/integration/test_mlflow.py.)"""

from __future__ import annotations

import json
from pathlib import Path

from recforge.trainer.export.model_card import write_model_card


def _manifest(tmp_path: Path, checkpoint: Path | None) -> dict:
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(
        json.dumps(
            {
                "users": 3,
                "items": 5,
                "interactions": 9,
                "fingerprint": "f00d",
                "features": {"item": {}, "user": {}},
            }
        )
    )
    return {
        "kind": "sasrec",
        "checkpoint": str(checkpoint) if checkpoint else None,
        "dataset": {"path": str(data), "fingerprint": "f00d"},
        "metrics": {"test/ndcg@10_filtered": 0.25},
        "model_config": {"dim": 8},
    }


def test_without_an_evaluation_report_the_card_says_so(tmp_path: Path) -> None:
    card = write_model_card(tmp_path, _manifest(tmp_path, None)).read_text()
    assert "No evaluation report was found" in card
    assert "test/ndcg@10_filtered: 0.2500" in card and "`f00d`" in card
    assert "user features: none" in card and "## Known limits" in card


def test_with_the_runs_report(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints" / "best.ckpt").mkdir(parents=True)
    (run / "config.yaml").write_text("seed_everything: 7\n")
    metrics = {
        "hr@10": 0.5,
        "hr@10_filtered": 0.6,
        "ndcg@10": 0.3,
        "ndcg@10_filtered": 0.4,
        "gini@10": 0.7,
        "popularity_lift@10": 1.5,
        "history_popularity": 20.0,
        "group/gender/F/count": 2.0,
        "group/gender/F/ndcg@10_filtered": 0.2,
        "group/gender/M/count": 1.0,
        "group/gender/M/ndcg@10_filtered": 0.5,
        "group/gender/ndcg@10_filtered_max_min_ratio": 2.5,
    }
    report = {
        "metrics": metrics,
        "segments": [{"segment": "1-5", "count": 3.0, "ndcg@10_filtered": 0.4}],
        "bias": {"k": 10, "diversity_basis": "embedding", "group_by": ["gender"]},
        "users_evaluated": 3,
    }
    (run / "test_metrics.json").write_text(json.dumps(report))
    card = write_model_card(tmp_path, _manifest(tmp_path, run / "checkpoints" / "best.ckpt"))
    text = card.read_text()
    for part in (
        "## Model",
        "## Data",
        "## Training configuration",
        "seed_everything: 7",
        "### Overall",
        "### By history length",
        "| gender | F |",
        "gini@10",
        "1.50x as popular",
        "NDCG@10 max/min 2.50",
    ):
        assert part in text, part
