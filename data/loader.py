"""Batches from a prepared directory, sharded over ranks and DataLoader workers.

One epoch is a deterministic *plan* computed from ``(seed, epoch)`` alone, so every rank and
every worker derives the same plan without communicating:

1. Row groups of ``sequences.parquet`` (those holding at least one example) are permuted.
2. They are walked in *shuffle windows*: runs of consecutive (permuted) row groups holding at
   least ``shuffle_window`` examples. Examples are permuted within each window, and the
   windows' permutations are concatenated into one epoch *stream*.
3. The stream is cut into global batches of ``batch_size * world_size`` examples; a global
   batch may straddle two windows, which is how a window's remainder is carried into the next
   and only the last global batch is partial. Rank ``r`` takes the contiguous slice
   ``[r * B, (r + 1) * B)`` of each global batch; the last one is split as evenly as possible,
   and a rank left with nothing gets one filler row (a copy of a real example, weight 0).
   Hence every example appears once per epoch and every rank yields ``ceil(N / (B * world))``
   batches, which collectives need.

The sampler yields ``(epoch, batch_index)`` keys; the DataLoader (``batch_size=None``) sends key
``g`` to worker ``g % num_workers``, and each worker keeps the windows its current batch touches
in memory, so it reads each window once per epoch. Evaluation uses the same machinery without
shuffling. This module does not import Lightning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset, DistributedSampler, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recforge.data import storage
from recforge.data.errors import DataError
from recforge.data.examples import ExampleIndex, read_bounds
from recforge.data.feature_tables import FeatureTables
from recforge.data.layout import SEQUENCES
from recforge.data.ragged import gather_ragged, list_column


class EpochPlan:
    """Windows and batch slices of one epoch; a pure function of its arguments."""

    def __init__(
        self,
        counts: np.ndarray,
        *,
        epoch: int,
        seed: int,
        shuffle: bool,
        shuffle_window: int,
        batch_size: int,
        world_size: int,
    ) -> None:
        self.epoch, self.seed, self.shuffle = epoch, seed, shuffle
        self.batch_size, self.world_size = batch_size, world_size
        self.num_examples = int(counts.sum())
        order = np.flatnonzero(counts > 0)  # empty row groups are never read
        if shuffle:
            order = np.random.default_rng([seed, epoch]).permutation(order)
        windows: list[np.ndarray] = []
        starts, begin, total = [0], 0, 0
        for i, rg in enumerate(order):
            total += int(counts[rg])
            if total - starts[-1] >= shuffle_window or i == len(order) - 1:
                windows.append(order[begin : i + 1])
                starts.append(total)
                begin = i + 1
        self.windows = windows
        self.window_starts = np.asarray(starts, np.int64)  # (W + 1,)

    @staticmethod
    def count_batches(num_examples: int, batch_size: int, world_size: int) -> int:
        return -(-num_examples // (batch_size * world_size))

    @property
    def num_batches(self) -> int:
        return self.count_batches(self.num_examples, self.batch_size, self.world_size)

    def rank_positions(self, batch_index: int, rank: int) -> tuple[np.ndarray, bool]:
        """Stream positions of ``rank``'s share of global batch ``batch_index``; True if filler."""
        if not 0 <= batch_index < self.num_batches:
            raise IndexError(f"batch {batch_index} out of range [0, {self.num_batches})")
        size = self.batch_size * self.world_size
        start = batch_index * size
        rest = min(size, self.num_examples - start)
        if rest == size:
            lo, n = start + rank * self.batch_size, self.batch_size
        else:
            base, extra = divmod(rest, self.world_size)
            lo, n = start + rank * base + min(rank, extra), base + (rank < extra)
        if n == 0:
            return np.asarray([start], np.int64), True
        return np.arange(lo, lo + n, dtype=np.int64), False

    def window_permutation(self, window: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        n = int(self.window_starts[window + 1] - self.window_starts[window])
        return np.random.default_rng([self.seed, self.epoch, window]).permutation(n)


@dataclass
class _Window:
    """The rows of one shuffle window, as flat arrays, and its example permutation."""

    user_idx: np.ndarray  # (U,) int64
    seq_start: np.ndarray  # (U,) int64, offset of each user's sequence in ``items``
    items: np.ndarray  # (sum of lengths,) int32
    example_start: np.ndarray  # (U + 1,) int64, cumulative example counts
    t0: np.ndarray  # (U,) int64
    permutation: np.ndarray | None
    stride: int = 1

    def examples(self, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(user row, t)`` of window-local stream positions."""
        e = local if self.permutation is None else self.permutation[local]
        row = np.searchsorted(self.example_start, e, side="right") - 1
        return row, self.t0[row] + (e - self.example_start[row]) * self.stride


def _pad(flat: np.ndarray, starts: np.ndarray, lens: np.ndarray, width: int) -> torch.Tensor:
    """Right-padded (B, width) int64 of the slices ``flat[starts[i]:starts[i] + lens[i]]``."""
    j = np.arange(width)
    mask = j < lens[:, None]  # (B, width)
    if len(flat) == 0:
        return torch.zeros(mask.shape, dtype=torch.int64)
    picked = flat[np.where(mask, starts[:, None] + j, 0)]
    return torch.from_numpy(np.where(mask, picked, 0).astype(np.int64))


def _tensor(a: np.ndarray, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


class SequenceBatchDataset(Dataset):
    """Map-style dataset of whole batches keyed by ``(epoch, batch_index)`` for one rank.

    Use with :class:`EpochBatchSampler` and ``DataLoader(batch_size=None)``.
    """

    def __init__(
        self,
        data_dir: str | Path,
        index: ExampleIndex,
        split: dict[str, Any],
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_window: int = 65_536,
        features: FeatureTables | None = None,
    ) -> None:
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("world_size", world_size, 1),
            ("shuffle_window", shuffle_window, 1),
            ("rank", rank, 0),
        ):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
        if index.spec.batch_format == "history" and features is None:
            raise ValueError("features: history batches need the item and user feature tables")
        self.path = storage.join(data_dir, SEQUENCES)
        self.index, self.spec, self.split = index, index.spec, split
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.shuffle_window = seed, shuffle, shuffle_window
        self.features = features
        self._num_batches = EpochPlan.count_batches(index.num_examples, batch_size, world_size)
        self._file: pq.ParquetFile | None = None
        self._pid = os.getpid()
        self._plan: EpochPlan | None = None
        self._windows: dict[int, _Window] = {}

    def __len__(self) -> int:
        return self._num_batches

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes open their own file handle and fill their own caches.
        return {**self.__dict__, "_file": None, "_plan": None, "_windows": {}}

    def plan(self, epoch: int) -> EpochPlan:
        if self._plan is None or self._plan.epoch != epoch:
            self._plan = EpochPlan(
                self.index.counts,
                epoch=epoch,
                seed=self.seed,
                shuffle=self.shuffle,
                shuffle_window=self.shuffle_window,
                batch_size=self.batch_size,
                world_size=self.world_size,
            )
            self._windows = {}
        return self._plan

    def _window(self, plan: EpochPlan, w: int) -> _Window:
        if w not in self._windows:
            if self._file is None or self._pid != os.getpid():
                # A forked worker must not share the parent's file handle.
                self._file, self._pid = storage.parquet_file(self.path), os.getpid()
            table, lengths, train_end, val_end = read_bounds(
                self._file,
                self.path,
                [int(g) for g in plan.windows[w]],
                self.split,
                with_items=True,
            )
            items, item_lengths = list_column(table, "item_idx")
            if not np.array_equal(item_lengths, lengths):
                raise DataError(
                    "list lengths disagree with 'length'", path=str(self.path), column="item_idx"
                )
            counts, t0 = self.spec.per_user(lengths, train_end, val_end)
            counts = self.index.restrict([int(g) for g in plan.windows[w]], counts)
            self._windows[w] = _Window(
                user_idx=table.column("user_idx").to_numpy().astype(np.int64),
                seq_start=np.cumsum(lengths) - lengths,
                items=items,
                example_start=np.concatenate([[0], np.cumsum(counts)]),
                t0=t0.astype(np.int64),
                permutation=plan.window_permutation(w),
                stride=self.spec.stride,
            )
        return self._windows[w]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, g = key
        plan = self.plan(epoch)
        positions, filler = plan.rank_positions(g, self.rank)
        window_ids = np.searchsorted(plan.window_starts, positions, side="right") - 1
        for stale in [w for w in self._windows if w < window_ids[0]]:
            del self._windows[stale]
        parts = []  # (user_idx, segment values, segment lengths, t) per window touched
        for w in np.unique(window_ids):
            win = self._window(plan, int(w))
            row, t = win.examples(positions[window_ids == w] - plan.window_starts[w])
            lo, hi = self._segment(t)
            parts.append(
                (
                    win.user_idx[row],
                    gather_ragged(win.items, win.seq_start[row] + lo, hi - lo),
                    hi - lo,
                )
            )
        info = get_worker_info()
        if g + (info.num_workers if info else 1) >= len(self):
            self._windows = {}  # this process serves no later batch this epoch: free the memory
        user_idx = np.concatenate([p[0] for p in parts])
        values = np.concatenate([p[1] for p in parts]).astype(np.int64)
        seg_len = np.concatenate([p[2] for p in parts])
        weight = torch.full((len(user_idx),), 0.0 if filler else 1.0)
        batch = self._build(user_idx, values, seg_len)
        return {**batch, "user_idx": _tensor(user_idx), "weight": weight}

    def _segment(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The part ``seq[lo:hi]`` of each user's sequence a batch needs."""
        if self.spec.stage != "train":
            return np.zeros_like(t), t + 1  # whole history (for seen-item filtering) + target
        if self.spec.batch_format == "sequence":
            return np.maximum(t - self.spec.max_len - 1, 0), t
        return np.maximum(t - self.spec.history_len, 0), t + 1

    def _build(
        self, user_idx: np.ndarray, values: np.ndarray, seg_len: np.ndarray
    ) -> dict[str, Any]:
        seg_start = np.cumsum(seg_len) - seg_len
        batch: dict[str, Any] = {}
        if self.spec.stage == "train" and self.spec.batch_format == "sequence":
            # The segment is the last L + 1 training items; inputs drop its last, targets its first.
            lengths = seg_len - 1
            batch["input_ids"] = _pad(values, seg_start, lengths, self.spec.max_len)  # (B, L)
            batch["target_ids"] = _pad(values, seg_start + 1, lengths, self.spec.max_len)  # (B, L)
            batch["lengths"] = _tensor(lengths)
            return batch
        # Otherwise the segment is (some of) the history followed by the target.
        hist_total = seg_len - 1
        target = values[seg_start + hist_total]
        width = self.spec.max_len if self.spec.batch_format == "sequence" else self.spec.history_len
        hist_len = np.minimum(hist_total, width)
        hist_start = seg_start + hist_total - hist_len
        if self.spec.stage != "train":
            batch["seen_values"] = _tensor(gather_ragged(values, seg_start, hist_total))  # (S,)
            batch["seen_lengths"] = _tensor(hist_total)  # (B,)
        batch["target"] = _tensor(target)
        if self.spec.batch_format == "sequence":
            batch["input_ids"] = _pad(values, hist_start, hist_len, width)  # (B, L)
            batch["lengths"] = _tensor(hist_len)
            return batch
        assert self.features is not None
        history = gather_ragged(values, hist_start, hist_len)
        keys = ["history", "target", "user_id"]
        vals: list[np.ndarray] = [history, target, user_idx]
        lens: list[np.ndarray] = [hist_len, np.ones_like(target), np.ones_like(target)]
        for prefix, table, ids in (
            ("item", self.features.item, target),
            ("user", self.features.user, user_idx),
        ):
            for name, (fv, fl) in table.sparse(ids).items():
                keys.append(f"{prefix}_{name}")
                vals.append(fv)
                lens.append(fl)
            batch[f"{prefix}_dense"] = torch.from_numpy(table.dense[ids])  # (B, n_numeric)
        batch["features"] = KeyedJaggedTensor(
            keys=keys,
            values=_tensor(np.concatenate(vals)),
            lengths=_tensor(np.concatenate(lens), torch.int32),
            stride=len(target),
            length_per_key=[int(x.sum()) for x in lens],
        )
        return batch


class EpochBatchSampler(DistributedSampler):
    """Yields this rank's ``(epoch, batch_index)`` keys; every rank yields the same number.

    A :class:`~torch.utils.data.DistributedSampler` so that Lightning keeps it (it only injects
    its own sampler when the existing one is not one) and calls :meth:`set_epoch` each epoch.
    ``state_dict`` records the epoch and the number of keys handed out; with worker processes
    that runs ahead of the trainer by the prefetch depth, so a resume should load the trainer's
    own count of finished batches instead. It also records the world size and per-rank batch
    size, which define a global batch: a state saved under others is converted by examples
    consumed (rounded down to a whole global batch, so no example is skipped).
    """

    def __init__(self, dataset: SequenceBatchDataset) -> None:
        super().__init__(
            dataset,
            num_replicas=dataset.world_size,
            rank=dataset.rank,
            shuffle=dataset.shuffle,
            seed=dataset.seed,
            drop_last=False,
        )
        self.num_samples = self._total = len(dataset)
        self._resume_from = self._consumed = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        start, self._resume_from = self._resume_from, 0
        self._consumed = start
        for g in range(start, self._total):
            self._consumed = g + 1
            yield self.epoch, g

    def __len__(self) -> int:
        return self._total - self._resume_from

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._resume_from = 0  # a resume offset belongs to the epoch it was saved in
        super().set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "batches_consumed": self._consumed,
            "world_size": self.dataset.world_size,
            "batch_size": self.dataset.batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        consumed = int(state["batches_consumed"])
        world = int(state.get("world_size", self.dataset.world_size))
        size = int(state.get("batch_size", self.dataset.batch_size))
        if (world, size) != (self.dataset.world_size, self.dataset.batch_size):
            consumed = self._convert(consumed, world, size)
        if not 0 <= consumed <= self._total:
            raise ValueError(f"batches_consumed {consumed} out of range [0, {self._total}]")
        self.epoch = int(state["epoch"])
        self._resume_from = self._consumed = consumed

    def _convert(self, consumed: int, world: int, size: int) -> int:
        """The batch index under this world size and batch size at which to resume a position
        of ``consumed`` global batches of ``size`` x ``world`` examples: the examples consumed,
        rounded down to a whole global batch, so none is skipped and the rest are seen twice."""
        total = self.dataset.index.num_examples
        old_total = EpochPlan.count_batches(total, size, world)
        if not 0 <= consumed <= old_total:
            raise ValueError(
                f"batches_consumed {consumed} out of range [0, {old_total}] for world size "
                f"{world} x batch size {size}"
            )
        examples = min(consumed * size * world, total)
        new_size = self.dataset.batch_size * self.dataset.world_size
        batch = self._total if examples == total else examples // new_size
        again = min(examples, total) - min(batch * new_size, total)
        if self.dataset.rank == 0:
            logging.getLogger(__name__).info(
                "resuming mid-epoch under world size %d x batch size %d (saved under %d x %d): "
                "%d examples consumed -> batch %d of %d; %d examples are seen twice",
                self.dataset.world_size,
                self.dataset.batch_size,
                world,
                size,
                examples,
                batch,
                self._total,
                again,
            )
        return batch
