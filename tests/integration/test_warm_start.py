"""`recforge fit --init_from CHECKPOINT` (trainer/warm_start.py): a new run on a grown catalogue
(day 2 prepared with `--vocab-from` day 1) starts from day 1's weights.

Day 1 is trained on one process; day 2 warm starts on two (item table row-wise), so the old
table is read from another plan and world size. A callback saves a checkpoint when training
starts, before any step: its known rows must equal day 1's exactly and its new rows must keep
their fresh initialisation. Dataset and architecture mismatches stop with one line (exit 2).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recforge.data import layout
from recforge.data.prepare import PrepareConfig, prepare
from recforge.data.synth import SynthConfig, generate
from recforge.trainer.checkpoint import CheckpointError, read_trainer_state
from recforge.trainer.export.loading import load_checkpoint
from recforge.trainer.warm_start import DatasetMatch, _value_map, check_dataset, plan_copies

REPO = Path(__file__).resolve().parents[2]
RECFORGE = str(Path(sys.executable).with_name("recforge"))
CONFIGS = {
    "sasrec": (REPO / "configs" / "sasrec" / "tiny.yaml", "sasrec-tiny"),
    "two_tower": (REPO / "configs" / "two_tower" / "tiny.yaml", "two-tower-tiny"),
}
DAY1 = {"users": 400, "items": 200, "mean_length": 20, "seed": 0}  # the tiny configs' data
DAY2 = {"users": 450, "items": 230, "mean_length": 20, "seed": 0}  # 50 new users, 30 new items

SAVE_AT_START = '''
from lightning.pytorch import Callback


class SaveAtStart(Callback):
    """Save a checkpoint when training starts: the weights right after the warm start."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(self.path)
'''


def recforge(*args: str, cwd: Path, env: dict[str, str] | None = None):
    return subprocess.run(
        [RECFORGE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def fit(family: str, root: Path, data: Path, *extra: str, env: dict[str, str] | None = None):
    config, _ = CONFIGS[family]
    return recforge(
        "fit",
        "--config",
        str(config),
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
        "--mlflow.enabled",
        "false",
        *extra,
        cwd=root.parent,
        env=env,
    )


def synth_and_prepare(tmp: Path, name: str, fields: dict, vocab_from: Path | None) -> Path:
    raw = tmp / f"raw-{name}"
    generate(SynthConfig(out=str(raw), **fields))
    out = tmp / name
    prepare(
        PrepareConfig(
            input=[str(raw / "interactions.parquet")],
            out=str(out),
            item_features=str(raw / "item_features.parquet"),
            user_features=str(raw / "user_features.parquet"),
            vocab_from=None if vocab_from is None else str(vocab_from),
        )
    )
    return out


@pytest.fixture(scope="module", params=["sasrec", "two_tower"])
def day1(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Day 1 trained for one epoch on one process; day 2 prepared with --vocab-from day 1."""
    family = request.param
    tmp = tmp_path_factory.mktemp(f"warm-{family}")
    data1 = synth_and_prepare(tmp, "day1", DAY1, None)
    proc = fit(family, tmp / "run1", data1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = tmp / "run1" / CONFIGS[family][1] / "version_0" / "checkpoints" / "last.ckpt"
    data2 = synth_and_prepare(tmp, "day2", DAY2, data1)
    return {"family": family, "tmp": tmp, "data1": data1, "data2": data2, "ckpt": ckpt}


def test_warm_start_on_two_processes_copies_known_rows(day1: dict) -> None:
    tmp, family = day1["tmp"], day1["family"]
    manifest = layout.read_manifest(day1["data2"])
    assert manifest["vocab_from"]["items_new"] == 30 and manifest["vocab_from"]["users_new"] == 50
    (tmp / "warmcheck.py").write_text(SAVE_AT_START)
    start = tmp / "start.ckpt"
    (tmp / "extra.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: warmcheck.SaveAtStart\n"
        f"      init_args:\n        path: {start}\n"
    )
    proc = fit(
        family,
        tmp / "run2",
        day1["data2"],
        "--config",
        str(tmp / "extra.yaml"),
        "--trainer.devices",
        "2",
        "--trainer.limit_train_batches",
        "1",
        "--trainer.limit_val_batches",
        "1",
        "--init_from",
        str(day1["ckpt"]),
        env={"PYTHONPATH": str(tmp)},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if "warm start from" in line]
    assert len(lines) == 1, proc.stderr[-4000:]  # rank 0 only
    assert "item_table 201 of 231 rows copied" in lines[0]
    if family == "two_tower":
        assert "user_id 401 of 451 rows copied" in lines[0]
        assert "item_category 21 of 21 rows copied (by feature value)" in lines[0]
    # Row-wise on two ranks: the old table was resharded into this plan.
    run2 = tmp / "run2" / CONFIGS[family][1] / "version_0"
    assert "item_table" in (run2 / "local_shards_rank1.json").read_text()

    # A new run: fresh trainer state.
    old_state, new_state = read_trainer_state(day1["ckpt"]), read_trainer_state(start)
    assert old_state["global_step"] > 0 and new_state["global_step"] == 0
    assert new_state["epoch"] == 0 and new_state["recforge"]["world_size"] == 2

    old = load_checkpoint(day1["ckpt"]).network.state_dict()
    new = load_checkpoint(start).network.state_dict()
    assert old.keys() == new.keys()
    grown = []
    for key, before in old.items():
        after = new[key]
        if key.endswith("log_item_prob"):  # from the new data's item counts
            assert after.shape == (231,)
            continue
        if before.shape == after.shape:
            assert torch.equal(before, after), key
            continue
        rows = before.shape[0]
        assert after.shape[1:] == before.shape[1:], key
        assert torch.equal(after[:rows], before), key
        assert after[rows:].abs().sum(dim=1).gt(0).all(), key  # fresh rows, not zeros
        grown.append((key.split(".")[-2], rows, after.shape[0]))
    expected = [("item_table", 201, 231)]
    if family == "two_tower":
        expected.append(("user_id", 401, 451))
    assert sorted(grown) == sorted(expected)


def test_a_dataset_from_another_vocabulary_is_refused(day1: dict) -> None:
    if day1["family"] != "sasrec":
        pytest.skip("the check does not depend on the family")
    tmp = day1["tmp"]
    raw2 = tmp / "raw-day2" / "interactions.parquet"
    other = tmp / "other"
    prepare(PrepareConfig(input=[str(raw2)], out=str(other)))
    wrong = tmp / "day2-wrong"
    prepare(PrepareConfig(input=[str(raw2)], out=str(wrong), vocab_from=str(other)))
    proc = fit("sasrec", tmp / "run3", wrong, "--init_from", str(day1["ckpt"]))
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("recforge fit: error")]
    assert len(errors) == 1, proc.stderr[-4000:]
    assert f"prepared with --vocab-from {other}" in errors[0]
    assert f"prepare it with --vocab-from {day1['data1']}" in errors[0]
    assert "Traceback" not in proc.stderr

    proc = fit(
        "sasrec",
        tmp / "run3",
        day1["data2"],
        "--init_from",
        str(day1["ckpt"]),
        "--ckpt_path",
        str(day1["ckpt"]),
    )
    assert proc.returncode == 2 and "pass one of them" in proc.stderr, proc.stderr[-4000:]


def test_dataset_checks(day1: dict) -> None:
    if day1["family"] != "sasrec":
        pytest.skip("the check does not depend on the family")
    tmp, ckpt = day1["tmp"], day1["ckpt"]
    state = read_trainer_state(ckpt)

    def check(directory: Path) -> DatasetMatch:
        return check_dataset(ckpt, state, str(directory), layout.read_manifest(directory))

    assert check(day1["data2"]).how == "vocab_from"
    # Not prepared with --vocab-from: accepted when the ids sit at the same indices.
    assert check(day1["data1"]).how == "same ids"
    # A chain of --vocab-from preparations lines up too (each link's fingerprint is checked).
    day3 = synth_and_prepare(tmp, "day3", {**DAY2, "users": 470}, day1["data2"])
    assert check(day3).how == "vocab_from chain"
    fresh = tmp / "fresh"
    prepare(PrepareConfig(input=[str(tmp / "raw-day2" / "interactions.parquet")], out=str(fresh)))
    with pytest.raises(CheckpointError, match="numbers its items differently"):
        check(fresh)
    smaller = synth_and_prepare(tmp, "smaller", {**DAY1, "items": 150}, None)
    with pytest.raises(CheckpointError, match=r"fewer items \(150\) .* \(200\)"):
        check(smaller)


def test_shape_rules() -> None:
    match = DatasetMatch("old", {"items": 200, "users": 400}, "vocab_from", {})
    growth = {"items": 30, "users": 50}
    table = "embedding_collection.embeddings.item_table.weight"
    current = {table: torch.zeros(231, 32), "out.bias": torch.zeros(231), "w": torch.zeros(4, 4)}
    saved = {table: (201, 32), "out.bias": (201,), "w": (4, 4)}
    copies, _ = plan_copies("ck", current, saved, growth, match)
    kinds = {c.key: c.what for c in copies}
    assert kinds == {table: "table", "out.bias": "catalogue", "w": "dense"}
    with pytest.raises(CheckpointError, match=r"tensor w has shape \[4, 8\] .* but \[4, 4\]"):
        plan_copies("ck", current, {**saved, "w": (4, 8)}, growth, match)
    with pytest.raises(CheckpointError, match=r"out.bias has shape \[190\]"):
        plan_copies("ck", current, {**saved, "out.bias": (190,)}, growth, match)
    with pytest.raises(CheckpointError, match="exists only in the checkpoint"):
        plan_copies("ck", current, {**saved, "extra": (3,)}, growth, match)
    # Feature tables are matched by value: a new value renumbers the codes after it.
    source = _value_map(["a", "c", "d"], ["a", "b", "c", "d"], 5)
    assert source.tolist() == [0, 1, -1, 2, 3]


def test_sasrec_attribute_bags_are_matched_by_value() -> None:
    # SASRec's attribute bags are keyed and laid out like the two-tower feature tables: the key
    # comes from a real model, so renaming the bags breaks this test rather than warm starts.
    from recforge.models.sasrec import SASRec, SASRecConfig

    model = SASRec(SASRecConfig(num_items=10, dim=8, item_feature_cardinalities={"brand": 5}))
    (bag,) = [k for k in model.state_dict() if "brand" in k]
    vocabs = {"item_brand": (["a", "c", "d"], ["a", "b", "c", "d"])}
    match = DatasetMatch("old", {}, "vocab_from", feature_vocabs=vocabs)
    current = {bag: model.state_dict()[bag]}
    copies, _ = plan_copies("ck", current, {bag: (4, 8)}, {"items": 0, "users": 0}, match)
    assert [(c.what, c.source.tolist()) for c in copies] == [("feature", [0, 1, -1, 2, 3])]
