"""EASE through `recforge baselines` (trainer/evaluation/ease.py), on tiny prepared dirs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from loader_fixtures import write_prepared

from recforge.data.ragged import gather_ragged
from recforge.trainer.evaluation.baselines import (
    _fit_ease,
    evaluate_baseline,
    load_sequences,
    main,
    popularity_counts,
    stage_examples,
)
from recforge.trainer.evaluation.ease import check_ease_options, fit_ease
from recforge.trainer.evaluation.metrics import RankingEvaluator

# Leave-one-out: the last item is the test target, the one before it the validation target.
SEQUENCES = [
    [1, 2, 3, 2, 4],  # a repeat (2): X is binary
    [2, 3, 5, 1],
    [1, 3, 4, 6, 2, 5],
    [6, 5, 4],
    [2, 1, 3, 6],
    [4, 6, 1, 3, 5],
]
NUM_ITEMS = 7  # item 7 is never seen: an all-zero row and column


def _closed_form(parts: list[list[int]], lam: float) -> np.ndarray:
    """Steck's closed form straight from the definition, float64, items 1..N as columns 1..N."""
    x = np.zeros((len(parts), NUM_ITEMS + 1))
    for u, items in enumerate(parts):
        x[u, items] = 1.0
    x = x[:, 1:]
    p = np.linalg.inv(x.T @ x + lam * np.eye(NUM_ITEMS))
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return x @ b  # (users, N): the history rows are the counted rows here


@pytest.mark.parametrize(("stage", "cut"), [("test", 1), ("validate", 2)])
def test_ease_scores_equal_numpy_closed_form(tmp_path: Path, stage: str, cut: int) -> None:
    data = write_prepared(tmp_path / "d", SEQUENCES, num_items=NUM_ITEMS)
    lam = 0.7
    expected = _closed_form([s[:-cut] for s in SEQUENCES], lam)

    seqs = load_sequences(data)
    users, t = stage_examples(seqs, stage)  # type: ignore[arg-type]
    assert users.tolist() == list(range(len(SEQUENCES)))
    model = _fit_ease(seqs, stage, lam, 100)  # type: ignore[arg-type]
    scores = model.scores(gather_ragged(seqs.items, seqs.starts[users], t), t)
    assert scores.shape == (len(SEQUENCES), NUM_ITEMS + 1) and scores.dtype == torch.float32
    assert torch.all(scores[:, 0] == 0)  # padding
    np.testing.assert_allclose(scores[:, 1:].numpy(), expected, rtol=1e-5, atol=1e-6)

    # The same scores reach the evaluator: its metrics match evaluate_baseline's.
    pop = popularity_counts(seqs, stage)  # type: ignore[arg-type]
    ev = RankingEvaluator(NUM_ITEMS, pop, ks=(1, 3))
    target = [s[-cut] for s in SEQUENCES]
    history = [item for s in SEQUENCES for item in s[:-cut]]
    ev.update(
        torch.from_numpy(np.pad(expected, ((0, 0), (1, 0)))).float(),
        torch.tensor(target),
        torch.tensor(history),
        torch.tensor([len(s) - cut for s in SEQUENCES]),
    )
    got = evaluate_baseline(data, "ease", stage, ks=(1, 3), ease_lambda=lam)  # type: ignore[arg-type]
    want = ev.compute()
    for key in ("count", "hr@1_filtered", "ndcg@3_filtered", "mrr", "mrr_filtered"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def test_ease_finds_planted_co_occurrence(tmp_path: Path) -> None:
    """Items come in pairs (2k - 1, 2k); every user holds whole pairs in random order, so the
    held-out item's partner is always in the history. EASE must put it on top of the filtered
    ranking far above chance (1 / 35) and above popularity; a sign or diagonal slip fails."""
    rng = np.random.default_rng(0)
    pairs = 20
    sequences = []
    for _ in range(300):
        chosen = rng.choice(pairs, size=3, replace=False)
        items = np.concatenate([[2 * k + 1, 2 * k + 2] for k in chosen])
        sequences.append(rng.permutation(items).tolist())
    data = write_prepared(tmp_path / "pairs", sequences, num_items=2 * pairs)
    ease = evaluate_baseline(data, "ease", "test", ks=(1, 10), ease_lambda=10.0)
    popular = evaluate_baseline(data, "most_popular", "test", ks=(1, 10))
    assert ease["count"] == 300
    assert ease["hr@1_filtered"] > 0.9 and popular["hr@1_filtered"] < 0.2
    assert ease["ndcg@10_filtered"] > popular["ndcg@10_filtered"] + 0.5


@pytest.mark.parametrize("lam", [0.0, -1.0, math.nan])
def test_ease_refuses_bad_lambda(lam: float) -> None:
    with pytest.raises(ValueError, match="--ease-lambda must be > 0"):
        check_ease_options(10, lam)
    with pytest.raises(ValueError, match="--ease-lambda"):
        fit_ease(np.array([0]), np.array([1]), 1, 3, lam)


def test_ease_refuses_large_catalogue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"N² x 8 bytes = 12\.8 GB"):
        check_ease_options(40_001, 500.0, 40_000)
    check_ease_options(40_000, 500.0, 40_000)  # the limit itself is allowed
    data = write_prepared(tmp_path / "d", SEQUENCES, num_items=NUM_ITEMS)
    with pytest.raises(ValueError, match="--ease-max-items 5"):
        evaluate_baseline(data, "ease", ease_max_items=5)
    # The command says so before any work, as a usage error.
    with pytest.raises(SystemExit) as exc:
        main([str(data), "--baseline", "ease", "--ease-max-items", "5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--ease-max-items 5" in err and "GB" in err
    with pytest.raises(SystemExit):
        main([str(data), "--baseline", "all", "--ease-lambda", "0"])
    assert "--ease-lambda must be > 0" in capsys.readouterr().err


def test_cli_runs_ease(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_prepared(tmp_path / "d", SEQUENCES, num_items=NUM_ITEMS)
    assert main([str(data), "--baseline", "ease", "markov", "--ks", "3", "--ease-lambda", "2"]) == 0
    out = capsys.readouterr().out
    assert "ease, test stage, counting through validation: 6 examples in" in out
    assert ", fit " in out and "(λ 2)" in out
    header = next(line for line in out.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "ease", "markov"]
    assert "most_popular" not in out
    # Counting the training parts only is a different fit; on validate it is refused as usage.
    assert main([str(data), "--baseline", "ease", "--ks", "3", "--train-through", "train"]) == 0
    assert "ease, test stage, counting through train: 6 examples" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main([str(data), "--stage", "validate", "--train-through", "validation"])
    assert exc.value.code == 2 and "validation targets" in capsys.readouterr().err
