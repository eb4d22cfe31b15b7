"""Why test scores fall below validation scores under leave-one-out: what differs between the
validation and the test examples of a prepared dataset, from the data alone.

    python benchmarks/split_drift.py runs/data/amazon-sports [runs/data/ml1m ...]

A model is trained on each user's training part (``seq[:train_end]``); validation predicts
``seq[train_end]`` from that same prefix, test predicts ``seq[val_end]`` from the prefix with
the validation item appended. For each stage it prints, over its examples:

- the training-part count of the **target** item (median, share under 5): how well the model
  knows what it must rank;
- the training-part count of the **newest history item** (the one that predicts the next):
  for validation it was itself a training input *and* target of this user, for test it is the
  validation item, which never appeared in this user's training data and may be rare overall;
- the share of targets that follow the newest history item somewhere in the training parts
  (a first-order transition the model could have seen), and the share of targets already in
  the history (never hit under "seen items filtered").

Counts are over the training parts of every user, i.e. what a model fitted for either stage
was trained on (recforge trains on ``seq[:train_end]`` for both unless ``data.train_through:
validation`` refits through the validation part).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recforge.trainer.evaluation.baselines import (  # noqa: E402
    load_sequences,
    stage_examples,
    transition_counts,
)

RARE = 5


def stage_stats(seqs, counts: np.ndarray, trans, stage: str) -> dict[str, float]:
    users, t = stage_examples(seqs, stage)
    start = seqs.starts[users]
    target = seqs.items[start + t]
    newest = seqs.items[start + t - 1]
    target_count, newest_count = counts[target], counts[newest]
    # Transition newest -> target seen in the training parts (CSR rows of `trans`).
    lo, hi = trans.indptr[newest], trans.indptr[newest + 1]
    seen_pair = np.fromiter(
        (target[i] in trans.next_item[lo[i] : hi[i]] for i in range(len(users))),
        dtype=bool,
        count=len(users),
    )
    repeat = np.fromiter(
        (target[i] in seqs.items[start[i] : start[i] + t[i]] for i in range(len(users))),
        dtype=bool,
        count=len(users),
    )
    return {
        "examples": len(users),
        "target_count_median": float(np.median(target_count)),
        "target_rare_share": float((target_count < RARE).mean()),
        "newest_count_median": float(np.median(newest_count)),
        "newest_rare_share": float((newest_count < RARE).mean()),
        "transition_seen_share": float(seen_pair.mean()),
        "target_in_history_share": float(repeat.mean()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data_dirs", nargs="+", help="prepared data directories")
    args = p.parse_args(argv)
    header = (
        f"| data | stage | examples | target count median | target count < {RARE} | "
        f"newest-item count median | newest-item count < {RARE} | newest -> target seen | "
        "target in history |"
    )
    print(header)
    print("|" + "---|" * 9)
    for data_dir in args.data_dirs:
        seqs = load_sequences(data_dir)
        # "validate" counts exactly the training parts: what the model is trained on.
        trans = transition_counts(seqs, "validate")
        position = np.arange(len(seqs.items)) - np.repeat(seqs.starts, seqs.lengths)
        in_train = position < np.repeat(seqs.train_end, seqs.lengths)
        counts = np.bincount(seqs.items[in_train], minlength=seqs.num_items + 1)
        for stage in ("validate", "test"):
            s = stage_stats(seqs, counts, trans, stage)
            print(
                f"| {Path(data_dir).name} | {stage} | {s['examples']:,} | "
                f"{s['target_count_median']:.0f} | {s['target_rare_share']:.1%} | "
                f"{s['newest_count_median']:.0f} | {s['newest_rare_share']:.1%} | "
                f"{s['transition_seen_share']:.1%} | {s['target_in_history_share']:.1%} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
