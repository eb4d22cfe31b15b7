"""One batch's full ranking, accumulated over chunks of the catalogue: the item-chunk half of
:mod:`recforge.trainer.evaluation.metrics`, whose docstring gives the protocol and the tie rule.

Ranking keys are unique int64s, so counts are sums over chunks and the top-K merge is exact
whatever the chunking or the split of the items over ranks. This module does not import
Lightning.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

EXCLUDED_KEY = torch.iinfo(torch.int64).min
"""Key of items that must never rank (padding, filtered)."""


def ranking_keys(scores: Tensor, index_bits: int, low_bits: Tensor) -> Tensor:
    """Unique int64 keys ordered like the tie rule: by float32 score, then by smaller item index.

    The float32 order goes to the high bits through an order-preserving bit map, the reversed item
    index to the low ``index_bits`` bits. Written in place on one copy: on a million items, this is
    the bulk of the evaluation cost.
    """
    x = scores.to(torch.float32, copy=True)
    x.add_(0.0)  # turns -0.0 into +0.0 so that the two tie
    bits = x.view(torch.int32)
    # IEEE floats order like sign-magnitude integers; flipping the magnitude bits of negative
    # numbers turns that into two's-complement order.
    flip = bits >> 31
    bits.bitwise_xor_(flip.bitwise_and_(0x7FFFFFFF))
    del flip
    keys = bits.to(torch.int64)
    keys.mul_(1 << index_bits)  # |bits| < 2**31 and index_bits <= 31: no overflow
    keys.add_(low_bits)  # (N + 1,): (1 << index_bits) - 1 - item index
    return keys


class RankingPartial:
    """One batch's ranking, accumulated over item chunks (see the docstring of
    :mod:`recforge.trainer.evaluation.metrics`).

    Made by ``RankingEvaluator.begin`` (in that module). Per row it holds the number of items
    ranked before the target, unfiltered (``above``) and filtered (``above_filtered``), and the
    running top-K ranking keys (``top_keys``, descending; ``K = min(max(ks), N + 1)``). Every
    item of ``0..N`` must be added exactly once, by one chunk on one rank, before
    ``RankingEvaluator.finish``. The target's own column is given the key of the target score
    passed to ``RankingEvaluator.begin``, so the target is ranked by that one score.
    """

    def __init__(
        self,
        target: Tensor,
        target_key: Tensor,
        seen_row: Tensor,
        seen_item: Tensor,
        seen_lengths: Tensor,
        weight: Tensor,
        *,
        num_items: int,
        index_bits: int,
        low_bits: Tensor,
        top_width: int,
    ) -> None:
        b, dev = target.numel(), target.device
        # The evaluator's key layout: item count, index bits and (N + 1,) reversed-index bits.
        self._num_items, self._index_bits, self._low_bits = num_items, index_bits, low_bits
        self.target, self.target_key = target, target_key  # (B,), (B, 1)
        # Seen items to filter (the target already left out), sorted by item for chunk slicing.
        order = torch.argsort(seen_item, stable=True)
        self._seen_row, self._seen_item = seen_row[order], seen_item[order]
        self.seen_lengths, self.weight = seen_lengths, weight
        self.above = torch.zeros(b, dtype=torch.int64, device=dev)
        self.above_filtered = torch.zeros(b, dtype=torch.int64, device=dev)
        self.top_keys = torch.full((b, top_width), EXCLUDED_KEY, dtype=torch.int64, device=dev)

    @torch.no_grad()
    def add(self, lo: int, scores: Tensor) -> None:
        """Scores (B, c) of items ``lo .. lo + c - 1`` (item 0, padding, is never ranked)."""
        b = self.target.numel()
        if scores.dim() != 2 or scores.shape[0] != b:
            raise ValueError(f"chunk scores must be (B = {b}, c), got {tuple(scores.shape)}")
        c = scores.shape[1]
        hi = lo + c
        if lo < 0 or hi > self._num_items + 1:
            raise ValueError(f"items {lo}..{hi - 1} outside 0..{self._num_items}")
        if c == 0:
            return
        if bool(torch.isnan(scores).any()):
            raise ValueError("scores contain NaN")
        dev = self.target.device
        low_bits = self._low_bits.to(dev)[lo:hi]
        keys = ranking_keys(scores.to(dev), self._index_bits, low_bits)  # (B, c)
        if lo == 0:
            keys[:, 0] = EXCLUDED_KEY
        inside = (self.target >= lo) & (self.target < hi)
        rows = torch.nonzero(inside).flatten()
        keys[rows, self.target[rows] - lo] = self.target_key[rows, 0]
        tk = self.target_key
        self.above += torch.count_nonzero(keys > tk, dim=1)
        first, last = (
            int(x) for x in torch.searchsorted(self._seen_item, torch.tensor([lo, hi], device=dev))
        )
        if last > first:
            keys[self._seen_row[first:last], self._seen_item[first:last] - lo] = EXCLUDED_KEY
        self.above_filtered += torch.count_nonzero(keys > tk, dim=1)
        k = min(self.top_keys.shape[1], c)
        chunk_top = torch.topk(keys, k, dim=1).values
        self.top_keys = torch.topk(
            torch.cat([self.top_keys, chunk_top], dim=1), self.top_keys.shape[1], dim=1
        ).values

    @torch.no_grad()
    def combine(self, group: Any = None) -> None:
        """Sum the counts and merge the top-K keys over the ranks of ``group`` (a collective):
        for ranks that each added a disjoint part of the catalogue for the same rows."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size(group)
        if world == 1:
            return
        counts = torch.stack([self.above, self.above_filtered])
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        self.above, self.above_filtered = counts[0].clone(), counts[1].clone()
        gathered = [torch.empty_like(self.top_keys) for _ in range(world)]
        dist.all_gather(gathered, self.top_keys.contiguous(), group=group)
        self.top_keys = torch.topk(torch.cat(gathered, dim=1), self.top_keys.shape[1], dim=1).values
