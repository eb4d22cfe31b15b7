"""How :mod:`recforge.data.synth` splits users into blocks, generated and written one at a time.

A block is a contiguous range of user ids holding about ``block_rows`` interactions. Everything
per user or per interaction lives only while its block is generated and written (one row group
of ``interactions.parquet``, one of ``user_features.parquet``), so peak memory depends on
``block_rows``, ``items`` and ``categories`` and not on the number of users or interactions.

Each block draws from its own random streams, derived from (seed, block index) alone, so a
block's rows do not depend on the blocks before it and the files are the same for the same
config. A set that fits in one block keeps the streams it always had.

The sequences of a block (:func:`make_sequences`, the bulk of the generative story told in
:mod:`recforge.data.synth`) are here too, being what a block's memory is spent on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from recforge.data.synth import SynthConfig

# Redraws of an item already in the user's history before the repeat is kept.
REPEAT_RETRIES = 8

# Spawn keys under SeedSequence(seed): 0 items, 1-3 users/sequences/shuffle of a one-block set,
# BLOCK_BRANCH + (block,) the streams of each block of a streamed set.
ITEM_STREAM = 0
ONE_BLOCK_STREAMS = (1, 2, 3)
BLOCK_BRANCH = 4


def stream(seed: int, *key: int) -> np.random.Generator:
    """The generator of SeedSequence(seed).spawn(...) at ``key``, without spawning its siblings."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


@dataclass(frozen=True)
class Block:
    index: int
    first_user: int
    """0-based: the block's user ids are first_user + 1 ... first_user + users."""
    users: int
    interactions: int | None
    """Exact interaction count of the block when the total is fixed, else None."""

    def streams(self, seed: int, count: int) -> tuple[np.random.Generator, ...]:
        """Users, sequences and shuffle generators of this block, one of ``count``."""
        if count == 1:
            return tuple(stream(seed, key) for key in ONE_BLOCK_STREAMS)
        return tuple(stream(seed, BLOCK_BRANCH, self.index, key) for key in range(3))


def block_count(users: int, mean_length: float, block_rows: int) -> int:
    users_per_block = max(1, int(block_rows // mean_length))
    return -(-users // users_per_block)


def blocks(
    users: int, mean_length: float, block_rows: int, interactions: int | None
) -> Iterator[Block]:
    """Blocks of near-equal user counts; with a fixed total, each gets its share of it.

    The share of block [lo, hi) is floor(N hi / users) - floor(N lo / users): the shares add up
    to N, and each stays within users x [min_length, max_length] whenever N does."""
    count = block_count(users, mean_length, block_rows)
    for b in range(count):
        lo, hi = users * b // count, users * (b + 1) // count
        share = (
            None
            if interactions is None
            else interactions * hi // users - interactions * lo // users
        )
        yield Block(index=b, first_user=lo, users=hi - lo, interactions=share)


def fit_lengths(
    lengths: np.ndarray, target: int, low: int, high: int, rng: np.random.Generator
) -> np.ndarray:
    """``lengths`` moved to sum to exactly ``target``, each kept in [low, high].

    Scaling keeps the lognormal shape; the rounding remainder is then spread one interaction at a
    time over random users with room, so no user is singled out."""
    fitted = np.clip(np.rint(lengths * (target / lengths.sum())), low, high).astype(np.int64)
    gap = target - int(fitted.sum())
    while gap:
        step = 1 if gap > 0 else -1
        room = np.flatnonzero(fitted < high if step > 0 else fitted > low)
        if room.size == 0:  # SynthConfig.validate rules this out; never loop forever
            raise ValueError(f"{lengths.size} lengths in [{low}, {high}] cannot sum to {target}")
        if room.size > abs(gap):
            room = rng.choice(room, abs(gap), replace=False)
        fitted[room] += step
        gap -= step * room.size
    return fitted


class Totals:
    """The summary figures of synth.json, gathered block by block."""

    def __init__(self, items: int) -> None:
        self.item_counts = np.zeros(items, dtype=np.int64)
        self.users = 0
        self.interactions = 0
        self.max_length = 0
        self.repeats = 0
        self.min_timestamp: int | None = None
        self.max_timestamp: int | None = None

    def add(self, lengths: np.ndarray, seq: dict[str, Any]) -> None:
        self.item_counts += np.bincount(seq["item"], minlength=self.item_counts.size)
        self.users += lengths.size
        self.interactions += int(seq["item"].size)
        self.max_length = max(self.max_length, int(lengths.max()))
        self.repeats += seq["repeats"]
        lo, hi = int(seq["timestamp"].min()), int(seq["timestamp"].max())
        self.min_timestamp = lo if self.min_timestamp is None else min(self.min_timestamp, lo)
        self.max_timestamp = hi if self.max_timestamp is None else max(self.max_timestamp, hi)

    def summary(self) -> dict[str, Any]:
        return {
            "interactions": self.interactions,
            "items_used": int(np.count_nonzero(self.item_counts)),
            "mean_length": self.interactions / self.users,
            "max_length_drawn": self.max_length,
            "repeats": self.repeats,
            "min_timestamp": self.min_timestamp,
            "max_timestamp": self.max_timestamp,
        }


def make_sequences(
    config: SynthConfig,
    cat: dict[str, np.ndarray],
    taste: np.ndarray,
    lengths: np.ndarray,
    rng: np.random.Generator,
) -> dict[str, Any]:
    n_users = lengths.size
    # Users sorted by length, longest first: the users still active at step t are a prefix,
    # so per-user state is sliced (a view), never gathered.
    order = np.argsort(-lengths, kind="stable")
    lengths_sorted = lengths[order]
    steps = int(lengths_sorted[0])
    active = np.searchsorted(-lengths_sorted, -np.arange(steps), side="left")
    offsets = np.concatenate([[0], np.cumsum(active)])
    total = int(offsets[-1])

    taste_sorted = taste[order]
    # P(category | user) is taste x the category's popularity mass: with P(item | category)
    # proportional to popularity this makes P(item | user) ~ taste[category(item)] x popularity.
    weights = taste_sorted * cat["cat_mass"]
    cat_cum = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1).astype(np.float32)
    n_cat = config.categories
    successor, n_succ = cat["successor"], config.successors

    # Each user's history is an open-addressing hash set of items in its own region of one
    # array (capacity a power of two >= 2 x length): each step inserts at most one item per
    # user, so the inserts of a step never collide and the check covers the whole history.
    capacity = 1 << np.ceil(np.log2(2 * lengths_sorted)).astype(np.int64)
    region = np.concatenate([[0], np.cumsum(capacity)[:-1]])
    hash_mask = (capacity - 1).astype(np.uint64)
    history = np.full(int(capacity.sum()), -1, dtype=np.int32)

    # `history` is passed in rather than closed over: it is deleted after the loop.
    def lookup(
        history: np.ndarray, rows: slice | np.ndarray, items: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per item: already in the user's history, and its slot or the free slot to take."""
        slot = (items.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)
        slot &= hash_mask[rows]
        slot = slot.astype(np.int64)
        base, mask = region[rows], capacity[rows] - 1
        found = np.zeros(items.size, dtype=bool)
        probing = np.arange(items.size)
        while probing.size:
            value = history[base[probing] + slot[probing]]
            found[probing] = value == items[probing]
            probing = probing[(value != -1) & ~found[probing]]
            slot[probing] = (slot[probing] + 1) & mask[probing]
        return found, base + slot

    prev = np.zeros(n_users, dtype=np.int64)
    clock = np.zeros(n_users)
    item_flat = np.empty(total, dtype=np.int32)
    clock_flat = np.empty(total)

    def draw(rows: slice | np.ndarray, n: int, follow_prev: bool) -> np.ndarray:
        c = (cat_cum[rows] < rng.random(n, dtype=np.float32)[:, None]).sum(axis=1)
        np.minimum(c, n_cat - 1, out=c)
        target = cat["cat_lo"][c] + rng.random(n) * cat["cat_mass"][c]
        pos = np.clip(
            np.searchsorted(cat["cum"], target, side="right"),
            cat["cat_first"][c],
            cat["cat_last"][c],
        )
        item = cat["by_cat"][pos]
        if follow_prev:
            follow = rng.random(n) < config.transition_prob
            nxt = successor[prev[rows], rng.integers(0, n_succ, n)]
            item = np.where(follow, nxt, item)
        return item

    repeats = 0
    for t in range(steps):
        n = int(active[t])
        cand = draw(slice(0, n), n, t > 0)
        found, slot = lookup(history, slice(0, n), cand)
        clash = np.flatnonzero(found)
        for _ in range(REPEAT_RETRIES):
            if clash.size == 0:
                break
            cand[clash] = draw(clash, clash.size, True)
            found[clash], slot[clash] = lookup(history, clash, cand[clash])
            clash = clash[found[clash]]
        repeats += int(clash.size)
        new = ~found
        history[slot[new]] = cand[new]
        prev[:n] = cand
        clock[:n] += rng.standard_exponential(n)
        item_flat[offsets[t] : offsets[t + 1]] = cand
        clock_flat[offsets[t] : offsets[t + 1]] = clock[:n]
    del history

    # Flat arrays are position-major: step t holds users 0..active[t]-1 (sorted order).
    user_flat = np.arange(total, dtype=np.int32) - np.repeat(offsets[:-1], active).astype(np.int32)
    step_flat = np.repeat(np.arange(steps, dtype=np.int64), active)

    # Each user's events are sorted uniform points in their own window (normalised
    # exponential gaps), the window lying somewhere in the common range.
    span = int(config.time_span_days * 86400) - config.max_length
    width = span * rng.uniform(0.1, 1.0, n_users)
    start = config.start_timestamp + np.floor(rng.random(n_users) * (span - width))
    end_clock = clock + rng.standard_exponential(n_users)
    frac = clock_flat
    frac /= end_clock[user_flat]
    frac *= width[user_flat]
    # floor is monotone and + step makes equal seconds strictly increasing.
    timestamp = np.floor(frac).astype(np.int64)
    del frac, clock_flat
    timestamp += start.astype(np.int64)[user_flat]
    timestamp += step_flat
    del step_flat

    affinity = taste_sorted[user_flat, cat["category"][item_flat]] * n_cat
    score = (
        3.0
        + 0.7 * np.log(np.maximum(affinity, 1e-3))
        + rng.standard_normal(total, dtype=np.float32) * 0.8
    )
    rating = np.clip(np.rint(score), 1, 5).astype(np.float32)
    del affinity, score
    return {
        "user": user_flat,
        "user_id": (order + 1).astype(np.int64),
        "item": item_flat,
        "timestamp": timestamp,
        "rating": rating,
        "repeats": repeats,
    }
