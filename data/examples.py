"""Which (user, position) pairs are the examples of each stage, found by one scan of
``sequences.parquet``: the example *index* the loader's epoch plans (``data/loader.py``) draw
batches from, and the batch formats and stages they are for."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recforge.data import storage
from recforge.data.errors import DataError
from recforge.data.layout import SEQUENCES, split_bounds
from recforge.data.ragged import list_column

BatchFormat = Literal["sequence", "history"]
"""``sequence``: padded item sequences with a target at every position (SASRec family);
``history``: a KeyedJaggedTensor of history, target and features, one target per example
(two-tower family). Which family reads which format is said in :mod:`recforge.families`."""
BATCH_FORMATS: tuple[BatchFormat, ...] = ("sequence", "history")
TrainThrough = Literal["train", "validation"]
"""Which split part training targets come from: ``train`` (the default; validation measures
unseen items) or ``validation`` too (a final refit, after the epochs were chosen on validation:
training then also predicts each user's validation item, so validation is no longer held out)."""
TRAIN_THROUGH: tuple[TrainThrough, ...] = ("train", "validation")
Stage = Literal["train", "validate", "test"]
STAGES: tuple[Stage, ...] = ("train", "validate", "test")


def trained_end(train_end: np.ndarray, val_end: np.ndarray, through: TrainThrough) -> np.ndarray:
    """Per user, the end of the prefix trained on (or, for the baselines, counted):
    ``seq[:train_end]``, or through the validation part ``seq[:val_end]``."""
    return val_end if through == "validation" else train_end


@dataclass(frozen=True)
class ExampleSpec:
    """Which (user, t) pairs are examples; ``t`` indexes the user's sequence.

    For two-tower training t is the target position; for SASRec training t is the end of the
    trained part (the window ends before it): the training part, or with ``train_through:
    validation`` the training and validation parts; for evaluation t is the target position.
    """

    batch_format: BatchFormat
    stage: Stage
    max_len: int = 50
    history_len: int = 50
    min_history: int = 1
    train_windows: Literal["last", "all"] = "last"
    """SASRec training: ``last`` takes the last ``max_len`` targets of each training part (the
    SASRec paper); ``all`` cuts the whole training part into windows of ``max_len`` targets."""
    train_through: TrainThrough = "train"
    """Training examples end with the training part, or with the validation part too."""

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
        if self.train_through not in TRAIN_THROUGH:
            raise ValueError(
                f"train_through must be one of {TRAIN_THROUGH}, got {self.train_through!r}"
            )

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
            train_end = trained_end(train_end, val_end, self.train_through)
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
            train_end = trained_end(train_end, val_end, self.train_through)
            need = 2 if self.batch_format == "sequence" else self.min_history + 1
            part = "training part" if self.train_through == "train" else "trained part"
            return {
                f"no interaction in the {part}": int((train_end == 0).sum()),
                f"{part} shorter than {need} items ({self.batch_format} batches)": int(
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


def read_bounds(
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
        flat_ts, ts_lengths = list_column(table, "timestamp")
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
        _, lengths, train_end, val_end = read_bounds(pf, path, group, split, with_items=False)
        rows = [pf.metadata.row_group(rg).num_rows for rg in group]
        for rg, lo, hi in zip(group, np.cumsum([0, *rows[:-1]]), np.cumsum(rows)):
            part = (lengths[lo:hi], train_end[lo:hi], val_end[lo:hi])
            for i, spec in enumerate(specs):
                counts[i][rg] = spec.per_user(*part)[0].sum()
                for reason, n in spec.skip_reasons(*part).items():
                    skipped[i][reason] = skipped[i].get(reason, 0) + n
    users = pf.metadata.num_rows
    return [ExampleIndex(s, c, users, k) for s, c, k in zip(specs, counts, skipped)]
