"""Full-ranking evaluation (docs/architecture.md §7): a batch-by-batch accumulator, correct across
ranks.

Protocol. Each example is one user with one held-out ``target`` item and the user's whole
history before it (``seen``). The model scores every item: a ``(B, N + 1)`` matrix whose column
0 is padding and is never ranked. The target's 0-based ``rank`` among items ``1..N`` is

    rank = #{items with a strictly higher score}
         + #{items with an equal score and a smaller item index}

i.e. its position in a *stable* sort by descending score, so ties are broken deterministically
in favour of the smaller item index (neither optimistically nor at random). Scores are compared
as float32 (float16/bfloat16 exactly, float64 rounded); ``-0.0 == 0.0``; NaN scores are refused.

Every metric comes in two flavours:

- *unfiltered*: all items ``1..N`` are ranked;
- ``_filtered``: the items of the user's history are removed from the ranking first, except
  the target itself (an item the user saw before and consumes again stays rankable). The history
  is everything before the target: on the test stage that includes the validation item.

Metric names returned by :meth:`RankingEvaluator.compute` (``K`` in ``ks``, default 10, 20, 100):

- ``count``: weighted number of examples (weight-0 filler rows count nowhere).
- ``hr@K``, ``hr@K_filtered``: hit rate, the share of examples with ``rank < K`` (= Recall@K,
  one target per example).
- ``ndcg@K``, ``ndcg@K_filtered``: mean of ``1 / log2(rank + 2)`` if ``rank < K``, else 0.
- ``mrr``, ``mrr_filtered``: mean of ``1 / (rank + 1)`` over the full ranking (no cut-off).
- ``coverage@K``: distinct items appearing in any *filtered* top-K list, divided by N.
- ``popularity@K``: mean training interaction count (``item_popularity``) of the items of the
  filtered top-K lists, averaged per list, then over examples.
- ``popularity@K_relative``: ``popularity@K`` divided by the largest item count, in [0, 1], so
  that it compares across datasets (NaN when every count is 0).
- ``segment/<lo>-<hi>/count``, ``segment/<lo>-<hi>/hr@S_filtered``,
  ``segment/<lo>-<hi>/ndcg@S_filtered``: the same restricted to examples whose history length
  (``seen_lengths``, repeats included) lies in ``lo..hi``; labels come from the ascending
  ``segments`` bounds (default ``1-5, 6-20, 21-50, 51-200, 201+``; a length-0 history, which
  the loader never produces, falls in the first); ``S`` = ``segment_k``, default the smallest K.

Rates over zero examples are NaN. A top-K list is shorter than K only when fewer than K
items remain after filtering; popularity then averages over the items it has.

Distributed use: every rank calls :meth:`update` on its own examples; :meth:`compute` is a
collective (every rank must call it) that all-reduces the weighted sums and the coverage
bitmaps when ``torch.distributed`` is initialised, then divides, so any split of the same
examples over ranks gives the same numbers. Filler rows (``weight`` 0) count nowhere.

Item chunks. The ranking is accumulated over chunks of the catalogue, so the ``(B, N + 1)``
matrix need never exist: :meth:`RankingEvaluator.begin` opens a :class:`RankingPartial` for a
batch given each target's score, :meth:`RankingPartial.add` takes the scores of one item chunk
(items ``lo .. lo + c - 1``) and adds, per row, the items ranked before the target (higher key)
with and without filtering, and merges the chunk's top-K keys into a running top-K; then
:meth:`RankingEvaluator.finish` turns the partial into metrics. Ranking keys are unique int64
(score, then reversed item index), so the counts are sums over chunks and the top-K merge is
exact: every chunking, and every split of the items over ranks (:meth:`RankingPartial.combine`:
all-reduce the counts, all-gather and merge the top-K keys), gives the same numbers as one
``(B, N + 1)`` matrix. :meth:`update` is that loop over a given score matrix.

Memory: temporaries are a few int64 copies of ``rows x item_chunk`` scores (rows: a row block of
about ``max_elements / item_chunk``) plus ``rows x max(ks)`` top-K keys, and the state is
``O(N)`` (coverage bitmaps), so a catalogue of a million items works; nothing is ever N x N.
This module does not import Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from recforge.trainer.evaluation.ranking_partial import EXCLUDED_KEY, RankingPartial, ranking_keys


def segment_labels(bounds: Sequence[int]) -> list[str]:
    """Labels of history-length segments: bounds (5, 20) -> ["1-5", "6-20", "21+"]."""
    labels, lo = [], 1
    for hi in bounds:
        labels.append(f"{lo}-{hi}")
        lo = hi + 1
    labels.append(f"{lo}+")
    return labels


class RankingEvaluator:
    """Accumulates full-ranking metrics over batches; see the module docstring for definitions.

    ``item_popularity``: ``(N + 1,)`` training interaction count per item (entry 0 ignored), used
    for the ``popularity@K`` metrics (``None``: all zero). ``segments``: ascending upper bounds of
    the history-length segments. ``device``: where the state lives (``cuda`` for NCCL, ``cpu`` for
    gloo).
    """

    def __init__(
        self,
        num_items: int,
        item_popularity: Tensor | np.ndarray | None = None,
        ks: Sequence[int] = (10, 20, 100),
        segments: Sequence[int] = (5, 20, 50, 200),
        device: str | torch.device = "cpu",
        segment_k: int | None = None,
        max_elements: int = 1 << 22,
        item_chunk: int | None = None,
    ) -> None:
        if not 1 <= num_items < 2**31:
            raise ValueError(f"num_items must be in [1, 2**31), got {num_items}")
        ks = tuple(sorted(set(int(k) for k in ks)))
        if not ks or ks[0] < 1:
            raise ValueError(f"ks must be positive integers, got {ks}")
        segments = tuple(int(s) for s in segments)
        if any(b <= a for a, b in zip((0, *segments), segments)):
            raise ValueError(
                f"segments must be strictly increasing positive bounds, got {segments}"
            )
        self.segment_k = ks[0] if segment_k is None else int(segment_k)
        if self.segment_k not in ks:
            raise ValueError(f"segment_k {self.segment_k} must be one of ks {ks}")
        if max_elements < 1:
            raise ValueError(f"max_elements must be >= 1, got {max_elements}")
        if item_chunk is not None and item_chunk < 1:
            raise ValueError(f"item_chunk must be >= 1 (or None: all items), got {item_chunk}")
        self.item_chunk = None if item_chunk is None else int(item_chunk)
        self.num_items, self.ks, self.segments = int(num_items), ks, segments
        self.device = torch.device(device)
        self.max_elements = int(max_elements)
        self.segment_names = segment_labels(segments)
        if item_popularity is None:
            item_popularity = np.zeros(num_items + 1)
        pop = torch.as_tensor(np.asarray(item_popularity), dtype=torch.float64).flatten()
        if pop.numel() != num_items + 1:
            raise ValueError(
                f"item_popularity must have N + 1 = {num_items + 1} entries, got {pop.numel()}"
            )
        self._popularity = pop.to(self.device)
        self._max_popularity = float(pop[1:].max())
        # Item index occupies the low bits of a ranking key; smaller index = larger key.
        self._index_bits = max(1, int(num_items).bit_length())
        self._low_bits: Tensor | None = None  # built on the scores' device at the first update
        # Names of the per-example quantities summed in ``_sums`` (weighted); order is fixed.
        self._sum_names = (
            [f"hr@{k}" for k in ks]
            + [f"ndcg@{k}" for k in ks]
            + ["mrr"]
            + [f"hr@{k}_filtered" for k in ks]
            + [f"ndcg@{k}_filtered" for k in ks]
            + ["mrr_filtered"]
            + [f"popularity@{k}" for k in ks]
        )
        self._bounds = torch.tensor(segments, dtype=torch.int64, device=self.device)
        self.listener: Any = None  # called with each finished row block (see finish)
        self.reset()

    def reset(self) -> None:
        """Forget every update (call at the start of each evaluation epoch)."""
        n_seg = len(self.segments) + 1
        self._count = torch.zeros((), dtype=torch.float64, device=self.device)
        self._sums = torch.zeros(len(self._sum_names), dtype=torch.float64, device=self.device)
        # Per segment: weighted count, hits@segment_k, ndcg@segment_k (filtered).
        self._segment_sums = torch.zeros(n_seg, 3, dtype=torch.float64, device=self.device)
        self._coverage = torch.zeros(
            len(self.ks), self.num_items + 1, dtype=torch.int32, device=self.device
        )
        self._last: dict[str, float] | None = None  # compute()'s result while no update followed

    @torch.no_grad()
    def update(
        self,
        scores: Tensor,
        target: Tensor,
        seen_values: Tensor,
        seen_lengths: Tensor,
        weight: Tensor | None = None,
    ) -> None:
        """Add one batch: ``scores`` (B, N + 1), ``target`` (B,) in 1..N, the users' histories as
        flat ``seen_values`` (S,) with ``seen_lengths`` (B,), ``weight`` (B,) (0 = filler row).

        The matrix is walked in row blocks and ``item_chunk`` column chunks through
        :meth:`begin`/:meth:`RankingPartial.add`/:meth:`finish`, the path that chunked and
        item-sharded scoring use too."""
        n1 = self.num_items + 1
        if scores.dim() != 2 or scores.shape[1] != n1:
            raise ValueError(f"scores must be (B, N + 1 = {n1}), got {tuple(scores.shape)}")
        b, dev = scores.shape[0], scores.device
        target, seen_values, seen_lengths, weight = self._check_batch(
            b, dev, target, seen_values, seen_lengths, weight
        )
        self._last = None
        if b == 0:
            return
        if bool(torch.isnan(scores).any()):
            raise ValueError("scores contain NaN")
        step = n1 if self.item_chunk is None else min(n1, self.item_chunk)
        seen_row = torch.repeat_interleave(torch.arange(b, device=dev), seen_lengths)
        rows = max(1, self.max_elements // step)
        for lo in range(0, b, rows):
            hi = min(b, lo + rows)
            in_block = (seen_row >= lo) & (seen_row < hi)
            block = scores[lo:hi]
            t = target[lo:hi]
            partial = self._begin(
                t,
                block.gather(1, t.unsqueeze(1)).squeeze(1),
                seen_row[in_block] - lo,
                seen_values[in_block],
                seen_lengths[lo:hi],
                weight[lo:hi],
            )
            for c in range(0, n1, step):
                partial.add(c, block[:, c : c + step])
            self.finish(partial, first_row=lo)

    def _check_batch(
        self,
        b: int,
        dev: torch.device,
        target: Tensor,
        seen_values: Tensor,
        seen_lengths: Tensor,
        weight: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        target = target.to(dev, torch.int64).flatten()
        seen_values = seen_values.to(dev, torch.int64).flatten()
        seen_lengths = seen_lengths.to(dev, torch.int64).flatten()
        weight = torch.ones(b, device=dev) if weight is None else weight.to(dev)
        weight = weight.to(torch.float64).flatten()
        if target.numel() != b or seen_lengths.numel() != b or weight.numel() != b:
            raise ValueError(
                f"target, seen_lengths and weight need B = {b} entries, got "
                f"{target.numel()}, {seen_lengths.numel()}, {weight.numel()}"
            )
        if int(seen_lengths.sum()) != seen_values.numel() or (b and int(seen_lengths.min()) < 0):
            raise ValueError("seen_lengths must be >= 0 and sum to len(seen_values)")
        if b and (int(target.min()) < 1 or int(target.max()) > self.num_items):
            raise ValueError(f"target items must lie in 1..{self.num_items}")
        if seen_values.numel() and (
            int(seen_values.min()) < 0 or int(seen_values.max()) > self.num_items
        ):
            raise ValueError(f"seen items must lie in 0..{self.num_items}")
        return target, seen_values, seen_lengths, weight

    @torch.no_grad()
    def begin(
        self,
        target: Tensor,
        target_scores: Tensor,
        seen_values: Tensor,
        seen_lengths: Tensor,
        weight: Tensor | None = None,
    ) -> RankingPartial:
        """Open the item-chunked ranking of one batch: ``target_scores`` (B,) is each target's
        score (what its column of the full matrix would hold); the rest as in :meth:`update`.
        Feed item chunks to :meth:`RankingPartial.add`, then call :meth:`finish`."""
        b = target.numel()
        dev = target_scores.device
        target, seen_values, seen_lengths, weight = self._check_batch(
            b, dev, target, seen_values, seen_lengths, weight
        )
        target_scores = target_scores.flatten()
        if target_scores.numel() != b:
            raise ValueError(f"target_scores need B = {b} entries, got {target_scores.numel()}")
        if bool(torch.isnan(target_scores).any()):
            raise ValueError("scores contain NaN")
        seen_row = torch.repeat_interleave(torch.arange(b, device=dev), seen_lengths)
        return self._begin(target, target_scores, seen_row, seen_values, seen_lengths, weight)

    def _begin(
        self,
        target: Tensor,
        target_scores: Tensor,
        seen_row: Tensor,
        seen_item: Tensor,
        seen_lengths: Tensor,
        weight: Tensor,
    ) -> RankingPartial:
        dev = target_scores.device
        if self._low_bits is None or self._low_bits.device != dev:
            self._low_bits = (
                (1 << self._index_bits) - 1 - torch.arange(self.num_items + 1, device=dev)
            )
        target_key = ranking_keys(
            target_scores.unsqueeze(1), self._index_bits, self._low_bits[target].unsqueeze(1)
        )
        # Filtering removes seen items except the target (duplicates in a history are harmless).
        drop = seen_item != target[seen_row]
        return RankingPartial(
            target,
            target_key,
            seen_row[drop],
            seen_item[drop],
            seen_lengths,
            weight,
            num_items=self.num_items,
            index_bits=self._index_bits,
            low_bits=self._low_bits,
            top_width=min(self.ks[-1], self.num_items + 1),
        )

    @torch.no_grad()
    def finish(
        self, partial: RankingPartial, rows: slice | None = None, first_row: int = 0
    ) -> None:
        """Add a :class:`RankingPartial` whose chunks cover the catalogue (after
        :meth:`RankingPartial.combine` when ranks scored disjoint item ranges); ``rows``: only
        these rows of it (each rank adds its own users once). A ``listener`` (:mod:`.bias`) then
        gets these rows' top items, as rows ``first_row..`` of the batch it was told about."""
        self._last = None
        sel = slice(None) if rows is None else rows
        top_keys = partial.top_keys[sel]
        valid = top_keys != EXCLUDED_KEY  # fewer than K rankable items after filtering
        mask = (1 << self._index_bits) - 1
        top_items = torch.where(valid, mask - (top_keys & mask), torch.zeros_like(top_keys))
        self._accumulate(
            partial.above[sel],
            partial.above_filtered[sel],
            top_items,
            valid,
            partial.seen_lengths[sel],
            partial.weight[sel],
        )
        if self.listener is not None:
            self.listener(
                first_row, top_items, valid, partial.above_filtered[sel], partial.weight[sel]
            )

    def _accumulate(
        self,
        rank: Tensor,
        rank_f: Tensor,
        top_items: Tensor,
        valid: Tensor,
        seen_lengths: Tensor,
        weight: Tensor,
    ) -> None:
        active = weight > 0
        w = weight.to(self.device)
        rank, rank_f = rank.to(self.device), rank_f.to(self.device)
        top_items, valid, active = (t.to(self.device) for t in (top_items, valid, active))
        per_example: list[Tensor] = []
        for r in (rank, rank_f):
            rf = r.to(torch.float64)
            gain = 1.0 / torch.log2(rf + 2.0)
            per_example += [(r < k).to(torch.float64) for k in self.ks]
            per_example += [torch.where(r < k, gain, torch.zeros_like(gain)) for k in self.ks]
            per_example.append(1.0 / (rf + 1.0))
        item_pop = self._popularity[top_items] * valid
        for i, k in enumerate(self.ks):
            n_valid = valid[:, :k].sum(1).clamp(min=1)
            per_example.append(item_pop[:, :k].sum(1) / n_valid)
            hit_items = top_items[:, :k][valid[:, :k] & active.unsqueeze(1)]
            self._coverage[i, hit_items] = 1
        self._sums += (torch.stack(per_example, 1) * w.unsqueeze(1)).sum(0)
        self._count += w.sum()

        segment = torch.bucketize(seen_lengths.to(self.device), self._bounds, right=False)
        k = self.segment_k
        hit = (rank_f < k).to(torch.float64)
        ndcg = hit / torch.log2(rank_f.to(torch.float64) + 2.0)
        contrib = torch.stack([w, w * hit, w * ndcg], 1)
        self._segment_sums.index_add_(0, segment, contrib)

    def _reduced(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The state summed over ranks (copies; the local state is left as it is)."""
        count, sums = self._count.clone(), self._sums.clone()
        segment_sums, coverage = self._segment_sums.clone(), self._coverage.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([count.reshape(1), sums, segment_sums.flatten()])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            # SUM of 0/1 bitmaps: an item is covered if any rank covered it (gloo and NCCL both
            # support int32 SUM, not every backend supports MAX on every dtype).
            dist.all_reduce(coverage, op=dist.ReduceOp.SUM)
            count, sums = flat[0], flat[1 : 1 + len(sums)]
            segment_sums = flat[1 + len(sums) :].reshape(segment_sums.shape)
        return count, sums, segment_sums, coverage

    def compute(self) -> dict[str, float]:
        """All metrics as a flat ``{name: float}`` dict (a collective under torch.distributed)."""
        count, sums, segment_sums, coverage = self._reduced()
        n = float(count)
        out: dict[str, float] = {"count": n}
        for name, total in zip(self._sum_names, sums.tolist()):
            out[name] = total / n if n > 0 else math.nan
        for i, k in enumerate(self.ks):
            out[f"coverage@{k}"] = float((coverage[i, 1:] > 0).sum()) / self.num_items
            pop = out[f"popularity@{k}"]
            out[f"popularity@{k}_relative"] = (
                pop / self._max_popularity if self._max_popularity > 0 else math.nan
            )
        k = self.segment_k
        for label, (c, h, g) in zip(self.segment_names, segment_sums.tolist()):
            out[f"segment/{label}/count"] = c
            out[f"segment/{label}/hr@{k}_filtered"] = h / c if c > 0 else math.nan
            out[f"segment/{label}/ndcg@{k}_filtered"] = g / c if c > 0 else math.nan
        self._last = dict(out)
        return out

    def segment_table(
        self, metrics: dict[str, float] | None = None
    ) -> list[dict[str, float | str]]:
        """One row per history-length segment: ``segment``, ``count``, filtered HR/NDCG@segment_k.

        Without ``metrics``, reuses the last :meth:`compute` result when no update came after it,
        so calling this on rank 0 only after every rank computed is safe; otherwise it calls
        :meth:`compute`, a collective that every rank must then join.
        """
        if metrics is None:
            metrics = self._last if self._last is not None else self.compute()
        k = self.segment_k
        return [
            {
                "segment": label,
                "count": metrics[f"segment/{label}/count"],
                f"hr@{k}_filtered": metrics[f"segment/{label}/hr@{k}_filtered"],
                f"ndcg@{k}_filtered": metrics[f"segment/{label}/ndcg@{k}_filtered"],
            }
            for label in self.segment_names
        ]
