"""Item-chunked and item-sharded ranking (docs/architecture.md §7): every chunking of the
catalogue, and every split of it over ranks, gives exactly the numbers of one (B, N + 1) matrix."""

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
from recforge.trainer.evaluation.metrics import RankingEvaluator
from tests.unit.test_metrics import _random_examples, _update

KS, BOUNDS = (1, 5, 10, 40), (3, 10)


def _same(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        if math.isnan(value):
            assert math.isnan(got[name]), name
        else:
            assert got[name] == value, name  # exact: the same integers, summed the same way


def _whole(ex: dict, split: int | None = None) -> dict[str, float]:
    """Unchunked metrics (the batches split at ``split``, so float sums add up alike)."""
    ev = RankingEvaluator(ex["n"], ex["pop"], ks=KS, segments=BOUNDS)
    _update(ev, ex, slice(0, split))
    if split is not None:
        _update(ev, ex, slice(split, None))
    return ev.compute()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("chunk", [1, 2, 7, 30, 31, 1000])
def test_item_chunks_equal_the_whole_matrix(seed: int, chunk: int) -> None:
    ex = _random_examples(seed, b=37)  # N = 30: chunks of 1, 2, 7, N, N + 1 and > N
    ev = RankingEvaluator(ex["n"], ex["pop"], ks=KS, segments=BOUNDS, item_chunk=chunk)
    _update(ev, ex, slice(0, 20))
    _update(ev, ex, slice(20, None))
    _same(ev.compute(), _whole(ex, split=20))


def test_row_blocks_of_item_chunks() -> None:
    # A row block of 2 rows (max_elements / item_chunk): equal up to float summation order.
    ex = _random_examples(2, b=37)
    ev = RankingEvaluator(ex["n"], ex["pop"], ks=KS, segments=BOUNDS, item_chunk=7, max_elements=14)
    _update(ev, ex, slice(None))
    got, want = ev.compute(), _whole(ex)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-12, nan_ok=True), name


def _begin(ev: RankingEvaluator, ex: dict, rows: slice = slice(None)):
    seen = ex["seen"][rows]
    scores = torch.from_numpy(ex["scores"][rows])
    target = torch.from_numpy(ex["target"][rows])
    partial = ev.begin(
        target,
        scores.gather(1, target.unsqueeze(1)).squeeze(1),
        torch.tensor([i for s in seen for i in s], dtype=torch.int64),
        torch.tensor([len(s) for s in seen], dtype=torch.int64),
        torch.from_numpy(ex["weight"][rows]),
    )
    return partial, scores


def test_chunks_in_any_order_and_of_any_sizes() -> None:
    ex = _random_examples(7, b=29)
    ev = RankingEvaluator(ex["n"], ex["pop"], ks=KS, segments=BOUNDS)
    partial, scores = _begin(ev, ex)
    bounds = [0, 1, 4, 5, 17, 18, 31]
    pieces = list(zip(bounds[:-1], bounds[1:]))
    for lo, hi in reversed(pieces):  # the padding column last, items out of order
        partial.add(lo, scores[:, lo:hi])
    ev.finish(partial)
    _same(ev.compute(), _whole(ex))


def test_target_is_ranked_by_the_given_target_score() -> None:
    # Chunk scores may compute the target's own column slightly differently (another kernel);
    # the target is ranked by the score given to begin(), consistently in every chunk.
    ev = RankingEvaluator(4, ks=(1, 4))
    partial = ev.begin(
        torch.tensor([2]),
        torch.tensor([0.5]),
        torch.tensor([], dtype=torch.int64),
        torch.tensor([0]),
    )
    partial.add(0, torch.tensor([[0.0, 0.5, 0.9]]))  # item 2's own column says 0.9: ignored
    partial.add(3, torch.tensor([[0.7, 0.1]]))
    ev.finish(partial)
    assert ev.compute()["mrr"] == pytest.approx(1 / 3)  # behind 3 (0.7) and 1 (0.5, smaller index)


def test_chunk_errors() -> None:
    ev = RankingEvaluator(4, ks=(1,))
    empty = torch.tensor([], dtype=torch.int64)
    with pytest.raises(ValueError, match="item_chunk"):
        RankingEvaluator(4, item_chunk=0)
    with pytest.raises(ValueError, match="NaN"):
        ev.begin(torch.tensor([1]), torch.tensor([math.nan]), empty, torch.tensor([0]))
    partial = ev.begin(torch.tensor([1]), torch.tensor([0.0]), empty, torch.tensor([0]))
    with pytest.raises(ValueError, match="outside"):
        partial.add(3, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="NaN"):
        partial.add(1, torch.tensor([[math.nan]]))


# --- 2 gloo processes: each ranks the SAME users against its own half of the catalogue ---


def _item_sharded_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        ex = _random_examples(11, b=45)
        ev = RankingEvaluator(ex["n"], ex["pop"], ks=KS, segments=BOUNDS, item_chunk=4)
        # Two batches of all 45 users; rank 0 holds items 0..12, rank 1 items 13..30 (uneven),
        # each scored in chunks of 4; each rank then adds only its own users (rows).
        lo, hi = (0, 13) if rank == 0 else (13, 31)
        for rows in (slice(0, 20), slice(20, 45)):
            partial, scores = _begin(ev, ex, rows)
            for c in range(lo, hi, 4):
                partial.add(c, scores[:, c : min(hi, c + 4)])
            partial.combine()
            b = scores.shape[0]
            mine = slice(0, b // 2) if rank == 0 else slice(b // 2, b)
            ev.finish(partial, rows=mine)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(ev.compute()))
    finally:
        dist.destroy_process_group()


def test_item_sharded_over_two_gloo_processes_matches_one(tmp_path: Path) -> None:
    ex = _random_examples(11, b=45)
    want = _whole(ex)
    mp.spawn(_item_sharded_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, value in want.items():
            if math.isnan(value):
                assert math.isnan(got[name]), name
            else:
                assert got[name] == pytest.approx(value, abs=1e-12), name
    assert np.isclose(got["count"], float(ex["weight"].sum()))
