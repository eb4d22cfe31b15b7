"""Explanations: which history items most support each recommended item (``explain: true``),
docs/architecture.md §10.

Leave-one-out through the ONNX user encoder, for both families. The contribution of history item
h to recommended item i is ``score(i | window) - score(i | window without h)``: how much lower i
would score had the user not interacted with h, with every other input unchanged. ``window`` is
the part of the history the model reads (the last ``max_len`` items), and removing h removes all
its occurrences there; older items outside the window contribute nothing by construction.

Why not a linear decomposition: the two-tower user tower pools the history with softmax weights
over recency (``models/towers.py``: ``HistoryPooling``), then applies an MLP with GELU and an L2
norm, so ``pooled user vector · item vector`` does not split into per-item terms that add up to
the score; SASRec's attention is not linear either, and item-item similarity of embeddings
describes the catalogue, not what this model does with this history. Leave-one-out is exact for
what it claims (a counterfactual score) and uses only the served graph, in one onnxruntime call
of ``1 + m`` rows (the full window and each window minus one item; the full row is recomputed in
the same call, so a contribution is a difference of two numbers from one run). Its cost grows with
m, so only the ``MAX_EXPLAINED`` most recent distinct items are tried (measured cost: §10).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

EXPLAIN_TOP = 5
"""History items listed per recommended item, the most supporting first."""
MAX_EXPLAINED = 32
"""Distinct history items (most recent first) whose removal is tried."""

Encode = Callable[[list[list[int]], list[dict[str, Any]]], np.ndarray]


def leave_one_out(
    encode: Encode,
    window: Sequence[int],
    user: dict[str, Any],
    item_vectors: np.ndarray,
) -> tuple[list[int], np.ndarray]:
    """History item indexes tried and their contributions (m, k) to each of the k items whose
    vectors (k, D) are given; ``encode`` is the recommender's batched ONNX call."""
    window = list(window)
    tried: list[int] = []
    for idx in reversed(window):  # most recent first: recency matters most to both families
        if idx not in tried:
            tried.append(idx)
        if len(tried) == MAX_EXPLAINED:
            break
    if not tried:
        return [], np.zeros((0, len(item_vectors)), dtype=np.float32)
    rows = [window] + [[x for x in window if x != h] for h in tried]
    vectors = encode(rows, [user] * len(rows))  # (1 + m, D)
    scores = vectors.astype(np.float64) @ np.asarray(item_vectors, dtype=np.float64).T
    return tried, (scores[0][None, :] - scores[1:]).astype(np.float32)


def explanations(
    encode: Encode,
    window: Sequence[int],
    user: dict[str, Any],
    positions: Sequence[int],
    item_embeddings: np.ndarray,
    item_ids: Sequence[Any],
) -> list[list[dict[str, Any]]]:
    """For each recommended position, up to ``EXPLAIN_TOP`` ``{"item_id", "score"}`` of the
    history items with the largest contribution (ties: the more recent item first)."""
    if not positions:
        return []
    vectors = np.asarray(item_embeddings[np.asarray(positions, dtype=np.int64)])
    tried, contributions = leave_one_out(encode, window, user, vectors)
    out = []
    for c in range(len(positions)):
        order = np.argsort(-contributions[:, c], kind="stable")[:EXPLAIN_TOP]
        out.append(
            [
                {"item_id": item_ids[tried[o] - 1], "score": float(contributions[o, c])}
                for o in order
            ]
        )
    return out
