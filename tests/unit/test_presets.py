"""`preset: auto`: the manifest statistics it reads and the SASRec settings it derives from them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recforge.data import layout, stats
from recforge.data.prepare import PrepareConfig, prepare
from recforge.trainer.presets import (
    DROPOUT,
    MAX_LEN,
    NUM_LAYERS,
    PATIENCE,
    TABLE_DECAY,
    TABLE_DECAY_MODE,
    TABLE_LR,
    PresetError,
    as_defaults,
    check_preset,
    derive_max_len,
    derive_patience,
    for_table_optimizer,
    sasrec_auto,
)


def manifest(p95: float, per_item: float, train: int) -> dict[str, Any]:
    return {
        "train_length": {"p50": p95 / 4, "p90": p95 / 2, "p95": p95, "p99": 2 * p95, "mean": 1.0},
        "item_interactions": {"mean": per_item, "median": per_item / 2},
        "split_counts": {"train_interactions": train},
    }


def values(derived: dict) -> dict[str, Any]:
    return {key: d.value for key, d in derived.items()}


def test_dense_long_histories_get_the_ml1m_settings() -> None:
    # ML-1M's statistics: p95 training length 554, 292.6 interactions per item, 987,531 targets.
    derived = sasrec_auto(manifest(554, 292.6, 987_531))
    assert values(derived) == {
        MAX_LEN: 200,
        NUM_LAYERS: 2,
        DROPOUT: 0.2,
        TABLE_LR: 0.05,
        TABLE_DECAY: 0.0,
        TABLE_DECAY_MODE: "decoupled",
        PATIENCE: 20,
    }
    # Each value says which statistic and which rule gave it.
    assert "p95 training length 554" in derived[MAX_LEN].describe()
    assert "clamped to [16, 200]" in derived[MAX_LEN].rule
    assert "292.6 interactions per item" in derived[DROPOUT].statistic


def test_sparse_short_histories_get_a_small_regularised_model() -> None:
    # Amazon Sports: p95 16, 16.1 interactions per item, 225,141 targets (short epochs).
    derived = sasrec_auto(manifest(16, 16.1, 225_141))
    assert values(derived) == {
        MAX_LEN: 16,
        NUM_LAYERS: 1,
        DROPOUT: 0.5,
        TABLE_LR: 0.13,
        TABLE_DECAY: 1e-3,
        TABLE_DECAY_MODE: "decoupled",
        PATIENCE: 30,
    }
    assert "225,141 training interactions" in derived[PATIENCE].statistic


def test_rule_edges() -> None:
    assert [derive_max_len(p) for p in (1, 16, 17, 24.5, 199, 201, 5000)] == [
        16,
        16,
        24,
        32,
        200,
        200,
        200,
    ]
    assert [derive_patience(n) for n in (1, 299_999, 300_000, 2_999_999, 3_000_000)] == [
        30,
        30,
        20,
        20,
        10,
    ]
    assert values(sasrec_auto(manifest(40, 50.0, 10)))[NUM_LAYERS] == 2  # 50 per item is dense
    assert values(sasrec_auto(manifest(40, 49.9, 10)))[DROPOUT] == 0.5
    assert values(sasrec_auto(manifest(40, 49.9, 10)))[TABLE_LR] == 0.13
    assert values(sasrec_auto(manifest(40, 50.0, 10)))[TABLE_DECAY] == 0.0
    assert values(sasrec_auto(manifest(40, 49.9, 10)))[TABLE_DECAY] == 1e-3


@pytest.mark.parametrize(
    ("optimizer", "kept"),
    [
        (None, {TABLE_LR, TABLE_DECAY, TABLE_DECAY_MODE}),  # the default: row-wise Adagrad
        ("rowwise_adagrad", {TABLE_LR, TABLE_DECAY, TABLE_DECAY_MODE}),
        ("adagrad", {TABLE_LR}),  # an Adagrad rate, but its kernel has no decay
        ("sgd", set()),
        ("adam", set()),
    ],
)
def test_table_settings_are_derived_only_for_the_optimizer_they_were_measured_with(
    optimizer: str | None, kept: set[str]
) -> None:
    derived = sasrec_auto(manifest(16, 16.1, 225_141))
    table = {TABLE_LR, TABLE_DECAY, TABLE_DECAY_MODE}
    filtered, dropped = for_table_optimizer(derived, optimizer)
    assert set(filtered) == set(derived) - (table - kept)
    assert set(dropped) == table - kept
    assert all(filtered[k] == derived[k] for k in filtered)


def test_unknown_preset_other_family_and_old_manifest_are_clear_errors() -> None:
    sasrec = "recforge.trainer.sasrec_module.SASRecModule"
    with pytest.raises(PresetError, match="preset 'fast' is unknown; known presets: auto"):
        check_preset("fast", sasrec)
    with pytest.raises(PresetError, match="derives sasrec settings; this config trains two_tower"):
        check_preset("auto", "recforge.trainer.two_tower_module.TwoTowerModule")
    assert check_preset("auto", sasrec) is sasrec_auto
    with pytest.raises(PresetError, match="no train_length.p95"):
        sasrec_auto({"split_counts": {"train_interactions": 5}})


def test_defaults_nest_the_model_fields_under_the_class_path() -> None:
    defaults = as_defaults(sasrec_auto(manifest(30, 100.0, 10)), "pkg.Module")
    assert defaults == {
        "early_stopping.patience": 30,
        "model": {
            "class_path": "pkg.Module",
            "init_args": {
                "model": {"max_len": 32, "num_layers": 2, "dropout": 0.2},
                "embedding_optimizer": {
                    "lr": 0.05,
                    "weight_decay": 0.0,
                    "weight_decay_mode": "decoupled",
                },
            },
        },
    }


@pytest.mark.parametrize(
    "split, engine", [("leave-one-out", "memory"), ("leave-one-out", "duckdb"), ("time", "duckdb")]
)
def test_prepare_writes_the_statistics_and_old_manifests_derive_them(
    tmp_path: Path, split: str, engine: str
) -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=40)
    users = np.repeat(np.arange(len(lengths)), lengths)
    items = rng.integers(0, 25, size=len(users))
    src = tmp_path / "in.parquet"
    pq.write_table(
        pa.table({"user_id": users, "item_id": items, "timestamp": np.arange(len(users))}), src
    )
    out = tmp_path / "out"
    config = PrepareConfig(
        input=[str(src)], out=str(out), min_eval_users=0, split=split, engine=engine
    )
    m = prepare(config)
    if split == "leave-one-out":
        # Each user trains on all but the last two of its items (no duplicates here).
        train = np.sort(lengths - 2)
        expected = {q: int(train[int(np.ceil(q / 100 * len(train))) - 1]) for q in (50, 90, 95, 99)}
        assert m["train_length"] == {
            **{f"p{q}": v for q, v in expected.items()},
            "mean": pytest.approx(train.mean()),
        }
    counts = pq.read_table(out / layout.ITEMS)["count"].to_numpy()
    assert m["item_interactions"] == {
        "mean": pytest.approx(m["interactions"] / m["items"]),
        "median": float(np.median(counts)),
    }
    assert json.loads((out / layout.MANIFEST).read_text())["train_length"] == m["train_length"]

    old = {k: v for k, v in m.items() if k not in ("train_length", "item_interactions")}
    assert not stats.has_statistics(old)
    derived = stats.with_statistics(str(out), old)
    assert derived["train_length"] == m["train_length"]
    assert derived["item_interactions"] == m["item_interactions"]
    assert stats.with_statistics(str(out), m) is m
