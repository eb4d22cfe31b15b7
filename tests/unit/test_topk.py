"""recforge.serve.topk: the blocked top-k equals a stable full sort, with ties, -inf and short last
blocks."""

from __future__ import annotations

import numpy as np
import pytest

from recforge.serve.topk import top_k_rows


@pytest.mark.parametrize("n", [1, 9, 50, 3416, 20_000, 20_011])
@pytest.mark.parametrize("k", [1, 10, 100])
def test_equals_a_stable_full_sort(n: int, k: int) -> None:
    rng = np.random.default_rng(n * 1000 + k)
    scores = rng.standard_normal((7, n)).astype(np.float32)
    scores[1] = np.round(scores[1])  # many ties
    scores[2, : n // 2] = -np.inf  # excluded items
    scores[3, -3:] = scores[3].max() + 1  # the best items in the (possibly short) last block
    positions, values = top_k_rows(scores.copy(), k)
    want = np.stack([np.lexsort((np.arange(n), -row))[:k] for row in scores])
    assert positions.shape == (7, min(k, n))
    assert (positions == want).all()
    assert (values == np.take_along_axis(scores, want, axis=1)).all()
