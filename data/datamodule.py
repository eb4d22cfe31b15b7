"""The LightningDataModule over a prepared directory (docs/architecture.md §1, §3): SASRec or
two-tower batches.

Batch construction and sharding live in :mod:`recforge.data.loader`; this module picks the rank and
world size from the trainer, builds the loaders, reports skipped users, and exposes the
dataset metadata a model needs (catalogue size, feature cardinalities, item counts for logQ).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from recforge.data import storage
from recforge.data.errors import DataError
from recforge.data.examples import (
    BATCH_FORMATS,
    STAGES,
    TRAIN_THROUGH,
    BatchFormat,
    ExampleIndex,
    ExampleSpec,
    Stage,
    TrainThrough,
    scan_examples,
)
from recforge.data.feature_tables import FeatureTables, load_feature_tables
from recforge.data.layout import ITEMS, MANIFEST, read_manifest
from recforge.data.loader import EpochBatchSampler, SequenceBatchDataset

log = logging.getLogger(__name__)

_SPARSE_KINDS = ("categorical", "list")


class SequenceDataModule(L.LightningDataModule):
    """Streams a prepared dataset directory as padded SASRec batches or two-tower KJT batches.

    Every rank yields the same number of batches per epoch and each example is seen exactly
    once per epoch across ranks and DataLoader workers (see :mod:`recforge.data.loader`).
    """

    def __init__(
        self,
        data_dir: str,
        batch_format: BatchFormat = "sequence",
        batch_size: int = 128,
        eval_batch_size: int = 256,
        max_len: int = 50,
        history_len: int = 50,
        min_history: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_window: int = 65_536,
        train_windows: Literal["last", "all"] = "last",
        train_through: TrainThrough = "train",
        synthesize: dict[str, Any] | None = None,
        eval_max_users: int | None = None,
    ) -> None:
        """
        Args:
            data_dir: A prepared dataset directory (written by ``recforge data prepare``).
            batch_format: ``sequence`` (padded id sequences) or ``history`` (KeyedJaggedTensor with
                features). Under ``recforge fit`` it is linked from the model's family, as are
                ``max_len``, ``history_len`` and ``seed``.
            batch_size: Training examples per batch on each rank.
            eval_batch_size: Validation/test examples per batch on each rank.
            max_len: SASRec: the sequence length L of ``input_ids``.
            history_len: Two-tower: the most recent items kept as the user's history H.
            min_history: Two-tower: the shortest history a training example may have (0 allows
                examples with an empty history).
            num_workers: DataLoader worker processes per rank (0 reads in the training process).
            seed: Seed of the per-epoch shuffle; the same seed gives the same batches.
            shuffle_window: Examples shuffled together: row groups are read in windows holding at
                least this many, and each DataLoader worker keeps its current window in memory,
                so a worker's memory is bounded by the window, whatever the dataset's size (a
                window's users' whole sequences: ~16 row groups at the default for SASRec
                batches; 100M interactions, 1M users: 0.75 GB peak RSS against 2.5 GB at
                1M examples). Row groups are permuted every epoch before being windowed.
            train_windows: SASRec training sequences: ``last`` keeps the last ``max_len`` targets
                of each user's training part (the SASRec paper); ``all`` cuts the whole training
                part into consecutive windows of ``max_len`` targets, so items beyond the last
                ``max_len`` of long histories are trained on too.
            train_through: ``train``: training targets come from each user's training part only,
                so validation measures items the model never trained on. ``validation``: a final
                refit that also trains on each user's validation item (the newest item before
                test, which on sparse data predicts it best). Validation is then no longer held
                out, so ``recforge fit`` runs no validation loop, no early stopping and no
                best-checkpoint choice: it trains ``trainer.max_epochs`` epochs (take the best
                epoch count of an earlier run that validated) and tests the final weights.
            synthesize: If set and ``data_dir`` holds no prepared dataset, generate synthetic data
                with these :class:`recforge.data.synth.SynthConfig` fields (e.g.
                ``{users: 500, items: 300}``) and prepare it into ``data_dir`` first. The tiny
                configs use it to run anywhere.
            eval_max_users: Validate/test on a fixed random sample of this many users (one
                example each; None: every eligible user). The sample depends on ``seed`` and the
                data only, so it is the same on every run and under any number of ranks; the
                test report states ``users_evaluated``/``users_eligible``/``sampled``.
        """
        super().__init__()
        if batch_format not in BATCH_FORMATS:
            raise ValueError(f"batch_format must be one of {BATCH_FORMATS}, got {batch_format!r}")
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("max_len", max_len, 1),
            ("history_len", history_len, 1),
            ("min_history", min_history, 0),
            ("num_workers", num_workers, 0),
            ("shuffle_window", shuffle_window, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if train_windows not in ("last", "all"):
            raise ValueError(f"train_windows must be 'last' or 'all', got {train_windows!r}")
        if train_through not in TRAIN_THROUGH:
            raise ValueError(f"train_through must be one of {TRAIN_THROUGH}, got {train_through!r}")
        if eval_max_users is not None and (
            isinstance(eval_max_users, bool)
            or not isinstance(eval_max_users, int)
            or eval_max_users < 1
        ):
            raise ValueError(
                f"eval_max_users must be an integer >= 1 or null, got {eval_max_users!r}"
            )
        self.eval_max_users = eval_max_users
        if train_windows == "all" and batch_format != "sequence":
            raise ValueError(
                "train_windows='all' cuts sequence batches; history batches already train "
                "on every position of the history (leave it at 'last')"
            )
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_format = batch_format
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.max_len, self.history_len, self.min_history = max_len, history_len, min_history
        self.num_workers, self.seed, self.shuffle_window = num_workers, seed, shuffle_window
        self.train_windows = train_windows
        self.train_through = train_through
        if synthesize is not None:
            if not storage.is_remote(data_dir):
                ensure_synthetic(data_dir, synthesize)
            elif not storage.exists(storage.join(data_dir, MANIFEST)):
                raise ValueError(
                    f"synthesize: generates data on local disk, and data_dir {data_dir!r} is "
                    "remote and holds no prepared dataset (write one there with `recforge data "
                    "prepare --out`)"
                )
        # Read now so a wrong path fails before any training starts, and so that a model built
        # before setup() (LightningCLI argument links) can read the metadata.
        self.manifest: dict[str, Any] = read_manifest(data_dir)
        for key in ("split", "users", "items"):
            if key not in self.manifest:
                raise DataError(
                    "manifest lacks a required field", path=f"{data_dir}/manifest.json", column=key
                )
        self._indexes: dict[Stage, ExampleIndex] | None = None
        self._features: FeatureTables | None = None
        self._item_counts: np.ndarray | None = None
        self._reported = False
        self.train_sampler: EpochBatchSampler | None = None

    # ----------------------------------------------------------------------------- metadata

    @property
    def num_items(self) -> int:
        """Items in the catalogue; ids are 1..num_items, so tables need num_items + 1 rows
        (0 = padding)."""
        return int(self.manifest["items"])

    @property
    def num_users(self) -> int:
        """Users; ids are 1..num_users (0 = padding)."""
        return int(self.manifest["users"])

    def _features_of(self, side: str, kinds: tuple[str, ...]) -> dict[str, int]:
        specs = self.manifest.get("features", {}).get(side, {})
        return {
            name: int(s.get("cardinality", 0))
            for name, s in specs.items()
            if s.get("kind") in kinds
        }

    @property
    def item_feature_cardinalities(self) -> dict[str, int]:
        """Categorical and list item features (KJT key ``item_<name>``) -> codes incl. 0, in KJT
        order."""
        return self._features_of("item", _SPARSE_KINDS)

    @property
    def user_feature_cardinalities(self) -> dict[str, int]:
        """Categorical and list user features (KJT key ``user_<name>``) -> codes incl. 0, in KJT
        order."""
        return self._features_of("user", _SPARSE_KINDS)

    @property
    def item_numeric_features(self) -> list[str]:
        """Columns of ``item_dense``, in order."""
        return list(self._features_of("item", ("numeric",)))

    @property
    def user_numeric_features(self) -> list[str]:
        """Columns of ``user_dense``, in order."""
        return list(self._features_of("user", ("numeric",)))

    @property
    def sparse_feature_keys(self) -> list[str]:
        """Keys of the two-tower ``features`` KeyedJaggedTensor, in order."""
        return (
            ["history", "target", "user_id"]
            + [f"item_{n}" for n in self.item_feature_cardinalities]
            + [f"user_{n}" for n in self.user_feature_cardinalities]
        )

    @property
    def item_counts(self) -> np.ndarray:
        """(num_items + 1,) int64 interactions per item id (index 0 = padding = 0), for logQ
        correction."""
        if self._item_counts is None:
            path = storage.join(self.data_dir, ITEMS)
            table = storage.read_table(path, columns=["item_idx", "count"])
            counts = np.zeros(self.num_items + 1, np.int64)
            ids = table.column("item_idx").to_numpy().astype(np.int64)
            if len(ids) and (ids.min() < 1 or ids.max() > self.num_items):
                raise DataError(
                    f"item ids must lie in 1..{self.num_items}", path=path, column="item_idx"
                )
            counts[ids] = table.column("count").to_numpy()
            self._item_counts = counts
        return self._item_counts

    # ------------------------------------------------------------------------------ loading

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return int(self.trainer.global_rank), int(self.trainer.world_size)

    def setup(self, stage: str | None = None) -> None:
        if self._indexes is None:
            specs = [
                ExampleSpec(
                    self.batch_format,
                    s,
                    max_len=self.max_len,
                    history_len=self.history_len,
                    min_history=self.min_history,
                    train_windows=self.train_windows,
                    train_through=self.train_through,
                )
                for s in STAGES
            ]
            self._indexes = dict(
                zip(STAGES, scan_examples(self.data_dir, self.manifest["split"], specs))
            )
            for s in ("validate", "test"):  # a fixed sample of users, from the data seed
                self._indexes[s] = self._indexes[s].sample(self.eval_max_users, self.seed)
        if self.batch_format == "history" and self._features is None:
            self._features = load_feature_tables(self.data_dir, self.manifest)
        if not self._reported and self._rank_world()[0] == 0:
            self._reported = True
            for index in self._indexes.values():
                log.info(_report(index))

    def _dataloader(self, stage: Stage) -> DataLoader:
        self.setup()
        assert self._indexes is not None
        index = self._indexes[stage]
        if stage == "train" and index.num_examples == 0:
            raise DataError(f"no training examples: {_report(index)}", path=self.data_dir)
        rank, world = self._rank_world()
        dataset = SequenceBatchDataset(
            self.data_dir,
            index,
            self.manifest["split"],
            rank=rank,
            world_size=world,
            seed=self.seed,
            batch_size=self.batch_size if stage == "train" else self.eval_batch_size,
            shuffle=stage == "train",
            shuffle_window=self.shuffle_window,
            features=self._features,
        )
        sampler = EpochBatchSampler(dataset)
        if stage == "train":
            self.train_sampler = sampler
        return DataLoader(
            dataset,
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def evaluation_users(self, stage: Stage) -> dict[str, Any]:
        """``users_evaluated``, ``users_eligible`` and ``sampled`` of an evaluation stage."""
        self.setup()
        assert self._indexes is not None
        index = self._indexes[stage]
        return {
            "users_evaluated": index.num_examples,
            "users_eligible": index.num_eligible,
            "sampled": index.sampled,
        }

    def train_dataloader(self) -> DataLoader:
        return self._dataloader("train")

    def val_dataloader(self) -> DataLoader:
        return self._dataloader("validate")

    def test_dataloader(self) -> DataLoader:
        return self._dataloader("test")


def ensure_synthetic(data_dir: str, fields: dict[str, Any]) -> None:
    """Generate and prepare synthetic data into ``data_dir`` unless it is already there.

    A file lock serialises ranks started together (torchrun); the loser finds the data ready.
    """
    import fcntl
    import tempfile
    from pathlib import Path

    from recforge.data.layout import MANIFEST
    from recforge.data.prepare import PrepareConfig, prepare
    from recforge.data.synth import SynthConfig, generate

    out = Path(data_dir)
    if (out / MANIFEST).is_file():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / MANIFEST).is_file():
            return
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.synth-") as tmp:
            raw = Path(tmp) / "raw"
            generate(SynthConfig(out=str(raw), **fields))
            prepare(
                PrepareConfig(
                    input=[str(raw / "interactions.parquet")],
                    out=str(out),
                    item_features=str(raw / "item_features.parquet"),
                    user_features=str(raw / "user_features.parquet"),
                )
            )
        log.info("synthesised and prepared %s", out)


def _report(index: ExampleIndex) -> str:
    spec = index.spec
    missing = sum(index.skipped.values())
    reasons = "; ".join(f"{n:,} {why}" for why, n in index.skipped.items() if n) or "none"
    refit = spec.stage == "train" and spec.train_through == "validation"
    stage = f"{spec.stage} through the validation items" if refit else spec.stage
    return (
        f"{stage} ({spec.batch_format} batches): "
        f"{index.num_examples:,} examples from {index.num_users:,} users; "
        f"{missing:,} users have none: {reasons}"
    )
