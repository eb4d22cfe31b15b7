"""recforge.data.loader / data.datamodule: sharding, determinism and batch content."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as pl
import numpy as np
import pytest
import torch
from loader_fixtures import random_prepared, write_prepared
from torch.utils.data import DataLoader

from recforge.data.datamodule import SequenceDataModule
from recforge.data.examples import ExampleSpec, scan_examples
from recforge.data.feature_tables import load_feature_tables
from recforge.data.layout import read_manifest
from recforge.data.loader import EpochBatchSampler, EpochPlan, SequenceBatchDataset

L, H = 4, 3  # SASRec max_len and two-tower history_len used with the random data


def make_loader(
    directory: Path,
    model: str,
    stage: str,
    *,
    rank: int = 0,
    world: int = 1,
    batch_size: int = 5,
    workers: int = 0,
    seed: int = 0,
    shuffle_window: int = 13,
    max_len: int = L,
    history_len: int = H,
    train_windows: str = "last",
) -> DataLoader:
    manifest = read_manifest(directory)
    spec = ExampleSpec(
        model,
        stage,
        max_len=max_len,
        history_len=history_len,  # type: ignore[arg-type]
        train_windows=train_windows,
    )  # type: ignore[arg-type]
    (index,) = scan_examples(directory, manifest["split"], [spec])
    features = load_feature_tables(directory, manifest) if model == "history" else None
    dataset = SequenceBatchDataset(
        directory,
        index,
        manifest["split"],
        batch_size=batch_size,
        rank=rank,
        world_size=world,
        seed=seed,
        shuffle=stage == "train",
        shuffle_window=shuffle_window,
        features=features,
    )
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=EpochBatchSampler(dataset),
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def jagged(values: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    return [v.tolist() for v in torch.split(values, lengths.tolist())]


def decode(batch: dict[str, Any], model: str, stage: str) -> list[tuple[Any, Any, float]]:
    """(example key, content, weight) per row, in a form comparable with :func:`expected`."""
    users = batch["user_idx"].tolist()
    weights = batch["weight"].tolist()
    if model == "sequence":
        n = batch["lengths"].tolist()
        inputs = batch["input_ids"].tolist()
        assert all(row[k:] == [0] * (len(row) - k) for row, k in zip(inputs, n))  # right padding
        if stage == "train":
            targets = batch["target_ids"].tolist()
            assert all(row[k:] == [0] * (len(row) - k) for row, k in zip(targets, n))
            return [
                (u, (i[:k], t[:k]), w) for u, i, t, k, w in zip(users, inputs, targets, n, weights)
            ]
        seen = jagged(batch["seen_values"], batch["seen_lengths"])
        return [
            (u, (i[:k], t, s), w)
            for u, i, k, t, s, w in zip(users, inputs, n, batch["target"].tolist(), seen, weights)
        ]
    kjt = batch["features"].to_dict()
    history = jagged(kjt["history"].values(), kjt["history"].lengths())
    targets = batch["target"].tolist()
    assert kjt["target"].values().tolist() == targets and kjt["user_id"].values().tolist() == users
    if stage == "train":
        return [((u, t), h, w) for u, t, h, w in zip(users, targets, history, weights)]
    seen = jagged(batch["seen_values"], batch["seen_lengths"])
    return [((u, t), (h, s), w) for u, t, h, s, w in zip(users, targets, history, seen, weights)]


def expected(
    sequences: list[list[int]], model: str, stage: str, min_history: int = 1
) -> dict[Any, Any]:
    """The examples of a leave-one-out dataset, computed independently of the loader."""
    out: dict[Any, Any] = {}
    for u, s in enumerate(sequences, start=1):
        n = len(s)
        train_end = n - 2 if n >= 3 else n
        if stage == "train":
            if model == "sequence" and train_end >= 2:
                w = s[max(0, train_end - L - 1) : train_end]
                out[u] = (w[:-1], w[1:])
            elif model == "history":
                for t in range(min_history, train_end):
                    out[(u, s[t])] = s[max(0, t - H) : t]
            continue
        if n < 3:
            continue
        t = train_end if stage == "validate" else n - 1
        hist = s[:t]
        out[u if model == "sequence" else (u, s[t])] = (
            (hist[-L:], s[t], hist) if model == "sequence" else (hist[-H:], hist)
        )
    return out


# ---------------------------------------------------------------------------------- sharding


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]]]:
    return random_prepared(tmp_path_factory.mktemp("random"))


@pytest.mark.parametrize("model", ["sequence", "history"])
@pytest.mark.parametrize("stage", ["train", "validate", "test"])
def test_two_ranks_two_workers_see_every_example_once(random_dir, model: str, stage: str) -> None:
    directory, sequences = random_dir
    want = expected(sequences, model, stage)
    seen: list[tuple[Any, Any]] = []
    batch_counts = []
    for rank in (0, 1):
        loader = make_loader(directory, model, stage, rank=rank, world=2, workers=2)
        loader.sampler.set_epoch(1)
        batches = list(loader)
        assert len(batches) == len(loader)
        batch_counts.append(len(batches))
        seen += [
            (key, content)
            for b in batches
            for key, content, w in decode(b, model, stage)
            if w == 1.0
        ]
    assert batch_counts[0] == batch_counts[1] > 1
    counts = Counter(key for key, _ in seen)
    assert set(counts) == set(want) and max(counts.values()) == 1
    assert all(content == want[key] for key, content in seen)


def test_all_windows_train_every_target_once(random_dir) -> None:
    # Every training target of every user is predicted exactly once per epoch (2 ranks x 2
    # workers), each window is a contiguous run of the training part, and only a user's earliest
    # window may be shorter than L.
    directory, sequences = random_dir
    want = Counter(
        (u, t)
        for u, s in enumerate(sequences, start=1)
        for t in range(1, len(s) - 2 if len(s) >= 3 else len(s))
    )
    got: Counter = Counter()
    starts: dict[int, list[tuple[int, int]]] = {}
    for rank in (0, 1):
        loader = make_loader(
            directory, "sequence", "train", rank=rank, world=2, workers=2, train_windows="all"
        )
        for batch in loader:
            for u, (inputs, targets), w in decode(batch, "sequence", "train"):
                if w == 1.0:
                    s = sequences[u - 1]
                    a = s.index(inputs[0])  # items are distinct within a user
                    assert (
                        inputs == s[a : a + len(inputs)]
                        and targets == s[a + 1 : a + 1 + len(inputs)]
                    )
                    got.update((u, t) for t in range(a + 1, a + 1 + len(targets)))
                    starts.setdefault(u, []).append((a, len(inputs)))
    assert got == want
    assert all(n == L for windows in starts.values() for a, n in sorted(windows)[1:])
    assert sum(len(w) > 1 for w in starts.values()) > 10  # long histories were really cut


def test_last_global_batch_gets_filler_row(tmp_path: Path) -> None:
    # Five users with two items each: one SASRec example each. B=2 x 2 ranks -> global batches of
    # 4, then 1 left: rank 0 takes it, rank 1 gets a weight-0 copy.
    directory = write_prepared(tmp_path, [[1, 2]] * 5, num_items=2)
    weights = []
    users: list[int] = []
    for rank in (0, 1):
        batches = list(
            make_loader(directory, "sequence", "train", rank=rank, world=2, batch_size=2, workers=2)
        )
        weights.append([b["weight"].tolist() for b in batches])
        users += [
            u for b in batches for u, w in zip(b["user_idx"].tolist(), b["weight"].tolist()) if w
        ]
    assert weights == [[[1.0, 1.0], [1.0]], [[1.0, 1.0], [0.0]]]
    assert sorted(users) == [1, 2, 3, 4, 5]


def test_fewer_examples_than_ranks(tmp_path: Path) -> None:
    directory = write_prepared(tmp_path, [[1, 2, 3, 4]], num_items=4)  # one example per stage
    for stage in ("train", "validate", "test"):
        per_rank = [
            [
                b["weight"].tolist()
                for b in make_loader(directory, "sequence", stage, rank=r, world=3)
            ]
            for r in range(3)
        ]
        assert per_rank == [[[1.0]], [[0.0]], [[0.0]]]


def test_plan_balances_every_batch_count() -> None:
    counts = np.array([3, 0, 7, 1, 12, 5, 0, 9])
    for world in (1, 2, 3, 8):
        for batch_size in (1, 2, 5, 64):
            plan = EpochPlan(
                counts,
                epoch=2,
                seed=1,
                shuffle=True,
                shuffle_window=4,
                batch_size=batch_size,
                world_size=world,
            )
            positions = [
                np.concatenate(
                    [
                        p
                        for p, filler in (
                            plan.rank_positions(g, r) for g in range(plan.num_batches)
                        )
                        if not filler
                    ]
                    or [np.zeros(0, np.int64)]
                )
                for r in range(world)
            ]
            assert np.array_equal(np.sort(np.concatenate(positions)), np.arange(counts.sum()))


# ------------------------------------------------------------------------------ determinism


def order(
    directory: Path, *, seed: int, epoch: int, workers: int = 0, model: str = "history"
) -> list[list[Any]]:
    loader = make_loader(directory, model, "train", seed=seed, workers=workers)
    loader.sampler.set_epoch(epoch)
    return [[k for k, _, _ in decode(b, model, "train")] for b in loader]


def test_deterministic_per_seed_and_reshuffled_per_epoch(random_dir) -> None:
    directory, _ = random_dir
    first = order(directory, seed=0, epoch=0)
    assert order(directory, seed=0, epoch=0) == first
    assert (
        order(directory, seed=0, epoch=0, workers=2) == first
    )  # workers do not change the batches
    assert order(directory, seed=0, epoch=1) != first
    assert order(directory, seed=1, epoch=0) != first
    assert sorted(sum(order(directory, seed=0, epoch=1), [])) == sorted(sum(first, []))
    # Evaluation is not shuffled: users in file order.
    val = [
        k
        for b in make_loader(directory, "sequence", "validate")
        for k, _, _ in decode(b, "sequence", "validate")
    ]
    assert val == sorted(val)


def test_sampler_state_resumes_mid_epoch(random_dir) -> None:
    directory, _ = random_dir
    loader = make_loader(directory, "sequence", "train")
    sampler = loader.sampler
    sampler.set_epoch(3)
    keys = list(iter(sampler))
    assert keys == [(3, g) for g in range(len(loader.dataset))]
    assert sampler.state_dict() == {
        "epoch": 3,
        "batches_consumed": len(keys),
        "world_size": loader.dataset.world_size,
        "batch_size": loader.dataset.batch_size,
    }
    fresh = make_loader(directory, "sequence", "train").sampler
    fresh.load_state_dict({"epoch": 3, "batches_consumed": 2})
    fresh.set_epoch(3)  # Lightning calls this at the epoch start; it must keep the offset
    assert len(fresh) == len(keys) - 2 and list(iter(fresh)) == keys[2:]
    fresh.set_epoch(4)
    assert list(iter(fresh)) == [(4, g) for g in range(len(keys))]


# ---------------------------------------------------------------------------------- content

ITEM_FEATURES = {
    "genre": ("categorical", [1, 2, 0, 3, 1, 2, 3, 1, 2, 3], 4),
    "tags": ("list", [[1], [], [2, 3], [4, 1, 2], [], [1], [2], [3], [], [4]], 5),
    "price": ("numeric", [1.5, float("nan"), 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 0),
}
USER_FEATURES = {
    "country": ("categorical", [2, 1, 0, 1], 3),
    "langs": ("list", [[1, 2], [], [3], [1]], 4),
    "age": ("numeric", [31.0, 42.0, float("nan"), 18.0], 0),
}
SEQUENCES = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10], [3, 9], [5]]


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    return write_prepared(
        tmp_path,
        SEQUENCES,
        num_items=10,
        item_features=ITEM_FEATURES,
        user_features=USER_FEATURES,
        row_group_size=2,
    )


def single_batch(directory: Path, model: str, stage: str, **kw: Any) -> dict[str, Any]:
    batches = list(make_loader(directory, model, stage, batch_size=16, **kw))
    assert len(batches) == 1
    batch = batches[0]
    order = torch.argsort(batch["user_idx"])
    assert torch.equal(order, torch.arange(len(order))), (
        "one window, unshuffled within the fixture's order"
    )
    return batch


def test_sasrec_batches(tiny_dir: Path) -> None:
    # Shuffling can reorder users; sort rows by user for comparison.
    batch = next(iter(make_loader(tiny_dir, "sequence", "train", batch_size=16, max_len=2)))
    rows = torch.argsort(batch["user_idx"])
    assert batch["user_idx"][rows].tolist() == [1, 2, 3]  # user 4 has a single training item
    # user 1: training part [1, 2, 3, 4] truncated to the last L+1 = 3 items [2, 3, 4].
    assert batch["input_ids"][rows].tolist() == [[2, 3], [7, 0], [3, 0]]
    assert batch["target_ids"][rows].tolist() == [[3, 4], [8, 0], [9, 0]]
    assert batch["lengths"][rows].tolist() == [2, 1, 1]
    assert (
        batch["input_ids"].dtype
        == batch["target_ids"].dtype
        == batch["lengths"].dtype
        == torch.int64
    )
    assert batch["weight"].dtype == torch.float32 and batch["input_ids"].shape == (3, 2)

    val = single_batch(tiny_dir, "sequence", "validate", max_len=3)
    assert val["user_idx"].tolist() == [1, 2]
    assert val["input_ids"].tolist() == [[2, 3, 4], [7, 8, 0]] and val["lengths"].tolist() == [3, 2]
    assert val["target"].tolist() == [5, 9]
    assert jagged(val["seen_values"], val["seen_lengths"]) == [[1, 2, 3, 4], [7, 8]]
    test = single_batch(tiny_dir, "sequence", "test", max_len=3)
    assert test["input_ids"].tolist() == [[3, 4, 5], [7, 8, 9]] and test["target"].tolist() == [
        6,
        10,
    ]
    assert jagged(test["seen_values"], test["seen_lengths"]) == [[1, 2, 3, 4, 5], [7, 8, 9]]


def test_two_tower_batches(tiny_dir: Path) -> None:
    batch = next(iter(make_loader(tiny_dir, "history", "train", batch_size=16, history_len=2)))
    kjt = batch["features"]
    assert kjt.keys() == [
        "history",
        "target",
        "user_id",
        "item_genre",
        "item_tags",
        "user_country",
        "user_langs",
    ]
    rows = [(u, t) for u, t in zip(batch["user_idx"].tolist(), batch["target"].tolist())]
    # user 1 (train [1, 2, 3, 4]) -> targets 2, 3, 4; user 2 ([7, 8]) -> 8; user 3 ([3, 9]) -> 9.
    assert sorted(rows) == [(1, 2), (1, 3), (1, 4), (2, 8), (3, 9)]
    i = rows.index((1, 4))
    d = {k: jagged(v.values(), v.lengths())[i] for k, v in kjt.to_dict().items()}
    assert d == {
        "history": [2, 3],
        "target": [4],
        "user_id": [1],
        "item_genre": [3],
        "item_tags": [4, 1, 2],
        "user_country": [2],
        "user_langs": [1, 2],
    }
    j = rows.index((2, 8))  # item 8 has no tags, user 2 no languages: zero-length entries
    d = {k: jagged(v.values(), v.lengths())[j] for k, v in kjt.to_dict().items()}
    assert d == {
        "history": [7],
        "target": [8],
        "user_id": [2],
        "item_genre": [1],
        "item_tags": [3],
        "user_country": [1],
        "user_langs": [],
    }
    assert batch["item_dense"].shape == (5, 1) and batch["item_dense"][i].tolist() == [4.0]
    assert batch["user_dense"][j].tolist() == [42.0]
    assert kjt.values().dtype == torch.int64 and batch["item_dense"].dtype == torch.float32

    val = single_batch(tiny_dir, "history", "validate", history_len=2)
    assert val["target"].tolist() == [5, 9]
    vd = val["features"].to_dict()
    assert jagged(vd["history"].values(), vd["history"].lengths()) == [[3, 4], [7, 8]]
    assert vd["item_genre"].values().tolist() == [1, 2] and vd["item_tags"].lengths().tolist() == [
        0,
        0,
    ]
    assert jagged(val["seen_values"], val["seen_lengths"]) == [[1, 2, 3, 4], [7, 8]]


def test_numeric_nan_becomes_zero_and_no_features_gives_empty_dense(
    tiny_dir: Path, tmp_path: Path
) -> None:
    directory = write_prepared(tmp_path / "plain", SEQUENCES, num_items=10)
    batch = next(iter(make_loader(directory, "history", "train", batch_size=16)))
    assert batch["item_dense"].shape == (5, 0) and batch["user_dense"].shape == (5, 0)
    assert batch["features"].keys() == ["history", "target", "user_id"]
    tables = load_feature_tables(tiny_dir, read_manifest(tiny_dir))
    assert tables.item.dense[2].tolist() == [0.0] and tables.user.dense[3].tolist() == [0.0]


def test_time_split(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    seqs = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    ts = [[10, 20, 30, 40], [35, 45], [10, 31, 32]]
    directory = write_prepared(
        tmp_path,
        seqs,
        timestamps=ts,
        num_items=9,
        split={"type": "time", "val_start": 30, "test_start": 40},
    )
    # train: user 1 [1, 2], user 2 [] (no training example), user 3 [7] (too short for SASRec)
    with caplog.at_level(logging.INFO, logger="recforge.data.datamodule"):
        dm = SequenceDataModule(str(directory), batch_size=4, eval_batch_size=4, max_len=3)
        dm.setup("fit")
    assert (
        "train (sequence batches): 1 examples from 3 users; "
        "2 users have none: 1 no interaction in the training part; "
        "1 training part shorter than 2 items (sequence batches)" in caplog.text
    )
    train = next(iter(dm.train_dataloader()))
    assert train["input_ids"].tolist() == [[1, 0, 0]] and train["target_ids"].tolist() == [
        [2, 0, 0]
    ]
    val = next(iter(dm.val_dataloader()))
    # validation [30, 40): user 1's item 3 (history [1, 2]), user 3's item 8 (history [7]); user 2's
    # validation item 5 has no history before it.
    assert val["user_idx"].tolist() == [1, 3] and val["target"].tolist() == [3, 8]
    assert val["input_ids"].tolist() == [[1, 2, 0], [7, 0, 0]]
    test = next(iter(dm.test_dataloader()))
    assert test["user_idx"].tolist() == [1, 2] and test["target"].tolist() == [4, 6]
    assert jagged(test["seen_values"], test["seen_lengths"]) == [[1, 2, 3], [5]]


# ------------------------------------------------------------------------------- datamodule


def test_datamodule_metadata_and_validation(tiny_dir: Path) -> None:
    dm = SequenceDataModule(str(tiny_dir), batch_format="history")
    assert dm.num_items == 10 and dm.num_users == 4
    assert dm.item_feature_cardinalities == {"genre": 4, "tags": 5}
    assert dm.user_feature_cardinalities == {"country": 3, "langs": 4}
    assert dm.item_numeric_features == ["price"] and dm.user_numeric_features == ["age"]
    assert dm.sparse_feature_keys == [
        "history",
        "target",
        "user_id",
        "item_genre",
        "item_tags",
        "user_country",
        "user_langs",
    ]
    assert dm.item_counts.tolist() == [0, 1, 1, 2, 1, 2, 1, 1, 1, 2, 1]
    with pytest.raises(ValueError, match="batch_size"):
        SequenceDataModule(str(tiny_dir), batch_size=0)
    with pytest.raises(ValueError, match="min_history"):
        SequenceDataModule(str(tiny_dir), min_history=-1)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        SequenceDataModule(str(tiny_dir / "nope"))


def test_lightning_keeps_sampler_and_reshuffles_each_epoch(random_dir) -> None:
    class Recorder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.epochs: list[list[int]] = []
            self.val_users: list[int] = []

        def on_train_epoch_start(self) -> None:
            self.epochs.append([])

        def training_step(self, batch: dict[str, Any], _: int) -> torch.Tensor:
            self.epochs[-1] += batch["user_idx"][batch["weight"] > 0].tolist()
            return self.layer(batch["weight"][:, None]).sum()

        def validation_step(self, batch: dict[str, Any], _: int) -> None:
            self.val_users += batch["user_idx"].tolist()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    directory, sequences = random_dir
    dm = SequenceDataModule(str(directory), batch_size=8, max_len=L, shuffle_window=20)
    module = Recorder()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    assert isinstance(trainer.train_dataloader.sampler, EpochBatchSampler)
    want = sorted(expected(sequences, "sequence", "train"))
    assert [sorted(e) for e in module.epochs] == [want, want]
    assert module.epochs[0] != module.epochs[1]  # set_epoch reached the sampler
    assert Counter(module.val_users) == Counter(
        list(expected(sequences, "sequence", "validate")) * 2
    )


class _DDPRecorder(pl.LightningModule):
    """Top-level (picklable for ddp_spawn): writes what each rank saw to ``out_dir``."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.out_dir = out_dir
        self.seen: dict[str, Any] = {"train": [], "val": [], "sampler": ""}

    def training_step(self, batch: dict[str, Any], _: int) -> torch.Tensor:
        self.seen["sampler"] = type(self.trainer.train_dataloader.sampler).__name__
        real = batch["weight"] > 0
        self.seen["train"].append(
            [self.current_epoch, batch["user_idx"][real].tolist(), batch["target"][real].tolist()]
        )
        return self.layer(batch["weight"][:, None]).sum()

    def validation_step(self, batch: dict[str, Any], _: int) -> None:
        self.seen["val"].append(batch["user_idx"][batch["weight"] > 0].tolist())

    def on_fit_end(self) -> None:
        Path(self.out_dir, f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow  # ~35 s on 2 cores: each spawned rank imports torch, TorchRec and Lightning
def test_ddp_two_ranks_two_workers_through_lightning(random_dir, tmp_path: Path) -> None:
    """Real DDP (gloo, 2 processes): Lightning keeps the sampler, calls set_epoch, ranks stay in
    step."""
    directory, sequences = random_dir
    dm = SequenceDataModule(
        str(directory),
        batch_format="history",
        batch_size=7,
        eval_batch_size=9,
        history_len=H,
        num_workers=2,
        shuffle_window=20,
    )
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(_DDPRecorder(str(tmp_path)), datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["sampler"] == "EpochBatchSampler" for r in ranks)
    per_epoch = [
        [sum(1 for e, _, _ in r["train"] if e == epoch) for r in ranks] for epoch in (0, 1)
    ]
    assert per_epoch[0][0] == per_epoch[0][1] == per_epoch[1][0] == per_epoch[1][1] > 0
    assert len(ranks[0]["val"]) == len(ranks[1]["val"])
    want = sorted(expected(sequences, "history", "train"))
    orders = []
    for epoch in (0, 1):
        got = [
            (u, t) for r in ranks for e, us, ts in r["train"] if e == epoch for u, t in zip(us, ts)
        ]
        assert sorted(got) == want
        orders.append(
            [(u, t) for e, us, ts in ranks[0]["train"] if e == epoch for u, t in zip(us, ts)]
        )
    assert orders[0] != orders[1]
    val = Counter(u for r in ranks for us in r["val"] for u in us)
    assert val == Counter([u for u, _ in expected(sequences, "history", "validate")] * 2)
