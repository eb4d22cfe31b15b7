"""Non-learned baselines, scored through the same :class:`~trainer.metrics.RankingEvaluator`.

Both read a prepared directory (``data/layout.py``) and evaluate leave-one-out examples of one
stage exactly as the data loader defines them: for ``validate`` the target is
``seq[train_end]`` and the history ``seq[:train_end]``; for ``test`` the target is
``seq[val_end]`` and the history ``seq[:val_end]``; a user needs a target and a non-empty
history (the loader's rule, so baselines and models cover the same users).

Statistics are counted over *everything before the evaluated part*, for every user: the
training parts for ``validate``, the training and validation parts for ``test``: the data of a
refit (``data.train_through: validation``). ``through="train"`` counts the training parts for
``test`` too, the data of a default fit (and of the published SASRec benchmarks), so a model
and the baselines compare on equal data. No evaluation target is ever counted. These counts are
also the ``item_popularity`` given to the evaluator, so ``popularity@K`` means "count in the data
a model could have seen".

- ``most_popular``: items ordered by interaction count.
- ``markov``: first-order Markov chain on the last history item ``a``: score = number of
  transitions ``a -> b`` between consecutive items of the counted parts (all users), ties and
  items never seen after ``a`` ordered by popularity, then by the evaluator's tie rule.
- ``ease``: EASE (Steck 2019), a closed-form item-item model fitted on the binary user x item
  matrix of the counted parts and applied to each example's history; see
  :mod:`recforge.trainer.evaluation.ease` for the model, its options and its cost.

Popularity and Markov scores are integer ranks rather than raw counts, so that float32
comparisons stay exact whatever the counts (see :func:`_markov_scores`).

Everything is vectorised over users, so ML-1M takes a few seconds on CPU (EASE included).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.compute as pc
import torch

from recforge.data import storage
from recforge.data.examples import TRAIN_THROUGH, TrainThrough, trained_end
from recforge.data.layout import SEQUENCES, read_manifest, split_bounds
from recforge.data.ragged import gather_ragged
from recforge.trainer.evaluation.ease import (
    DEFAULT_LAMBDA,
    DEFAULT_MAX_ITEMS,
    EaseModel,
    check_ease_options,
    fit_ease,
)
from recforge.trainer.evaluation.metrics import RankingEvaluator

BaselineName = Literal["most_popular", "markov", "ease"]
BASELINES: tuple[str, ...] = ("most_popular", "markov", "ease")
EvalStage = Literal["validate", "test"]


@dataclass(frozen=True)
class _Sequences:
    """All users' sequences as one flat array, with per-user offsets and split bounds."""

    items: np.ndarray  # (sum of lengths,) int64
    starts: np.ndarray  # (U,) int64
    lengths: np.ndarray  # (U,) int64
    train_end: np.ndarray  # (U,) int64
    val_end: np.ndarray  # (U,) int64
    num_items: int


def load_sequences(data_dir: str | Path) -> _Sequences:
    manifest = read_manifest(data_dir)
    split = manifest["split"]
    columns = ["length", "item_idx"] + (["timestamp"] if split.get("type") == "time" else [])
    table = storage.read_table(storage.join(data_dir, SEQUENCES), columns=columns)
    lengths = table.column("length").to_numpy().astype(np.int64)
    items = pc.list_flatten(table.column("item_idx")).to_numpy().astype(np.int64)
    flat_ts = None
    if "timestamp" in columns:
        flat_ts = pc.list_flatten(table.column("timestamp")).to_numpy()
    train_end, val_end = split_bounds(split, lengths, flat_ts)
    starts = np.cumsum(lengths) - lengths
    return _Sequences(items, starts, lengths, train_end, val_end, int(manifest["items"]))


def counted_through(stage: EvalStage, through: TrainThrough | None) -> TrainThrough:
    """The last split part counted for ``stage``: everything before it unless ``through`` says
    less; counting the validation part for ``validate`` would count its targets."""
    if stage not in ("validate", "test"):
        raise ValueError(f"stage must be 'validate' or 'test', got {stage!r}")
    if through is None:
        return "train" if stage == "validate" else "validation"
    if through not in TRAIN_THROUGH:
        raise ValueError(f"through must be one of {TRAIN_THROUGH}, got {through!r}")
    if stage == "validate" and through == "validation":
        raise ValueError(
            "through='validation' with stage 'validate' would count the validation targets; "
            "the validate stage counts the training parts only"
        )
    return through


def _counted_mask(
    seqs: _Sequences, stage: EvalStage, through: TrainThrough | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(mask over flat items counted as known, per-user end of the counted prefix)``."""
    end = trained_end(seqs.train_end, seqs.val_end, counted_through(stage, through))
    position = np.arange(len(seqs.items)) - np.repeat(seqs.starts, seqs.lengths)
    return position < np.repeat(end, seqs.lengths), end


def popularity_counts(
    seqs: _Sequences, stage: EvalStage, through: TrainThrough | None = None
) -> np.ndarray:
    """``(N + 1,)`` interaction count per item over the parts before ``stage``'s targets."""
    known, _ = _counted_mask(seqs, stage, through)
    return np.bincount(seqs.items[known], minlength=seqs.num_items + 1).astype(np.int64)


@dataclass(frozen=True)
class Transitions:
    """Counts of ``a -> b`` between consecutive items, as CSR rows indexed by ``a``."""

    indptr: np.ndarray  # (N + 2,)
    next_item: np.ndarray  # (T,) int64
    count: np.ndarray  # (T,) int64

    def row(self, a: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.indptr[a], self.indptr[a + 1]
        return self.next_item[lo:hi], self.count[lo:hi]


def transition_counts(
    seqs: _Sequences, stage: EvalStage, through: TrainThrough | None = None
) -> Transitions:
    """Transitions inside each user's counted prefix (never crossing users or into a target)."""
    known, _ = _counted_mask(seqs, stage, through)
    # A pair (i, i + 1) counts when both ends are known; known items form a per-user prefix, so
    # "i + 1 known" also guarantees i + 1 belongs to the same user.
    src = np.flatnonzero(known[:-1] & known[1:])
    n1 = seqs.num_items + 1
    pair = seqs.items[src] * n1 + seqs.items[src + 1]
    uniq, count = np.unique(pair, return_counts=True)
    a, b = uniq // n1, uniq % n1
    indptr = np.concatenate([[0], np.cumsum(np.bincount(a, minlength=n1))])
    return Transitions(indptr, b, count.astype(np.int64))


def stage_examples(seqs: _Sequences, stage: EvalStage) -> tuple[np.ndarray, np.ndarray]:
    """``(user rows, t)`` of the stage's examples (target ``seq[t]``, history ``seq[:t]``)."""
    if stage == "validate":
        ok, t = (seqs.val_end > seqs.train_end) & (seqs.train_end >= 1), seqs.train_end
    elif stage == "test":
        ok, t = (seqs.lengths > seqs.val_end) & (seqs.val_end >= 1), seqs.val_end
    else:
        raise ValueError(f"stage must be 'validate' or 'test', got {stage!r}")
    users = np.flatnonzero(ok)
    return users, t[users]


def _markov_scores(trans: Transitions, last: np.ndarray, pop_rank: np.ndarray) -> np.ndarray:
    """``(B, N + 1)`` float32 scores ordering items by (transitions from ``last[i]``, popularity).

    Scores are small integers so that float32 (what the evaluator compares) stays exact on any
    catalogue below 2**23 items: items never seen after ``last[i]`` score their popularity's dense
    rank ``0..D-1``; the others ``D`` + the dense rank of ``(transitions, popularity)`` in the row,
    so equal pairs still tie and the evaluator's tie rule decides.
    """
    n_distinct = int(pop_rank.max()) + 1
    scores = np.broadcast_to(pop_rank.astype(np.float32), (len(last), len(pop_rank))).copy()
    lens = trans.indptr[last + 1] - trans.indptr[last]
    pos = gather_ragged(np.arange(len(trans.next_item)), trans.indptr[last], lens)
    rows = np.repeat(np.arange(len(last)), lens)
    items = trans.next_item[pos]
    key = trans.count[pos] * n_distinct + pop_rank[items]  # lexicographic (count, popularity)
    order = np.lexsort((key, rows))
    rows_s, key_s = rows[order], key[order]
    new_row = np.r_[True, rows_s[1:] != rows_s[:-1]] if len(order) else np.zeros(0, bool)
    new_value = new_row | np.r_[True, key_s[1:] != key_s[:-1]] if len(order) else new_row
    dense = np.cumsum(new_value)
    dense -= np.maximum.accumulate(np.where(new_row, dense, 0))  # 0-based within each row
    scores[rows_s, items[order]] = (n_distinct + dense).astype(np.float32)
    return scores


def _fit_ease(
    seqs: _Sequences,
    stage: EvalStage,
    lam: float,
    max_items: int,
    through: TrainThrough | None = None,
) -> EaseModel:
    """EASE fitted on the binary user x item matrix of the counted parts (every user)."""
    known, _ = _counted_mask(seqs, stage, through)
    owner = np.repeat(np.arange(len(seqs.lengths)), seqs.lengths)
    return fit_ease(
        owner[known], seqs.items[known], len(seqs.lengths), seqs.num_items, lam, max_items
    )


def run_baseline(
    data_dir: str | Path,
    name: BaselineName,
    stage: EvalStage = "test",
    batch_size: int = 1024,
    ks: Sequence[int] = (10, 20, 100),
    segments: Sequence[int] = (5, 20, 50, 200),
    ease_lambda: float = DEFAULT_LAMBDA,
    ease_max_items: int = DEFAULT_MAX_ITEMS,
    timings: dict[str, float] | None = None,
    through: TrainThrough | None = None,
) -> RankingEvaluator:
    """Evaluate a baseline; returns the filled evaluator (for :meth:`~RankingEvaluator.compute`
    and :meth:`~RankingEvaluator.segment_table`). ``ease_*`` are EASE's options (ignored by the
    others); a given ``timings`` dict receives ``fit_s``, the seconds spent fitting (EASE);
    ``through`` is the last part counted (module docstring; None: all before the stage)."""
    if name not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {name!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    through = counted_through(stage, through)
    seqs = load_sequences(data_dir)
    users, t = stage_examples(seqs, stage)
    pop = popularity_counts(seqs, stage, through)
    evaluator = RankingEvaluator(seqs.num_items, pop, ks=ks, segments=segments)
    # Dense popularity ranks, not raw counts: the same order, and exact in float32 at any count.
    pop_rank = np.unique(pop, return_inverse=True)[1].astype(np.int64)
    trans = transition_counts(seqs, stage, through) if name == "markov" else None
    ease = _fit_ease(seqs, stage, ease_lambda, ease_max_items, through) if name == "ease" else None
    if timings is not None:
        timings["fit_s"] = 0.0 if ease is None else ease.fit_seconds
    for lo in range(0, len(users), batch_size):
        u, tt = users[lo : lo + batch_size], t[lo : lo + batch_size]
        starts = seqs.starts[u]
        target = seqs.items[starts + tt]
        seen = gather_ragged(seqs.items, starts, tt)
        if ease is not None:
            scores = ease.scores(seen, tt)
        elif trans is None:
            scores = torch.from_numpy(
                np.broadcast_to(pop_rank.astype(np.float32), (len(u), len(pop_rank))).copy()
            )
        else:
            scores = torch.from_numpy(_markov_scores(trans, seqs.items[starts + tt - 1], pop_rank))
        evaluator.update(
            scores,
            torch.from_numpy(target),
            torch.from_numpy(seen),
            torch.from_numpy(tt),
            torch.ones(len(u)),
        )
    return evaluator


def evaluate_baseline(
    data_dir: str | Path,
    name: BaselineName,
    stage: EvalStage = "test",
    batch_size: int = 1024,
    ks: Sequence[int] = (10, 20, 100),
    ease_lambda: float = DEFAULT_LAMBDA,
    ease_max_items: int = DEFAULT_MAX_ITEMS,
    through: TrainThrough | None = None,
) -> dict[str, float]:
    """Metrics of one baseline on one stage (names as in
    :mod:`recforge.trainer.evaluation.metrics`)."""
    return run_baseline(
        data_dir,
        name,
        stage,
        batch_size,
        ks,
        ease_lambda=ease_lambda,
        ease_max_items=ease_max_items,
        through=through,
    ).compute()


def format_table(results: dict[str, dict[str, float]], ks: Sequence[int]) -> str:
    """A plain-text table: one row per metric, one column per baseline."""
    names = (
        ["count"]
        + [f"hr@{k}" for k in ks]
        + [f"ndcg@{k}" for k in ks]
        + ["mrr"]
        + [f"hr@{k}_filtered" for k in ks]
        + [f"ndcg@{k}_filtered" for k in ks]
        + ["mrr_filtered"]
        + [f"coverage@{k}" for k in ks]
        + [f"popularity@{k}" for k in ks]
        + [f"popularity@{k}_relative" for k in ks]
    )
    width = max(len(n) for n in names)
    cols = list(results)
    lines = [f"{'metric':<{width}}" + "".join(f"  {c:>14}" for c in cols)]
    for name in names:
        cells = "".join(f"  {_fmt(results[c][name]):>14}" for c in cols)
        lines.append(f"{name:<{width}}{cells}")
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return f"{value:.0f}" if value == int(value) and value > 1 else f"{value:.4f}"


def main(argv: list[str] | None = None) -> int:
    """`recforge baselines DATA_DIR`: print the baselines' metrics on a prepared directory."""
    parser = argparse.ArgumentParser(prog="recforge baselines", description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", help="a prepared dataset directory")
    parser.add_argument(
        "--baseline",
        choices=[*BASELINES, "all"],
        nargs="+",
        default=["all"],
        help="one or more baselines (default: all)",
    )
    parser.add_argument("--stage", choices=["validate", "test"], default="test")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 20, 100])
    parser.add_argument(
        "--ease-lambda",
        type=float,
        default=DEFAULT_LAMBDA,
        help=(
            f"EASE's ridge penalty λ, > 0 (default {DEFAULT_LAMBDA}); choose it with "
            "--stage validate before reading the test figure (sparse data wants a smaller one)"
        ),
    )
    parser.add_argument(
        "--ease-max-items",
        type=int,
        default=DEFAULT_MAX_ITEMS,
        help="largest catalogue EASE accepts: it holds dense N x N float64 matrices "
        f"(default {DEFAULT_MAX_ITEMS})",
    )
    parser.add_argument(
        "--train-through",
        choices=TRAIN_THROUGH,
        default=None,
        help="the last split part the baselines count: `validation` (the default for --stage "
        "test: all data before the test items, as a model fitted with data.train_through: "
        "validation sees) or `train` (what a model fitted with the default train_through: train "
        "learned from, to compare on equal data); --stage validate counts `train` only",
    )
    args = parser.parse_args(argv)
    try:
        through = counted_through(args.stage, args.train_through)
    except ValueError as exc:
        parser.error(str(exc))
    names = list(BASELINES) if "all" in args.baseline else list(dict.fromkeys(args.baseline))
    if "ease" in names:
        try:
            # Before any work, with the catalogue size from the manifest.
            num_items = int(read_manifest(args.data_dir)["items"])
            check_ease_options(num_items, args.ease_lambda, args.ease_max_items)
        except ValueError as exc:
            parser.error(str(exc))
    results: dict[str, dict[str, float]] = {}
    for name in names:
        started = time.perf_counter()
        timings: dict[str, float] = {}
        evaluator = run_baseline(
            args.data_dir,
            name,
            args.stage,
            args.batch_size,
            args.ks,
            ease_lambda=args.ease_lambda,
            ease_max_items=args.ease_max_items,
            timings=timings,
            through=through,
        )
        metrics = results[name] = evaluator.compute()
        fit = f", fit {timings['fit_s']:.1f} s (λ {args.ease_lambda:g})" if name == "ease" else ""
        print(
            f"{name}, {args.stage} stage, counting through {through}: "
            f"{metrics['count']:.0f} examples "
            f"in {time.perf_counter() - started:.1f} s{fit}; by history length (filtered):"
        )
        for row in evaluator.segment_table(metrics):
            cells = "  ".join(
                f"{key} {value:.4f}"
                for key, value in row.items()
                if key not in ("segment", "count")
            )
            print(f"  {row['segment']:>8}  count {row['count']:>7.0f}  {cells}")
    print(format_table(results, sorted(set(args.ks))))
    return 0
