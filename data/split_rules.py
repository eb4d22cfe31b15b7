"""The split rules both prepare engines apply to the per-user lengths: the time split's cut
points, the counts of each part and the refusal of a split that leaves too few users to
evaluate (docs/architecture.md §3). The engines differ in how they compute the quantiles and
the lengths, not in these rules."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from recforge.data.errors import DataError

if TYPE_CHECKING:
    from recforge.data.prepare import PrepareConfig


def require_eval_users(
    config: PrepareConfig,
    split: dict[str, Any],
    lengths: np.ndarray,
    train_end: np.ndarray,
    val_end: np.ndarray,
) -> None:
    """Refuse a dataset with fewer than ``min_eval_users`` evaluable users per stage, saying
    which rule left them out (the loader's rule: a target and at least one item before it)."""
    stages = {
        "validation": int(((val_end > train_end) & (train_end >= 1)).sum()),
        "test": int(((lengths > val_end) & (val_end >= 1)).sum()),
    }
    short = {k: v for k, v in stages.items() if v < config.min_eval_users}
    if not short:
        return
    stage, found = next(iter(short.items()))
    if split["type"] == "leave-one-out":
        why = (
            f"leave-one-out holds out the last two interactions of users with at least 3; "
            f"{int((lengths < 3).sum())} of {len(lengths)} users have fewer"
        )
    else:
        why = (
            f"the time split puts interactions from {split['val_start']} on in validation and "
            f"from {split['test_start']} on in test (--val-fraction/--test-fraction), and "
            f"only {found} user(s) have such an interaction after an earlier one"
        )
    kcore = ""
    if config.min_user or config.min_item:
        kcore = (
            f"; after k-core filtering (--min-user {config.min_user}, --min-item {config.min_item})"
        )
    raise DataError(
        f"only {found} user(s) have a {stage} example, fewer than --min-eval-users "
        f"{config.min_eval_users}: {why}{kcore}",
        path=", ".join(config.input),
    )


def time_split(config: PrepareConfig, quantile: Callable[[float], int]) -> dict[str, Any]:
    """The time split's manifest entry; ``quantile(q)`` is numpy's ``method="higher"``."""
    # Cut points by interaction quantiles, so the requested shares hold on skewed time ranges.
    val_start = quantile(1 - config.test_fraction - config.val_fraction)
    test_start = quantile(1 - config.test_fraction)
    if test_start <= val_start:
        test_start = val_start + 1
    return {
        "type": "time",
        "val_start": val_start,
        "test_start": test_start,
        "val_fraction": config.val_fraction,
        "test_fraction": config.test_fraction,
    }


def split_counts(lengths: np.ndarray, train_end: np.ndarray, val_end: np.ndarray) -> dict[str, int]:
    counts = {
        "train_interactions": int(train_end.sum()),
        "val_interactions": int((val_end - train_end).sum()),
        "test_interactions": int((lengths - val_end).sum()),
        "users_with_val": int((val_end > train_end).sum()),
        "users_with_test": int((lengths > val_end).sum()),
        "users_without_eval": int(((val_end == train_end) & (lengths == val_end)).sum()),
    }
    return counts
