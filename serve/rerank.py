"""User control over a recommendation list: ``exclude_categories`` and ``diversity`` (MMR
re-ranking), docs/architecture.md §10.

- ``exclude_categories`` ``{feature: [values]}`` leaves out every item whose value of that
  categorical or list item feature is one of ``values``. The values come from the artifact's
  ``items.parquet`` (one ``list<string>`` column per feature, written by the export); values are
  compared as text, so ``1995`` and ``"1995"`` are the same category. An unknown value excludes
  nothing (like an unknown id in ``exclude``); an unknown feature, or a model whose artifact holds
  no item categories, is a 4xx naming the field.
- ``diversity`` d in [0, 1]: maximal marginal relevance over the item embeddings. The candidate
  pool is the top ``max(50, 5k)`` items by score (after exclusions); the list is built greedily,
  each step taking the candidate that maximises ``(1 - d) rel(i) - d max_{j chosen} cos(i, j)``,
  where ``rel`` is the score min-max scaled to [0, 1] over the pool: SASRec scores are unbounded
  dot products and cosines lie in [-1, 1], so unscaled scores would make the same d mean a
  different trade-off per model and per user. ``d = 0`` never reaches MMR: the request is served
  exactly as without the field. Returned scores stay the model's scores (no longer sorted when
  d > 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from recforge.serve.recommender import RequestError

BASE_COLUMNS = ("item_idx", "item_id", "count")
MIN_POOL = 50
POOL_PER_K = 5


class ControlError(RequestError):
    """A bad user-control field; ``field`` is its dotted path within one request."""

    def __init__(self, message: str, field: str, request: int) -> None:
        super().__init__(f"request {request}: {message}")
        self.field, self.request = field, request


class ItemCategories:
    """Item index sets per (feature, value), from the artifact's ``items.parquet`` columns."""

    def __init__(self, items: Mapping[str, Sequence[Any]]) -> None:
        self.members: dict[str, dict[str, set[int]]] = {}
        for name, column in items.items():
            if name in BASE_COLUMNS:
                continue
            values: dict[str, set[int]] = {}
            for idx, row in zip(items["item_idx"], column):
                for value in row or ():
                    values.setdefault(str(value), set()).add(int(idx))
            self.members[name] = values

    @property
    def names(self) -> list[str]:
        return sorted(self.members)

    def excluded(self, wanted: Mapping[str, Sequence[Any]] | None, request: int) -> set[int]:
        """Item indexes in any of the ``wanted`` categories."""
        out: set[int] = set()
        if not wanted:
            return out
        if not self.members:
            raise ControlError(
                "exclude_categories: this model's artifact holds no item categories "
                "(items.parquet has no categorical item feature; re-export from data prepared "
                "with item features)",
                "exclude_categories",
                request,
            )
        for name, values in wanted.items():
            if name not in self.members:
                raise ControlError(
                    f"exclude_categories: unknown item feature {name!r} (this model has "
                    f"{self.names})",
                    f"exclude_categories.{name}",
                    request,
                )
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise ControlError(
                    f"exclude_categories.{name}: expected a list of values",
                    f"exclude_categories.{name}",
                    request,
                )
            for value in values:
                out |= self.members[name].get(str(value), set())
        return out


@dataclass
class Control:
    """A request's list controls: how many items to retrieve before re-ranking, and what then."""

    k: int
    diversity: float = 0.0
    explain: bool = False
    excluded: set[int] = field(default_factory=set)

    @property
    def fetch(self) -> int:
        """Items to retrieve: k itself without re-ranking (today's path, unchanged)."""
        return self.k if self.diversity == 0 else max(MIN_POOL, POOL_PER_K * self.k)


def parse_control(
    request: Mapping[str, Any], i: int, k: int, categories: ItemCategories
) -> Control:
    diversity = request.get("diversity", 0.0)
    if diversity is None:
        diversity = 0.0
    if (
        isinstance(diversity, bool)
        or not isinstance(diversity, (int, float))
        or not 0.0 <= diversity <= 1.0
    ):
        raise ControlError(f"diversity={diversity!r} must be a number in [0, 1]", "diversity", i)
    explain = request.get("explain", False)
    if not isinstance(explain, bool):
        raise ControlError(f"explain={explain!r} must be true or false", "explain", i)
    excluded = categories.excluded(request.get("exclude_categories"), i)
    return Control(k, float(diversity), explain, excluded)


def mmr(
    positions: Sequence[int],
    scores: np.ndarray,
    item_embeddings: np.ndarray,
    k: int,
    diversity: float,
) -> list[int]:
    """Indexes into ``positions`` (a candidate pool, best score first) of the MMR list of length
    ``min(k, pool)``. Ties go to the better-scored candidate (argmax takes the first)."""
    n = len(positions)
    if n == 0:
        return []
    scores = np.asarray(scores, dtype=np.float64)
    span = scores.max() - scores.min()
    rel = (scores - scores.min()) / span if span > 0 else np.zeros(n)
    vectors = np.asarray(item_embeddings[np.asarray(positions, dtype=np.int64)], dtype=np.float64)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    lam = 1.0 - diversity
    chosen = [int(np.argmax(rel))]
    nearest = vectors @ vectors[chosen[0]]  # max cosine to the chosen items, per candidate
    taken = np.zeros(n, dtype=bool)
    taken[chosen[0]] = True
    while len(chosen) < min(k, n):
        gain = np.where(taken, -np.inf, lam * rel - diversity * nearest)
        best = int(np.argmax(gain))
        chosen.append(best)
        taken[best] = True
        nearest = np.maximum(nearest, vectors @ vectors[best])
    return chosen


def rerank(
    control: Control, positions: list[int], scores: np.ndarray, item_embeddings: np.ndarray
) -> tuple[list[int], np.ndarray]:
    """The request's final ``k`` positions and scores from the retrieved ones."""
    if control.diversity == 0:
        return positions[: control.k], scores[: control.k]
    order = mmr(positions, scores, item_embeddings, control.k, control.diversity)
    return [positions[o] for o in order], np.asarray(scores)[order]


def intra_list_similarity(positions: Sequence[int], item_embeddings: np.ndarray) -> float:
    """Mean cosine similarity over the pairs of a list (0 for fewer than two items)."""
    if len(positions) < 2:
        return 0.0
    v = np.asarray(item_embeddings[np.asarray(positions, dtype=np.int64)], dtype=np.float64)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    sim = v @ v.T
    n = len(positions)
    return float((sim.sum() - np.trace(sim)) / (n * (n - 1)))
