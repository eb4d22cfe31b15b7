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
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset, DistributedSampler, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recforge.data import storage
from recforge.data.errors import DataError
from recforge.data.layout import ITEMS, SEQUENCES, USERS, split_bounds
from recforge.data.ragged import gather_ragged

BatchFormat = Literal["sequence", "history"]
"""``sequence``: padded item sequences with a target at every position (SASRec family);
``history``: a KeyedJaggedTensor of history, target and features, one target per example
(two-tower family). Which family reads which format is said in :mod:`recforge.families`."""
BATCH_FORMATS: tuple[BatchFormat, ...] = ("sequence", "history")
Stage = Literal["train", "validate", "test"]
STAGES: tuple[Stage, ...] = ("train", "validate", "test")


@dataclass(frozen=True)
class ExampleSpec:
    """Which (user, t) pairs are examples; ``t`` indexes the user's sequence.

    For two-tower training t is the target position; for SASRec training t is the end of the
    training part (the window ends before it); for evaluation t is the target position.
    """

    batch_format: BatchFormat
    stage: Stage
    max_len: int = 50
    history_len: int = 50
    min_history: int = 1
    train_windows: Literal["last", "all"] = "last"
    """SASRec training: ``last`` takes the last ``max_len`` targets of each training part (the
    SASRec paper); ``all`` cuts the whole training part into windows of ``max_len`` targets."""

    def __post_init__(self) -> None:
        if self.batch_format not in BATCH_FORMATS:
            raise ValueError(
                f"batch_format must be one of {BATCH_FORMATS}, got {self.batch_format!r}"
            )
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        for name, low in (("max_len", 1), ("history_len", 1), ("min_history", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.train_windows not in ("last", "all"):
            raise ValueError(f"train_windows must be 'last' or 'all', got {self.train_windows!r}")

    @property
    def stride(self) -> int:
        """Distance in ``t`` between a user's consecutive examples."""
        windowed = (
            self.stage == "train"
            and self.batch_format == "sequence"
            and self.train_windows == "all"
        )
        return self.max_len if windowed else 1

    def per_user(
        self, lengths: np.ndarray, train_end: np.ndarray, val_end: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(count, t0)`` per user: the user's examples are ``t0 + i * stride``, ``i < count``."""
        if self.stage == "train":
            if self.batch_format == "sequence":
                if self.train_windows == "last":
                    return (train_end >= 2).astype(np.int64), train_end
                # Window ends train_end, train_end - L, ... while a window still has an input and
                # a target: every training target is predicted exactly once per epoch.
                count = np.where(train_end >= 2, (train_end - 2) // self.max_len + 1, 0)
                return count, train_end - np.maximum(count - 1, 0) * self.max_len
            return np.maximum(train_end - self.min_history, 0), np.full_like(
                train_end, self.min_history
            )
        # An evaluation example needs a target and a non-empty history (nothing to encode
        # otherwise); both models use the same rule so their metrics cover the same users.
        if self.stage == "validate":
            return ((val_end > train_end) & (train_end >= 1)).astype(np.int64), train_end
        return ((lengths > val_end) & (val_end >= 1)).astype(np.int64), val_end

    def skip_reasons(
        self, lengths: np.ndarray, train_end: np.ndarray, val_end: np.ndarray
    ) -> dict[str, int]:
        """Users with no example of this stage, counted per reason (for the setup report)."""
        if self.stage == "train":
            need = 2 if self.batch_format == "sequence" else self.min_history + 1
            return {
                "no interaction in the training part": int((train_end == 0).sum()),
                f"training part shorter than {need} items ({self.batch_format} batches)": int(
                    ((train_end > 0) & (train_end < need)).sum()
                ),
            }
        has_target, history = (
            ((val_end > train_end), train_end)
            if self.stage == "validate"
            else ((lengths > val_end), val_end)
        )
        return {
            f"no {'validation' if self.stage == 'validate' else 'test'} item": int(
                (~has_target).sum()
            ),
            "a target but no history before it": int((has_target & (history == 0)).sum()),
        }


@dataclass(frozen=True)
class ExampleIndex:
    """Examples per row group of ``sequences.parquet`` for one :class:`ExampleSpec`.

    After :meth:`sample`, ``counts`` are the kept examples per row group, ``eligible`` the
    counts before sampling and ``kept`` the sorted ordinals of the kept examples among the
    eligible ones (numbered in row-group, then row order).
    """

    spec: ExampleSpec
    counts: np.ndarray  # (R,) int64
    num_users: int
    skipped: dict[str, int]
    eligible: np.ndarray | None = None  # (R,) int64 before sampling; None: not sampled
    kept: np.ndarray | None = None  # (M,) int64 sorted ordinals of the kept examples

    @property
    def num_examples(self) -> int:
        return int(self.counts.sum())

    @property
    def num_eligible(self) -> int:
        """Examples before sampling (= :attr:`num_examples` when not sampled)."""
        return int((self.counts if self.eligible is None else self.eligible).sum())

    @property
    def sampled(self) -> bool:
        return self.kept is not None

    def sample(self, max_examples: int | None, seed: int) -> ExampleIndex:
        """Keep a uniform random sample of ``max_examples`` evaluation examples (users), fixed
        by ``seed`` and the data alone: the same on every run and under every rank split (the
        ranks split the kept examples afterwards). ``None`` or at least as many as there are:
        all of them, unsampled."""
        if self.kept is not None:
            raise ValueError("this index is already sampled")
        if max_examples is None or max_examples >= self.num_examples:
            return self
        if self.spec.stage == "train":
            raise ValueError("only evaluation examples (one per user) can be sampled")
        if max_examples < 1:
            raise ValueError(f"max_examples must be >= 1, got {max_examples}")
        n = self.num_examples
        stage = 1 if self.spec.stage == "validate" else 2
        rng = np.random.default_rng([int(seed), 0x5EED, stage])
        kept = np.sort(rng.choice(n, size=max_examples, replace=False)).astype(np.int64)
        bounds = np.concatenate([[0], np.cumsum(self.counts)])
        counts = np.diff(np.searchsorted(kept, bounds)).astype(np.int64)
        return ExampleIndex(self.spec, counts, self.num_users, self.skipped, self.counts, kept)

    def restrict(self, row_groups: list[int], per_user: np.ndarray) -> np.ndarray:
        """Per-user example counts (0/1) of the users of ``row_groups`` (read in that order)
        with the examples left out by :meth:`sample` set to 0."""
        if self.kept is None or self.eligible is None:
            return per_user
        starts = np.cumsum(self.eligible) - self.eligible
        ordinals = np.concatenate(
            [starts[g] + np.arange(self.eligible[g]) for g in row_groups] or [np.zeros(0, int)]
        )
        has = per_user > 0
        if int(has.sum()) != len(ordinals) or (len(per_user) and per_user.max() > 1):
            raise DataError("sampled example index does not match the data it was built from")
        out = np.zeros_like(per_user)
        pos = np.searchsorted(self.kept, ordinals)
        pos = np.minimum(pos, max(len(self.kept) - 1, 0))
        out[has] = (self.kept[pos] == ordinals).astype(per_user.dtype) if len(self.kept) else 0
        return out


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(flat values, per-row lengths)`` of a list column."""
    col = table.column(name).combine_chunks()
    return (
        col.flatten().to_numpy(zero_copy_only=False),
        pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64),
    )


def _read_bounds(
    pf: pq.ParquetFile, path: str, row_groups: list[int], split: dict[str, Any], with_items: bool
) -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray]:
    """Read row groups; return the table and per-user ``(lengths, train_end, val_end)``."""
    timed = split.get("type") == "time"
    columns = (
        ["length"]
        + (["timestamp"] if timed else [])
        + (["user_idx", "item_idx"] if with_items else [])
    )
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise DataError(
            "missing column in a prepared sequences file", path=str(path), column=missing[0]
        )
    table = pf.read_row_groups(row_groups, columns=columns)
    lengths = table.column("length").to_numpy().astype(np.int64)
    if len(lengths) and lengths.min() < 1:
        raise DataError(
            "every user needs at least one interaction", path=str(path), column="length"
        )
    flat_ts = None
    if timed:
        flat_ts, ts_lengths = _list_column(table, "timestamp")
        if not np.array_equal(ts_lengths, lengths):
            raise DataError(
                "list lengths disagree with 'length'", path=str(path), column="timestamp"
            )
    train_end, val_end = split_bounds(split, lengths, flat_ts)
    return table, lengths, train_end, val_end


_SCAN_BYTES = 32 << 20


def _scan_groups(pf: pq.ParquetFile, split: dict[str, Any]) -> Iterator[list[int]]:
    """Runs of consecutive row groups whose scanned columns hold at most ``_SCAN_BYTES``
    (uncompressed), read together: on object storage one request per run instead of one per
    row group (memory stays bounded by the run)."""
    wanted = {"length"} | ({"timestamp"} if split.get("type") == "time" else set())
    group: list[int] = []
    size = 0
    for rg in range(pf.num_row_groups):
        meta = pf.metadata.row_group(rg)
        rg_size = sum(
            meta.column(j).total_uncompressed_size
            for j in range(meta.num_columns)
            if meta.column(j).path_in_schema.split(".")[0] in wanted
        )
        if group and size + rg_size > _SCAN_BYTES:
            yield group
            group, size = [], 0
        group.append(rg)
        size += rg_size
    if group:
        yield group


def scan_examples(
    data_dir: str | Path, split: dict[str, Any], specs: list[ExampleSpec]
) -> list[ExampleIndex]:
    """Count examples per row group for each spec in one pass (no item lists are read)."""
    path = storage.join(data_dir, SEQUENCES)
    pf = storage.parquet_file(path)
    counts = [np.zeros(pf.num_row_groups, np.int64) for _ in specs]
    skipped: list[dict[str, int]] = [{} for _ in specs]
    for group in _scan_groups(pf, split):
        _, lengths, train_end, val_end = _read_bounds(pf, path, group, split, with_items=False)
        rows = [pf.metadata.row_group(rg).num_rows for rg in group]
        for rg, lo, hi in zip(group, np.cumsum([0, *rows[:-1]]), np.cumsum(rows)):
            part = (lengths[lo:hi], train_end[lo:hi], val_end[lo:hi])
            for i, spec in enumerate(specs):
                counts[i][rg] = spec.per_user(*part)[0].sum()
                for reason, n in spec.skip_reasons(*part).items():
                    skipped[i][reason] = skipped[i].get(reason, 0) + n
    users = pf.metadata.num_rows
    return [ExampleIndex(s, c, users, k) for s, c, k in zip(specs, counts, skipped)]


@dataclass(frozen=True)
class FeatureTable:
    """Encoded features of items or users, indexed by ``item_idx``/``user_idx`` (row 0 = padding).

    ``sparse_columns``: categorical and list features in manifest order, each ``(offsets (N + 2,),
    codes)``; a categorical feature has one code per row (none for the padding row).
    """

    sparse_columns: dict[str, tuple[np.ndarray, np.ndarray]]
    cardinalities: dict[str, int]
    dense_names: list[str]
    dense: np.ndarray  # (N + 1, n_numeric) float32, NaN and null -> 0

    def sparse(self, ids: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per sparse feature, ``(codes, lengths)`` of the rows ``ids`` (jagged)."""
        out = {}
        for name, (offsets, codes) in self.sparse_columns.items():
            lens = offsets[ids + 1] - offsets[ids]
            out[name] = (gather_ragged(codes, offsets[ids], lens), lens)
        return out


@dataclass(frozen=True)
class FeatureTables:
    item: FeatureTable
    user: FeatureTable


def load_feature_table(
    path: str | Path, id_column: str, num_rows: int, features: dict[str, dict[str, Any]]
) -> FeatureTable:
    """Read ``items.parquet``/``users.parquet`` features as described by the manifest."""
    names = storage.read_schema(path).names
    for column in [id_column, *features]:
        if column not in names:
            raise DataError(
                "column named by the manifest is missing", path=str(path), column=column
            )
    table = storage.read_table(path, columns=[id_column, *features])
    ids = table.column(id_column).to_numpy().astype(np.int64)
    if not np.array_equal(np.sort(ids), np.arange(1, num_rows + 1)):
        raise DataError(
            f"ids must be exactly 1..{num_rows} (the manifest's count)",
            path=str(path),
            column=id_column,
        )
    table = table.take(pa.array(np.argsort(ids)))  # row i <-> id i + 1
    sparse: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    cards: dict[str, int] = {}
    dense_names: list[str] = []
    dense_cols: list[np.ndarray] = []
    for name, spec in features.items():
        kind, col = spec.get("kind"), table.column(name)
        if kind == "numeric":
            values = col.to_numpy(zero_copy_only=False).astype(np.float32)
            dense_names.append(name)
            dense_cols.append(
                np.nan_to_num(np.concatenate([[0.0], values]).astype(np.float32), nan=0.0)
            )
            continue
        if kind == "categorical":
            codes = pc.fill_null(col, 0).to_numpy().astype(np.int64)
            lens = np.ones(num_rows, np.int64)
        elif kind == "list":
            codes, lens = _list_column(table, name)
            codes = codes.astype(np.int64)
        else:
            raise DataError(
                f"manifest feature kind {kind!r}: expected categorical, list or numeric",
                path=str(path),
                column=name,
            )
        card = int(spec.get("cardinality", 0))
        if len(codes) and (codes.min() < 0 or codes.max() >= card):
            raise DataError(
                f"codes must lie in [0, cardinality={card})", path=str(path), column=name
            )
        sparse[name] = (np.concatenate([[0, 0], np.cumsum(lens)]), codes)
        cards[name] = card
    dense = np.stack(dense_cols, axis=1) if dense_cols else np.zeros((num_rows + 1, 0), np.float32)
    return FeatureTable(sparse, cards, dense_names, dense)


def load_feature_tables(data_dir: str | Path, manifest: dict[str, Any]) -> FeatureTables:
    features = manifest.get("features", {})
    return FeatureTables(
        item=load_feature_table(
            storage.join(data_dir, ITEMS),
            "item_idx",
            int(manifest["items"]),
            features.get("item", {}),
        ),
        user=load_feature_table(
            storage.join(data_dir, USERS),
            "user_idx",
            int(manifest["users"]),
            features.get("user", {}),
        ),
    )


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
            table, lengths, train_end, val_end = _read_bounds(
                self._file,
                self.path,
                [int(g) for g in plan.windows[w]],
                self.split,
                with_items=True,
            )
            items, item_lengths = _list_column(table, "item_idx")
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
