"""Baselines on the SASRec ML-1M file reproduce reference full-ranking numbers
(docs/architecture.md §7).

Reference (measured elsewhere with the same protocol, test stage, NDCG@10): most popular
0.0179 filtered / 0.0079 unfiltered; first-order Markov on the last item 0.126 / 0.107.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recforge.data.prepare import PrepareConfig, prepare
from recforge.trainer.evaluation.baselines import (
    _markov_scores,
    _Sequences,
    evaluate_baseline,
    main,
    popularity_counts,
    transition_counts,
)

REPO = Path(__file__).resolve().parents[2]
ML1M = REPO.parent / "shared" / "data" / "ml-1m.txt"


@pytest.fixture(scope="module")
def ml1m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not ML1M.is_file():
        pytest.skip(f"{ML1M} not present (the shared MovieLens files sit beside the repository)")
    out = tmp_path_factory.mktemp("baselines") / "ml1m"
    prepare(PrepareConfig(input=[str(ML1M)], format="sasrec-txt", out=str(out)))
    return out


def test_most_popular_reproduces_reference(ml1m: Path) -> None:
    m = evaluate_baseline(ml1m, "most_popular", stage="test")
    assert m["count"] == 6040
    assert m["ndcg@10_filtered"] == pytest.approx(0.0179, abs=0.0006)
    assert m["ndcg@10"] == pytest.approx(0.0079, abs=0.0006)
    # Regression pins of this implementation's protocol (popularity over train + validation parts,
    # the whole history filtered, smaller index wins ties), to catch silent protocol drift.
    assert m["ndcg@10_filtered"] == pytest.approx(0.017818, abs=2e-6)
    assert m["ndcg@10"] == pytest.approx(0.007905, abs=2e-6)
    assert m["hr@10_filtered"] == pytest.approx(219 / 6040, abs=1e-9)
    assert m["hr@10"] == pytest.approx(98 / 6040, abs=1e-9)
    # The same ten items for everyone (minus what each user saw): low coverage, high popularity.
    assert m["coverage@10"] < 0.1 and m["popularity@10_relative"] > 0.5


def test_markov_reproduces_reference(ml1m: Path) -> None:
    m = evaluate_baseline(ml1m, "markov", stage="test")
    assert m["count"] == 6040
    assert m["ndcg@10_filtered"] == pytest.approx(0.126, abs=0.003)
    assert m["ndcg@10"] == pytest.approx(0.107, abs=0.003)
    assert m["ndcg@10_filtered"] == pytest.approx(0.126143, abs=2e-6)
    assert m["ndcg@10"] == pytest.approx(0.107383, abs=2e-6)
    assert m["coverage@10"] > 0.5


def test_validate_stage_and_main(ml1m: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = evaluate_baseline(ml1m, "most_popular", stage="validate", ks=(10,))
    assert m["count"] == 6040 and 0.0 < m["ndcg@10"] < m["ndcg@10_filtered"] < 0.05
    assert main([str(ml1m), "--stage", "validate", "--ks", "10", "20"]) == 0
    out = capsys.readouterr().out
    assert "most_popular" in out and "markov" in out and "ndcg@20_filtered" in out and "6-20" in out
    # `all` includes EASE (default λ), with its fit time on its line.
    assert "ease, validate stage, counting through train: 6040 examples in" in out
    assert ", fit " in out


def test_markov_scores_order_without_data() -> None:
    """Counted parts, transitions and the (transitions, popularity) order on a hand-made split."""
    # User 0: 1 2 3 | val 2 | test 4 ; user 1: 1 2 | val 3 | test 1 ; user 2: 2 3 (train only).
    items = np.array([1, 2, 3, 2, 4, 1, 2, 3, 1, 2, 3])
    lengths = np.array([5, 4, 2])
    seqs = _Sequences(
        items, np.cumsum(lengths) - lengths, lengths, np.array([3, 2, 2]), np.array([4, 3, 2]), 5
    )
    assert popularity_counts(seqs, "validate").tolist() == [0, 2, 3, 2, 0, 0]
    assert popularity_counts(seqs, "test").tolist() == [0, 2, 4, 3, 0, 0]  # + validation items 2, 3
    trans = transition_counts(seqs, "test")  # 1->2 x2, 2->3 x3, 3->2 x1; never into a test item
    assert dict(zip(*trans.row(2))) == {3: 3} and dict(zip(*trans.row(1))) == {2: 2}
    assert dict(zip(*trans.row(3))) == {2: 1} and len(trans.row(4)[0]) == 0
    pop_rank = np.unique(popularity_counts(seqs, "test"), return_inverse=True)[1]
    scores = _markov_scores(trans, np.array([2, 4]), pop_rank)
    # From 2: item 3 (a transition) first, then by popularity 2 > 1 > 4 = 5 (tie kept).
    s = scores[0]
    assert s[3] > s[2] > s[1] > s[4] == s[5]
    # From 4 (no transitions): popularity only.
    assert scores[1].tolist() == pop_rank.astype(np.float32).tolist()
    # Counting through the training parts, test sees what validate sees: no validation items.
    assert popularity_counts(seqs, "test", "train").tolist() == [0, 2, 3, 2, 0, 0]
    assert dict(zip(*transition_counts(seqs, "test", "train").row(2))) == {3: 2}
    with pytest.raises(ValueError, match="would count the validation targets"):
        popularity_counts(seqs, "validate", "validation")
