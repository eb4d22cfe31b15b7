"""EASE, the closed-form item-item baseline of Steck (2019), "Embarrassingly Shallow
Autoencoders for Sparse Data", as scored by ``recforge baselines --baseline ease``.

Model. ``X`` is the binary users x items matrix of the counted parts (the parts the other
baselines count for the stage, every user; an item seen twice by a user is a single 1). With
``G = XᵀX + λI`` and ``P = G⁻¹``, the weights are ``B = -P / diag(P)`` column by column
(``B[i, j] = -P[i, j] / P[j, j]``) with ``diag(B) = 0``: the ridge regression of every item's
column on all the other columns, with the self-loop forbidden. A user's scores are ``x_u B``,
``x_u`` the binary row of the history the evaluated example uses (for leave-one-out data the
same user's row of ``X``). Matrices are indexed by item id ``0..N``: the padding row and column
0 of ``B`` are zero, so column 0 of the scores is 0 and the evaluator never ranks it. Items
never counted have an all-zero row and column, so they score 0 for everyone; ties (many items
score exactly 0) go to the evaluator's rule. Larger ``λ`` shrinks ``B`` towards zero.

Cost (U users, N items, S = counted interactions; CPU, torch's LAPACK, float64 solve):

- Gram matrix: ``O(S x N)`` time, one column block of ``X`` at a time (a dense float32 block of
  :data:`_BLOCK_ELEMENTS` values, 128 MiB) summed per item with ``embedding_bag``.
- Inverse by Cholesky (``G`` is symmetric positive definite for ``λ > 0``): ``O(N³)`` time,
  about ``N³`` flops. Peak memory is two dense ``(N + 1)²`` float64 matrices (the factor and the
  inverse) = ``2 x 8 N²`` bytes: 0.2 GB for ML-1M (3.4k items), 5.4 GB for 18k items, 25.6 GB at
  the default limit of 40k items. ``B`` is then kept in float32 (``4 N²`` bytes) for scoring.
  Single-threaded (OMP_NUM_THREADS=1) a whole fit took 4-9 s at 3.4k items (ML-1M; about 1.5 s
  of it the factor and inverse) and minutes at 18k (Amazon Sports); it grows as N³.
- Scoring: each example's binary history row times ``B`` (``embedding_bag`` sums of the
  history's rows): ``O(distinct history items x N)`` per user and a ``batch x (N + 1)`` float32
  score block, so memory stays bounded by ``--batch-size``.

Catalogues over ``max_items`` (``--ease-max-items``) are refused before anything is allocated.

Choosing ``λ``: the default (500) suits MovieLens-like data; a sparse catalogue wants less
shrinkage. On Amazon Sports (18k items, about 12 training interactions per item) validation
NDCG@10 (filtered) was 0.0323 / 0.0339 / 0.0338 / 0.0330 / 0.0323 / 0.0317 at λ = 20 / 50 /
100 / 250 / 500 / 1000, and test 0.0308 at λ = 50 against 0.0300 at the default. Compare a
model with the EASE whose λ was picked on ``--stage validate``, as the model's own settings
were.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_LAMBDA = 500.0
DEFAULT_MAX_ITEMS = 40_000
_BLOCK_ELEMENTS = 1 << 25  # dense values of one column block of X while building the Gram matrix


def check_ease_options(num_items: int, lam: float, max_items: int = DEFAULT_MAX_ITEMS) -> None:
    """Refuse a non-positive (or NaN) ``λ`` and a catalogue too large for a dense item x item
    matrix, with errors naming the command-line options."""
    if not lam > 0:  # also catches NaN
        raise ValueError(f"--ease-lambda must be > 0 (the ridge penalty λ of EASE), got {lam}")
    if num_items > max_items:
        gb = num_items**2 * 8 / 1e9
        raise ValueError(
            f"EASE refuses a catalogue of {num_items} items (over --ease-max-items {max_items}): "
            f"the dense item x item matrix would need N² x 8 bytes = {gb:.1f} GB "
            "(and twice that while inverting)"
        )


@dataclass(frozen=True)
class EaseModel:
    """Fitted weights ``B`` ((N + 1, N + 1), row and column 0 and the diagonal zero), solved in
    float64 and kept in float32, the precision the evaluator compares scores in."""

    weights: torch.Tensor
    lam: float
    fit_seconds: float

    def scores(self, seen: np.ndarray, seen_lengths: np.ndarray) -> torch.Tensor:
        """``(B, N + 1)`` float32 scores ``x_u B`` of the histories given as flat ``seen`` items
        with per-row ``seen_lengths`` (repeats count once: ``x_u`` is binary)."""
        rows = np.repeat(np.arange(len(seen_lengths)), seen_lengths)
        return _bag_sums(self.weights, rows, np.asarray(seen, dtype=np.int64), len(seen_lengths))


def _bag_sums(
    table: torch.Tensor, bags: np.ndarray, rows: np.ndarray, num_bags: int
) -> torch.Tensor:
    """``(num_bags, table columns)``: bag ``b`` is the sum of ``table[r]`` over the *distinct*
    ``r`` paired with ``b`` (a binary sparse matrix times ``table``, through ``embedding_bag``)."""
    width = int(table.shape[0])
    key = np.unique(bags.astype(np.int64) * width + rows)
    offsets = np.cumsum(np.bincount(key // width, minlength=num_bags)) - np.bincount(
        key // width, minlength=num_bags
    )
    return F.embedding_bag(
        torch.from_numpy(key % width), table, torch.from_numpy(offsets), mode="sum"
    )


def gram_matrix(users: np.ndarray, items: np.ndarray, num_users: int, n1: int) -> torch.Tensor:
    """Dense ``XᵀX`` ((n1, n1) float64) of the binary matrix with a 1 at every ``(user, item)``.

    Built one column block of ``X`` at a time in float32 (co-occurrence counts are integers
    below 2**24 users, so exact): ``G[:, block] = Σ_u over item i's users X[u, block]``."""
    if num_users >= 1 << 24:
        raise ValueError(
            f"EASE counts co-occurrences in float32: at most 2**24 users, got {num_users}"
        )
    key = np.unique(users.astype(np.int64) * n1 + items)
    u, i = key // n1, key % n1
    gram = torch.empty((n1, n1), dtype=torch.float64)
    block = max(1, _BLOCK_ELEMENTS // max(1, num_users))
    for lo in range(0, n1, block):
        hi = min(n1, lo + block)
        inside = (i >= lo) & (i < hi)
        dense = torch.zeros((num_users, hi - lo), dtype=torch.float32)
        dense[torch.from_numpy(u[inside]), torch.from_numpy(i[inside] - lo)] = 1.0
        gram[:, lo:hi] = _bag_sums(dense, i, u, n1)
    return gram


def fit_ease(
    users: np.ndarray,
    items: np.ndarray,
    num_users: int,
    num_items: int,
    lam: float = DEFAULT_LAMBDA,
    max_items: int = DEFAULT_MAX_ITEMS,
) -> EaseModel:
    """Fit EASE on the interactions ``(users[k], items[k])`` (items in ``1..num_items``)."""
    check_ease_options(num_items, lam, max_items)
    started = time.perf_counter()
    gram = gram_matrix(users, items, num_users, num_items + 1)
    gram.diagonal().add_(lam)
    factor = torch.linalg.cholesky(gram)
    del gram
    p = torch.cholesky_inverse(factor)
    del factor
    diag = p.diagonal().clone()
    weights = p.div_(-diag)  # column j divided by -P[j, j]
    weights.diagonal().zero_()
    weights[0].zero_()
    weights[:, 0].zero_()
    # Row-major (LAPACK hands back column-major), so that a history's rows are contiguous.
    weights = weights.to(torch.float32, memory_format=torch.contiguous_format)
    return EaseModel(weights, lam, time.perf_counter() - started)
