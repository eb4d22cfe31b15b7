"""RankingEvaluator: hand-computed metrics, the tie rule, filtering, weights, segments, batching
invariance, and 2 real gloo processes against 1 (docs/architecture.md §7)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recforge.serve.local import free_port
from recforge.trainer.evaluation.metrics import RankingEvaluator, segment_labels

POP = [0, 10, 20, 30, 40, 50]  # item i has count 10 * i


def _batch(rows: list[tuple[list[float], int, list[int], float]]) -> dict[str, torch.Tensor]:
    """(scores incl. padding column, target, seen items, weight) per row -> update() kwargs."""
    return {
        "scores": torch.tensor([r[0] for r in rows], dtype=torch.float32),
        "target": torch.tensor([r[1] for r in rows]),
        "seen_values": torch.tensor([i for r in rows for i in r[2]], dtype=torch.int64),
        "seen_lengths": torch.tensor([len(r[2]) for r in rows]),
        "weight": torch.tensor([r[3] for r in rows]),
    }


# Row 0: item 4 ties item 2 (0.5); item 2 has the smaller index, so unfiltered rank 1. The user saw
# 2 and 4 (4 twice) before; filtering removes 2 but keeps the target 4 -> rank 0.
# Row 1: target 5 is 5th (rank 4); seen 1 and 3 removed -> rank 2. The padding column scores
# highest.
# Row 2: a filler (weight 0) that would be a perfect hit.
HAND = [
    ([100.0, 0.1, 0.5, 0.3, 0.5, 0.2], 4, [2, 4, 4], 1.0),
    ([9.0, 0.9, 0.8, 0.7, 0.6, 0.5], 5, [1, 3], 1.0),
    ([0.0, 0.0, 0.0, 9.0, 0.0, 0.0], 3, [1], 0.0),
]


def test_hand_computed() -> None:
    ev = RankingEvaluator(5, np.array(POP), ks=(1, 3), segments=(1, 2))
    ev.update(**_batch(HAND))
    m = ev.compute()
    g = 1 / math.log2(3)
    expected = {
        "count": 2.0,
        "hr@1": 0.0,
        "hr@3": 0.5,
        "ndcg@1": 0.0,
        "ndcg@3": g / 2,
        "mrr": (1 / 2 + 1 / 5) / 2,
        "hr@1_filtered": 0.5,
        "hr@3_filtered": 1.0,
        "ndcg@1_filtered": 0.5,
        "ndcg@3_filtered": (1 + 0.5) / 2,
        "mrr_filtered": (1 + 1 / 3) / 2,
        # Filtered lists: row 0 -> 4, 3, 5 ; row 1 -> 2, 4, 5 (the filler's item 3 at top-1 is not
        # counted).
        "coverage@1": 2 / 5,
        "coverage@3": 4 / 5,
        "popularity@1": (40 + 20) / 2,
        "popularity@3": ((40 + 30 + 50) / 3 + (20 + 40 + 50) / 3) / 2,
        "popularity@1_relative": 30 / 50,
        "popularity@3_relative": ((120 + 110) / 6) / 50,
        # Histories of 3 and 2 items: segments 1-1, 2-2, 3+.
        "segment/1-1/count": 0.0,
        "segment/2-2/count": 1.0,
        "segment/3+/count": 1.0,
        "segment/2-2/hr@1_filtered": 0.0,
        "segment/2-2/ndcg@1_filtered": 0.0,
        "segment/3+/hr@1_filtered": 1.0,
        "segment/3+/ndcg@1_filtered": 1.0,
    }
    for name, value in expected.items():
        assert m[name] == pytest.approx(value, abs=1e-12), name
    assert math.isnan(m["segment/1-1/hr@1_filtered"])
    table = ev.segment_table(m)
    assert [r["segment"] for r in table] == ["1-1", "2-2", "3+"]
    assert table[2] == {"segment": "3+", "count": 1.0, "hr@1_filtered": 1.0, "ndcg@1_filtered": 1.0}


def test_tie_rule_is_stable_descending_sort() -> None:
    ev = RankingEvaluator(6, ks=(1, 2, 3, 4, 5, 6))
    # All equal: rank = number of smaller indices. -0.0 and 0.0 are equal scores.
    scores = torch.tensor([[7.0, 0.0, -0.0, 0.0, -0.0, 0.0, 0.0]])
    for target, rank in ((1, 0), (3, 2), (6, 5)):
        ev.reset()
        ev.update(
            scores, torch.tensor([target]), torch.tensor([], dtype=torch.int64), torch.tensor([0])
        )
        assert ev.compute()["mrr"] == pytest.approx(1 / (rank + 1)), target
    # A higher score beats any index; among equals the smaller index wins, also for negatives.
    ev.reset()
    s = torch.tensor([[0.0, -2.0, -1.0, -3.0, -1.0, -1.0, 5.0]])
    ev.update(s, torch.tensor([4]), torch.tensor([], dtype=torch.int64), torch.tensor([0]))
    assert ev.compute()["mrr"] == pytest.approx(1 / 3)  # 6 (5.0), 2 (-1.0, smaller index), then 4
    # Top-k lists follow the same order: the top-2 are items 6 and 2.
    assert ev.compute()["coverage@2"] == pytest.approx(2 / 6)
    assert torch.equal(ev._coverage[1].nonzero().flatten(), torch.tensor([2, 6]))


def test_padding_column_never_ranked_or_covered() -> None:
    ev = RankingEvaluator(3, ks=(1, 3))
    scores = torch.tensor([[1e9, 0.2, 0.1, 0.3]])
    ev.update(scores, torch.tensor([3]), torch.tensor([0, 1], dtype=torch.int64), torch.tensor([2]))
    m = ev.compute()
    assert m["hr@1"] == 1.0 and m["mrr"] == 1.0
    assert ev._coverage[:, 0].sum() == 0
    assert m["coverage@3"] == pytest.approx(2 / 3)  # 3, 2 after removing seen item 1; never 0


def test_filtered_list_shorter_than_k() -> None:
    ev = RankingEvaluator(3, np.array([0, 5, 7, 9]), ks=(3,))
    ev.update(
        torch.tensor([[0.0, 0.3, 0.2, 0.1]]),
        torch.tensor([3]),
        torch.tensor([1, 2]),
        torch.tensor([2]),
    )
    m = ev.compute()
    assert m["hr@3_filtered"] == 1.0 and m["mrr_filtered"] == 1.0
    assert m["coverage@3"] == pytest.approx(1 / 3)
    assert m["popularity@3"] == pytest.approx(9.0)  # averaged over the one item left


def test_weight_zero_rows_ignored() -> None:
    a = RankingEvaluator(5, np.array(POP), ks=(1, 3), segments=(1, 2))
    a.update(**_batch(HAND[:2]))
    b = RankingEvaluator(5, np.array(POP), ks=(1, 3), segments=(1, 2))
    b.update(**_batch(HAND))
    assert a.compute() == pytest.approx(b.compute(), nan_ok=True)


def _reference(
    scores: np.ndarray,
    target: np.ndarray,
    seen: list[list[int]],
    weight: np.ndarray,
    pop: np.ndarray,
    ks: tuple[int, ...],
    bounds: tuple[int, ...],
) -> dict[str, float]:
    """A direct implementation: stable argsort per row, then the definitions."""
    n = scores.shape[1] - 1
    sums: dict[str, float] = {}
    covered = {k: set() for k in ks}
    labels = segment_labels(bounds)

    def add(name: str, value: float, w: float) -> None:
        sums[name] = sums.get(name, 0.0) + w * value

    for s, t, hist, w in zip(scores, target, seen, weight.astype(float).tolist()):
        for suffix, removed in (("", set()), ("_filtered", set(hist) - {t})):
            order = [i for i in np.argsort(-s[1:], kind="stable") + 1 if i not in removed]
            rank = order.index(t)
            for k in ks:
                add(f"hr@{k}{suffix}", float(rank < k), w)
                add(f"ndcg@{k}{suffix}", 1 / math.log2(rank + 2) if rank < k else 0.0, w)
            add(f"mrr{suffix}", 1 / (rank + 1), w)
        for k in ks:
            add(f"popularity@{k}", float(np.mean(pop[order[:k]])), w)
            if w > 0:
                covered[k].update(order[:k])
        seg = labels[int(np.searchsorted(bounds, len(hist), side="left"))]
        add(f"segment/{seg}/count", 1.0, w)
        add(f"segment/{seg}/hr@{ks[0]}_filtered", float(rank < ks[0]), w)
        add(
            f"segment/{seg}/ndcg@{ks[0]}_filtered",
            1 / math.log2(rank + 2) if rank < ks[0] else 0.0,
            w,
        )
    count = float(weight.sum())
    out = {name: v / count for name, v in sums.items() if not name.startswith("segment/")}
    out["count"] = count
    for k in ks:
        out[f"coverage@{k}"] = len(covered[k]) / n
        out[f"popularity@{k}_relative"] = out[f"popularity@{k}"] / pop[1:].max()
    for label in labels:
        c = sums.get(f"segment/{label}/count", 0.0)
        out[f"segment/{label}/count"] = c
        for name in (f"hr@{ks[0]}_filtered", f"ndcg@{ks[0]}_filtered"):
            out[f"segment/{label}/{name}"] = (
                sums.get(f"segment/{label}/{name}", 0.0) / c if c else math.nan
            )
    return out


def _random_examples(seed: int, b: int = 40, n: int = 30) -> dict[str, object]:
    """Integer-valued scores (many ties), targets sometimes inside the history, some fillers."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=(b, n + 1)).astype(np.float32)
    target = rng.integers(1, n + 1, size=b)
    seen = [list(rng.integers(1, n + 1, size=rng.integers(0, 25))) for _ in range(b)]
    for i in range(0, b, 7):
        seen[i].append(int(target[i]))  # a re-consumed item: must stay rankable
    weight = (rng.random(b) > 0.15).astype(np.float32)
    pop = rng.integers(0, 100, size=n + 1).astype(np.float64)
    return {"scores": scores, "target": target, "seen": seen, "weight": weight, "pop": pop, "n": n}


def _update(ev: RankingEvaluator, ex: dict, rows: slice) -> None:
    seen = ex["seen"][rows]
    ev.update(
        torch.from_numpy(ex["scores"][rows]),
        torch.from_numpy(ex["target"][rows]),
        torch.tensor([i for s in seen for i in s], dtype=torch.int64),
        torch.tensor([len(s) for s in seen], dtype=torch.int64),
        torch.from_numpy(ex["weight"][rows]),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_implementation(seed: int) -> None:
    ex = _random_examples(seed)
    ks, bounds = (1, 5, 10), (3, 10)
    ev = RankingEvaluator(ex["n"], ex["pop"], ks=ks, segments=bounds)
    _update(ev, ex, slice(None))
    got = ev.compute()
    want = _reference(ex["scores"], ex["target"], ex["seen"], ex["weight"], ex["pop"], ks, bounds)
    assert set(got) == set(want)
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-12, nan_ok=True), name


def test_batching_invariance() -> None:
    ex = _random_examples(3, b=53)
    whole = RankingEvaluator(ex["n"], ex["pop"], ks=(1, 5, 10), segments=(3, 10))
    _update(whole, ex, slice(None))
    # Uneven external batches, and an internal row chunk of 2 rows (max_elements < 2 * (N + 1)).
    pieces = RankingEvaluator(ex["n"], ex["pop"], ks=(1, 5, 10), segments=(3, 10), max_elements=70)
    for lo, hi in ((0, 1), (1, 8), (8, 30), (30, 53)):
        _update(pieces, ex, slice(lo, hi))
    a, b = whole.compute(), pieces.compute()
    for name in a:
        assert b[name] == pytest.approx(a[name], abs=1e-12, nan_ok=True), name
    # segment_table() reuses compute()'s result until the next update or reset.
    assert pieces._last == b and pieces.segment_table() == pieces.segment_table(b)
    _update(pieces, ex, slice(0, 1))
    assert pieces._last is None
    pieces.reset()
    assert pieces.compute()["count"] == 0 and math.isnan(pieces.compute()["hr@1"])


def test_score_dtypes_agree() -> None:
    ex = _random_examples(4)
    results = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        ev = RankingEvaluator(ex["n"], ex["pop"], ks=(1, 5))
        seen = ex["seen"]
        ev.update(
            torch.from_numpy(ex["scores"]).to(dtype),
            torch.from_numpy(ex["target"]),
            torch.tensor([i for s in seen for i in s]),
            torch.tensor([len(s) for s in seen]),
            torch.from_numpy(ex["weight"]),
        )
        results.append(ev.compute())
    assert all(r == pytest.approx(results[0], nan_ok=True) for r in results)


def test_rejects_bad_input() -> None:
    ev = RankingEvaluator(3, ks=(1,))
    empty = torch.tensor([], dtype=torch.int64)
    with pytest.raises(ValueError, match="N \\+ 1"):
        ev.update(torch.zeros(1, 3), torch.tensor([1]), empty, torch.tensor([0]))
    with pytest.raises(ValueError, match="target"):
        ev.update(torch.zeros(1, 4), torch.tensor([0]), empty, torch.tensor([0]))
    with pytest.raises(ValueError, match="NaN"):
        ev.update(
            torch.tensor([[0.0, math.nan, 0.0, 0.0]]), torch.tensor([1]), empty, torch.tensor([0])
        )
    with pytest.raises(ValueError, match="sum to"):
        ev.update(torch.zeros(1, 4), torch.tensor([1]), empty, torch.tensor([2]))
    with pytest.raises(ValueError, match="segment_k"):
        RankingEvaluator(3, ks=(1, 2), segment_k=5)


# --- distributed: 2 gloo processes, each with part of the examples, against 1 process ---

DIST_KS, DIST_BOUNDS = (1, 5, 10), (3, 10)


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Top-level so that spawn can pickle it: evaluate this rank's share, write compute()."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        ex = _random_examples(5, b=41)
        ev = RankingEvaluator(ex["n"], ex["pop"], ks=DIST_KS, segments=DIST_BOUNDS)
        # Rank 0 takes rows 0..20 in two batches, rank 1 rows 21..40 plus a filler copy of row 0
        # with weight 0 (what the loader sends a rank left without examples).
        if rank == 0:
            _update(ev, ex, slice(0, 9))
            _update(ev, ex, slice(9, 21))
        else:
            _update(ev, ex, slice(21, 41))
            filler = {**ex, "weight": np.zeros_like(ex["weight"])}
            _update(ev, filler, slice(0, 1))
        metrics = ev.compute()
        # Rank 0 alone asks for the table, as a logger would: must reuse compute(), not reduce
        # again.
        table = ev.segment_table() if rank == 0 else []
        Path(out_dir, f"rank{rank}.json").write_text(
            json.dumps({"metrics": metrics, "table": table})
        )
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one(tmp_path: Path) -> None:
    ex = _random_examples(5, b=41)
    single = RankingEvaluator(ex["n"], ex["pop"], ks=DIST_KS, segments=DIST_BOUNDS)
    _update(single, ex, slice(None))
    want = single.compute()
    mp.spawn(_dist_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        got = result["metrics"]
        assert set(got) == set(want)
        for name, value in want.items():
            if math.isnan(value):
                assert math.isnan(got[name]), name
            else:
                assert got[name] == pytest.approx(value, abs=1e-7), name
    table = json.loads((tmp_path / "rank0.json").read_text())["table"]
    want_table = single.segment_table()
    assert (
        [r["segment"] for r in table]
        == [r["segment"] for r in want_table]
        == ["1-3", "4-10", "11+"]
    )
    for row, want_row in zip(table, want_table):
        for key in ("count", "hr@1_filtered", "ndcg@1_filtered"):
            assert row[key] == pytest.approx(want_row[key], abs=1e-7, nan_ok=True), (
                row["segment"],
                key,
            )
