"""The bias report (trainer/evaluation/bias.py, docs/architecture.md §7): every metric against a
hand computation on a tiny case, row blocks and item chunks change nothing, and 2 real gloo
processes (users split over ranks, and items sharded over ranks) give the numbers of 1."""

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
from recforge.trainer.evaluation.bias import BiasAccumulator, Categories, choose_category, gini
from recforge.trainer.evaluation.metrics import RankingEvaluator

POP = [0, 10, 20, 30, 40, 50]  # training count of items 1..5 (C = 150)
# Item categories (one per item): 1 a, 2 a, 3 b, 4 c, 5 c.
ITEM_CATS = Categories.from_arrays("genre", [0, 0, 1, 2, 3, 4, 5], [1, 1, 2, 3, 3], 4, "abc")
# Users 1 F, 2 M, 3 F, 4 missing.
GENDER = Categories.from_arrays("gender", [0, 0, 1, 2, 3, 4], [1, 2, 1, 0], 3, ["F", "M"])
# (scores incl. padding column, target, history, user, weight). Filtered top-2 lists:
# A [2, 5], target 3 at filtered rank 3 (miss); B [5, 4], target 4 at rank 1 (hit);
# D [1, 4], target 1 at rank 0 (hit); E a filler (weight 0) that would count everywhere.
ROWS = [
    ([0.0, 0.9, 0.8, 0.1, 0.2, 0.3], 3, [1], 1, 1.0),
    ([0.0, 0.1, 0.2, 0.3, 0.8, 0.9], 4, [2, 3], 2, 1.0),
    ([0.0, 0.9, 0.1, 0.2, 0.3, 0.95], 1, [5], 3, 1.0),
    ([0.0, 0.9, 0.8, 0.7, 0.6, 0.5], 2, [3], 4, 0.0),
]


def _run(
    ev_kwargs: dict | None = None, vectors: torch.Tensor | None = None, categories=ITEM_CATS
) -> dict[str, float]:
    ev = RankingEvaluator(5, np.array(POP), ks=(2, 3), segments=(1,), **(ev_kwargs or {}))
    bias = BiasAccumulator(5, np.array(POP), 2, categories, {"gender": GENDER})
    bias.set_item_vectors(vectors)
    bias.attach(ev)
    seen = [r[2] for r in ROWS]
    seen_values = torch.tensor([i for s in seen for i in s])
    seen_lengths = torch.tensor([len(s) for s in seen])
    bias.batch(seen_values, seen_lengths, torch.tensor([r[3] for r in ROWS]))
    ev.update(
        torch.tensor([r[0] for r in ROWS]),
        torch.tensor([r[1] for r in ROWS]),
        seen_values,
        seen_lengths,
        torch.tensor([r[4] for r in ROWS]),
    )
    return {**ev.compute(), **bias.compute(), "_details": bias.details()}


def test_hand_computed() -> None:
    m = _run()
    info = {i: -math.log2(POP[i] / 150) for i in range(1, 6)}
    g = 1 / math.log2(3)
    # Recommendation counts of items 1..5: 1, 1, 0, 2, 2 -> sorted 0 1 1 2 2, sum 6.
    assert m["gini@2"] == pytest.approx((-2 * 1 + 0 * 1 + 2 * 2 + 4 * 2) / (5 * 6))
    assert m["coverage@2"] == pytest.approx(4 / 5)
    assert m["novelty@2"] == pytest.approx(
        ((info[2] + info[5]) / 2 + (info[5] + info[4]) / 2 + (info[1] + info[4]) / 2) / 3
    )
    assert m["ild@2"] == pytest.approx((1 + 0 + 1) / 3)  # (a, c), (c, c), (a, c)
    # Calibration: A p = {a: 1}, q = {a: .5, c: .5} -> q~(a) = .99 * .5 + .01 = .505;
    # B p = {a: .5, b: .5}, q = {c: 1} -> q~(a) = q~(b) = .005; D like A with c.
    kl_a, kl_b = math.log(1 / 0.505), 2 * 0.5 * math.log(0.5 / 0.005)
    assert m["calibration_kl@2"] == pytest.approx((kl_a + kl_b + kl_a) / 3)
    # Popularity: recommended 35, 45, 25 (mean 35); histories 10, 25, 50 (mean 85 / 3).
    assert m["history_popularity"] == pytest.approx(85 / 3)
    assert m["popularity_lift@2"] == pytest.approx(35 / (85 / 3))
    # Groups: F = users 1 (miss) and 3 (hit at rank 0); M = user 2 (hit at rank 1).
    assert m["group/gender/F/count"] == 2 and m["group/gender/M/count"] == 1
    assert m["group/gender/F/hr@2_filtered"] == 0.5
    assert m["group/gender/F/ndcg@2_filtered"] == pytest.approx(0.5)
    assert m["group/gender/M/ndcg@2_filtered"] == pytest.approx(g)
    assert m["group/gender/hr@2_filtered_max_min_ratio"] == pytest.approx(2.0)
    assert m["group/gender/ndcg@2_filtered_max_min_ratio"] == pytest.approx(g / 0.5)
    assert "group/gender/missing/count" not in m, "the filler's group counts nowhere"
    d = m["_details"]
    assert d["diversity_basis"] == "category:genre"
    assert d["lorenz"][0] == [0.0, 0.0] and d["lorenz"][-1] == [1.0, 1.0]
    assert sum(d["popularity_bins"]["recommended"]) == pytest.approx(1.0)


def test_ild_by_embeddings() -> None:
    # Items 1 (1, 0), 2 (0, 1), 4 (1, 1), 5 (2, 0): lists A [2, 5] cos 0, B [5, 4] and
    # D [1, 4] cos 1/sqrt 2. Without categories there is no calibration.
    vectors = torch.tensor([[0, 0], [1, 0], [0, 1], [3, 4], [1, 1], [2, 0]], dtype=torch.float32)
    m = _run(vectors=vectors, categories=None)
    assert m["ild@2"] == pytest.approx((1 + 2 * (1 - 1 / math.sqrt(2))) / 3)
    assert "calibration_kl@2" not in m
    assert m["_details"]["diversity_basis"] == "embedding"


@pytest.mark.parametrize(
    "kwargs", [{"max_elements": 6}, {"item_chunk": 2}, {"item_chunk": 1, "max_elements": 2}]
)
def test_row_blocks_and_item_chunks_change_nothing(kwargs: dict) -> None:
    # max_elements 6 = one row per block: the listener is told each block's first row.
    want, got = _run(), _run(kwargs)
    for name, value in want.items():
        if name != "_details":
            assert got[name] == pytest.approx(value, abs=1e-12), name


def test_gini_and_category_choice() -> None:
    assert gini(torch.tensor([3.0, 3.0, 3.0])) == 0.0
    assert gini(torch.tensor([0.0, 0.0, 0.0, 8.0])) == pytest.approx(3 / 4)  # (N - 1) / N
    assert math.isnan(gini(torch.zeros(4)))
    features = {
        "title": {"kind": "categorical", "cardinality": 900},
        "genre": {"kind": "list", "cardinality": 19},
        "price": {"kind": "numeric"},
    }
    assert choose_category(features, "auto") == "genre"
    assert choose_category(features, None) is None
    assert choose_category({}, "auto") is None
    with pytest.raises(ValueError, match="price"):
        choose_category(features, "price")


def test_list_categories_spread_one_unit_per_item() -> None:
    # Item 1 has categories {1, 2}, item 2 {2}: shares .5/.5 and 1; unit vectors 1/sqrt 2.
    cats = Categories.from_arrays("tags", [0, 0, 2, 3], [1, 2, 2], 3, ["x", "y"])
    dist_, described = cats.distribution(torch.tensor([0, 0]), torch.tensor([1, 2]), 1)
    assert dist_.tolist() == [[0.0, 0.5, 1.5]] and described.tolist() == [2.0]


def test_group_by_on_a_prepared_directory(tmp_path: Path) -> None:
    """``from_data`` on tiny features data: the same per-group numbers as the hand case, groups
    and categories read from the prepared files (users 1 and 3 in group 1, user 2 in group 2)."""
    from recforge.trainer.evaluation.bias import from_data
    from tests.unit.loader_fixtures import write_prepared

    d = write_prepared(
        tmp_path / "prep",
        [[1, 2], [2, 3, 4], [5, 1], [3, 2]],
        num_items=5,
        item_features={
            "genre": ("categorical", [1, 1, 2, 3, 3], 4),
            "title": ("categorical", [1, 2, 3, 4, 5], 6),
            "price": ("numeric", [1.0, 2.0, 3.0, 4.0, 5.0], 0),
        },
        user_features={
            "gender": ("categorical", [1, 2, 1, 0], 3),
            "score": ("numeric", [1.0, 2.0, 3.0, 4.0], 0),
        },
    )
    manifest = json.loads((d / "manifest.json").read_text())
    bias = from_data(str(d), manifest, np.array(POP), 2, "auto", ["gender"], 0.01, "cpu")
    assert bias.categories.name == "genre", "auto: the feature with the fewest values"
    ev = RankingEvaluator(5, np.array(POP), ks=(2, 3), segments=(1,))
    bias.attach(ev)
    seen = [r[2] for r in ROWS]
    seen_values = torch.tensor([i for s in seen for i in s])
    seen_lengths = torch.tensor([len(s) for s in seen])
    bias.batch(seen_values, seen_lengths, torch.tensor([r[3] for r in ROWS]))
    ev.update(
        torch.tensor([r[0] for r in ROWS]),
        torch.tensor([r[1] for r in ROWS]),
        seen_values,
        seen_lengths,
        torch.tensor([r[4] for r in ROWS]),
    )
    got, want = bias.compute(), _run()
    assert got["group/gender/1/count"] == 2 and got["group/gender/2/count"] == 1
    for name in ("ndcg@2_filtered", "hr@2_filtered"):
        assert got[f"group/gender/1/{name}"] == want[f"group/gender/F/{name}"]
        assert got[f"group/gender/2/{name}"] == want[f"group/gender/M/{name}"]
        ratio = f"group/gender/{name}_max_min_ratio"
        assert got[ratio] == want[ratio]
    assert got["calibration_kl@2"] == pytest.approx(want["calibration_kl@2"])
    with pytest.raises(ValueError, match="score"):
        from_data(str(d), manifest, np.array(POP), 2, "auto", ["score"], 0.01, "cpu")


# --- 2 gloo processes against 1 ---


def _random_case(seed: int, b: int = 41, n: int = 30) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "scores": rng.integers(0, 6, size=(b, n + 1)).astype(np.float32),
        "target": rng.integers(1, n + 1, size=b),
        "seen": [list(rng.integers(1, n + 1, size=rng.integers(1, 12))) for _ in range(b)],
        "user": rng.integers(1, 21, size=b),
        "weight": (rng.random(b) > 0.15).astype(np.float32),
        "pop": rng.integers(0, 100, size=n + 1).astype(np.float64),
        "n": n,
    }


def _random_setup(ex: dict) -> tuple[RankingEvaluator, BiasAccumulator]:
    rng = np.random.default_rng(99)
    n = ex["n"]
    lens = rng.integers(0, 3, size=n)  # list categories, some items without any
    offsets = np.concatenate([[0, 0], np.cumsum(lens)])
    cats = Categories.from_arrays("c", offsets, rng.integers(1, 5, size=lens.sum()), 5, "wxyz")
    users = Categories.from_arrays(
        "g", np.concatenate([[0], np.arange(21)]), rng.integers(0, 4, size=20), 4, "pqr"
    )
    ev = RankingEvaluator(n, ex["pop"], ks=(5, 10))
    bias = BiasAccumulator(n, ex["pop"], 5, cats, {"g": users})
    bias.attach(ev)
    return ev, bias


def _tensors(ex: dict, rows: slice) -> tuple:
    seen = ex["seen"][rows]
    return (
        torch.from_numpy(ex["scores"][rows]),
        torch.from_numpy(ex["target"][rows]),
        torch.tensor([i for s in seen for i in s], dtype=torch.int64),
        torch.tensor([len(s) for s in seen], dtype=torch.int64),
        torch.from_numpy(ex["weight"][rows]),
        torch.from_numpy(ex["user"][rows]),
    )


def _update(ev: RankingEvaluator, bias: BiasAccumulator, ex: dict, rows: slice) -> None:
    scores, target, seen, lengths, weight, user = _tensors(ex, rows)
    bias.batch(seen, lengths, user)
    ev.update(scores, target, seen, lengths, weight)


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        ex = _random_case(5)
        # Users split over ranks (rank 0: two batches; rank 1: the rest and a filler row).
        ev, bias = _random_setup(ex)
        if rank == 0:
            _update(ev, bias, ex, slice(0, 9))
            _update(ev, bias, ex, slice(9, 21))
        else:
            _update(ev, bias, ex, slice(21, 41))
            _update(ev, bias, {**ex, "weight": np.zeros_like(ex["weight"])}, slice(0, 1))
        split = {**ev.compute(), **bias.compute()}
        # Item-sharded: every rank ranks all users against its own items, then adds its own
        # rows (as the LightningModule does: the bias context is the rank's own batch).
        ev, bias = _random_setup(ex)
        lo, hi = (0, 13) if rank == 0 else (13, 31)
        scores, target, seen, lengths, weight, user = _tensors(ex, slice(None))
        partial = ev.begin(
            target, scores.gather(1, target.unsqueeze(1))[:, 0], seen, lengths, weight
        )
        partial.add(lo, scores[:, lo:hi])
        partial.combine()
        mine = slice(0, 20) if rank == 0 else slice(20, 41)
        _, _, seen_m, lengths_m, _, user_m = _tensors(ex, mine)
        bias.batch(seen_m, lengths_m, user_m)
        ev.finish(partial, rows=mine)
        sharded = {**ev.compute(), **bias.compute()}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps([split, sharded]))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one(tmp_path: Path) -> None:
    ex = _random_case(5)
    ev, bias = _random_setup(ex)
    _update(ev, bias, ex, slice(None))
    want = {**ev.compute(), **bias.compute()}
    assert want["count"] > 30 and any(k.startswith("group/g/") for k in want)
    mp.spawn(_dist_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        for got in json.loads((tmp_path / f"rank{rank}.json").read_text()):
            assert set(got) == set(want)
            for name, value in want.items():
                assert got[name] == pytest.approx(value, abs=1e-9, nan_ok=True), name
