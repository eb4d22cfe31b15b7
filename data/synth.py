"""Deterministic synthetic interaction data with structure a model can learn.

The data of ``recforge demo`` and of the tests, and the input of the ``data prepare``
benchmark (tens of millions of rows), so everything is vectorised with numpy: the only
Python loop runs over sequence positions, with array operations across all users.

The generative story:

- items: each in one category; Zipf popularity over a random ranking (so ids carry no
  popularity); a few successor items each, mostly from the same category;
- users: Dirichlet tastes over categories, lognormal sequence lengths, an activity window
  placed somewhere in a common time range (so a global-time split is meaningful);
- sequences: with probability ``transition_prob`` the next item is a random successor of
  the previous one, otherwise a draw from taste x popularity; an item already in the
  user's history is redrawn a few times, so repeats are rare (counted in synth.json);
- ratings 1-5, higher for items in the user's favoured categories.

Output directory (written to a temporary sibling, then renamed into place):
``interactions.parquet`` (rows shuffled like an event log), ``item_features.parquet``,
``user_features.parquet`` and ``synth.json``. The same config gives byte-identical files.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recforge.atomic import atomic_directory

INTERACTIONS = "interactions.parquet"
ITEM_FEATURES = "item_features.parquet"
USER_FEATURES = "user_features.parquet"
SUMMARY = "synth.json"

ROW_GROUP_SIZE = 1 << 20
REPEAT_RETRIES = 8
SAME_CATEGORY_SUCCESSOR = 0.8
LENGTH_SIGMA = 0.8
TAGS_PER_CATEGORY = 4
AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
COUNTRIES = ("US", "GB", "DE", "FR", "IN", "BR", "JP", "CA", "ES", "IT", "MX", "PL")

INTERACTIONS_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("timestamp", pa.int64()),
        ("rating", pa.float32()),
    ]
)


@dataclass
class SynthConfig:
    out: str
    """Output directory; must not exist unless ``generate(..., overwrite=True)``."""
    users: int = 1000
    """Number of users, ids 1..users; every user gets at least ``min_length`` interactions."""
    items: int = 500
    """Number of items, ids 1..items."""
    mean_length: float = 30.0
    """Mean interactions per user before clipping (lengths are lognormal)."""
    min_length: int = 5
    """Shortest sequence."""
    max_length: int = 500
    """Longest sequence."""
    categories: int = 20
    """Item categories; each item is in exactly one."""
    zipf_exponent: float = 1.1
    """Item popularity ~ rank ** -zipf_exponent (0 is uniform)."""
    transition_prob: float = 0.6
    """Chance that the next item is a successor of the previous one."""
    successors: int = 3
    """Successor items per item (mostly from the same category)."""
    taste_concentration: float = 0.3
    """Dirichlet concentration of user tastes over categories; small means few favourites."""
    start_timestamp: int = 1_577_836_800
    """Start of the common time range, in seconds (default 2020-01-01 UTC)."""
    time_span_days: float = 365.0
    """Length of the common time range."""
    seed: int = 0
    """Random seed; the same config and seed give byte-identical files."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"SynthConfig.{name}={getattr(self, name)!r}: {what}")

        need(
            isinstance(self.out, (str, os.PathLike)) and str(self.out) != "",
            "out",
            "must be a directory path",
        )
        for name in (
            "users",
            "items",
            "min_length",
            "max_length",
            "categories",
            "successors",
            "seed",
            "start_timestamp",
        ):
            value = getattr(self, name)
            need(
                isinstance(value, (int, np.integer)) and not isinstance(value, bool),
                name,
                "must be an integer",
            )
        for name in (
            "mean_length",
            "zipf_exponent",
            "transition_prob",
            "taste_concentration",
            "time_span_days",
        ):
            value = getattr(self, name)
            need(
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value),
                name,
                "must be a finite number",
            )
        need(self.users >= 1, "users", "must be >= 1")
        need(self.items >= 2, "items", "must be >= 2")
        need(
            1 <= self.categories <= self.items, "categories", f"must be in [1, items={self.items}]"
        )
        need(self.min_length >= 1, "min_length", "must be >= 1")
        need(
            self.max_length >= self.min_length,
            "max_length",
            f"must be >= min_length={self.min_length}",
        )
        need(
            self.min_length <= self.mean_length <= self.max_length,
            "mean_length",
            f"must be in [min_length={self.min_length}, max_length={self.max_length}]",
        )
        need(self.zipf_exponent >= 0, "zipf_exponent", "must be >= 0")
        need(0 <= self.transition_prob <= 1, "transition_prob", "must be in [0, 1]")
        need(1 <= self.successors < self.items, "successors", f"must be in [1, items={self.items})")
        need(self.taste_concentration > 0, "taste_concentration", "must be > 0")
        need(self.seed >= 0, "seed", "must be >= 0")
        need(self.start_timestamp >= 0, "start_timestamp", "must be >= 0")
        # Each user's window must hold max_length distinct seconds plus room to move.
        need(
            self.time_span_days * 86400 >= 4 * self.max_length,
            "time_span_days",
            f"must cover at least {4 * self.max_length} seconds",
        )


def generate(config: SynthConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Write the synthetic dataset directory ``config.out``; returns the summary in synth.json."""
    config.validate()
    out = Path(config.out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite=True to replace it)")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        summary = _write_all(config, tmp)
    summary["files"] = {key: str(out / name) for key, name in summary["files"].items()}
    return summary


def _write_all(config: SynthConfig, directory: Path) -> dict[str, Any]:
    # Independent streams, so e.g. changing the number of users leaves the catalog as it is.
    item_rng, user_rng, seq_rng, shuffle_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(4)
    )
    catalog = _make_catalog(config, item_rng)
    taste, lengths = _make_users(config, user_rng)
    seq = _make_sequences(config, catalog, taste, lengths, seq_rng)
    _write_interactions(directory / INTERACTIONS, seq, shuffle_rng)
    _write_item_features(directory / ITEM_FEATURES, config, catalog, item_rng)
    _write_user_features(directory / USER_FEATURES, config, taste, user_rng)
    summary = {
        "config": {**asdict(config), "out": str(config.out)},
        "interactions": int(seq["item"].size),
        "users": config.users,
        "items": config.items,
        "items_used": int(np.count_nonzero(np.bincount(seq["item"], minlength=config.items))),
        "categories": config.categories,
        "mean_length": float(lengths.mean()),
        "max_length_drawn": int(lengths.max()),
        "repeats": seq["repeats"],
        "min_timestamp": int(seq["timestamp"].min()),
        "max_timestamp": int(seq["timestamp"].max()),
        "files": {
            "interactions": INTERACTIONS,
            "item_features": ITEM_FEATURES,
            "user_features": USER_FEATURES,
            "summary": SUMMARY,
        },
    }
    with open(directory / SUMMARY, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
        f.write("\n")
    return summary


def _make_catalog(config: SynthConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n, n_cat = config.items, config.categories
    # Round-robin then shuffle: every category is non-empty and about the same size.
    category = rng.permutation(np.arange(n) % n_cat)
    rank = rng.permutation(n)
    popularity = (rank + 1.0) ** -config.zipf_exponent
    popularity /= popularity.sum()

    by_cat = np.argsort(category, kind="stable")
    cat_count = np.bincount(category, minlength=n_cat)
    cat_first = np.concatenate([[0], np.cumsum(cat_count)[:-1]])
    cum = np.cumsum(popularity[by_cat])
    cat_mass = np.add.reduceat(popularity[by_cat], cat_first)
    cat_lo = cum[cat_first] - popularity[by_cat][cat_first]

    # Successors are uniform within a category, not popular items: what follows an item is
    # then information that popularity alone does not give.
    s = config.successors
    own = np.repeat(np.arange(n), s).reshape(n, s)
    own_cat = category[own]
    pos = cat_first[own_cat] + (rng.random((n, s)) * cat_count[own_cat]).astype(np.int64)
    pos = np.minimum(pos, cat_first[own_cat] + cat_count[own_cat] - 1)
    same = by_cat[pos]
    # Step to the next member of the category instead of succeeding oneself.
    clash = (same == own) & (cat_count[own_cat] > 1)
    nxt = cat_first[own_cat] + (pos - cat_first[own_cat] + 1) % cat_count[own_cat]
    same = np.where(clash, by_cat[nxt], same)
    other = rng.integers(0, n, (n, s))
    other = np.where(other == own, (other + 1) % n, other)
    successor = np.where(rng.random((n, s)) < SAME_CATEGORY_SUCCESSOR, same, other)
    return {
        "category": category,
        "popularity": popularity,
        "by_cat": by_cat,
        "cum": cum,
        "cat_first": cat_first,
        "cat_last": cat_first + cat_count - 1,
        "cat_mass": cat_mass,
        "cat_lo": cat_lo,
        "successor": successor,
    }


def _make_users(config: SynthConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    gamma = rng.standard_gamma(config.taste_concentration, (config.users, config.categories))
    # Small concentrations can underflow a whole row to zero; keep every taste a distribution.
    gamma = np.maximum(gamma, 1e-12)
    taste = gamma / gamma.sum(axis=1, keepdims=True)
    mu = math.log(config.mean_length) - LENGTH_SIGMA**2 / 2
    lengths = np.rint(rng.lognormal(mu, LENGTH_SIGMA, config.users))
    lengths = np.clip(lengths, config.min_length, config.max_length).astype(np.int64)
    return taste, lengths


def _make_sequences(
    config: SynthConfig,
    cat: dict[str, np.ndarray],
    taste: np.ndarray,
    lengths: np.ndarray,
    rng: np.random.Generator,
) -> dict[str, Any]:
    n_users = config.users
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


def _write_interactions(path: Path, seq: dict[str, Any], rng: np.random.Generator) -> None:
    # A real event log is not grouped by user; loaders and `data prepare` must sort.
    perm = rng.permutation(seq["item"].size)
    with pq.ParquetWriter(path, INTERACTIONS_SCHEMA) as writer:
        for lo in range(0, perm.size, ROW_GROUP_SIZE):
            rows = perm[lo : lo + ROW_GROUP_SIZE]
            writer.write_table(
                pa.table(
                    {
                        "user_id": seq["user_id"][seq["user"][rows]],
                        "item_id": seq["item"][rows].astype(np.int64) + 1,
                        "timestamp": seq["timestamp"][rows],
                        "rating": seq["rating"][rows],
                    },
                    schema=INTERACTIONS_SCHEMA,
                ),
                row_group_size=ROW_GROUP_SIZE,
            )


def _names(prefix: str, count: int) -> pa.Array:
    width = max(2, len(str(count - 1)))
    return pa.array([f"{prefix}_{i:0{width}d}" for i in range(count)], pa.string())


def _decode(codes: np.ndarray, dictionary: pa.Array) -> pa.Array:
    return pa.DictionaryArray.from_arrays(
        pa.array(codes, pa.int32()), dictionary
    ).dictionary_decode()


def _write_item_features(
    path: Path, config: SynthConfig, cat: dict[str, np.ndarray], rng: np.random.Generator
) -> None:
    n, n_cat = config.items, config.categories
    category = cat["category"]
    # 1-3 distinct tags from the item's category's own tags, so tags refine the category.
    n_tags = rng.integers(1, 4, n)
    picks = np.argsort(rng.random((n, TAGS_PER_CATEGORY)), axis=1)[:, :3]
    keep = np.arange(3) < n_tags[:, None]
    tag_codes = (category[:, None] * TAGS_PER_CATEGORY + picks)[keep]
    tag_offsets = np.concatenate([[0], np.cumsum(n_tags)]).astype(np.int32)
    tags = pa.ListArray.from_arrays(
        pa.array(tag_offsets), _decode(tag_codes, _names("tag", n_cat * TAGS_PER_CATEGORY))
    )
    cat_price = rng.uniform(1.5, 4.5, n_cat)
    price = np.round(np.exp(cat_price[category] + 0.4 * rng.standard_normal(n)), 2).astype(
        np.float32
    )
    table = pa.table(
        {
            "item_id": np.arange(1, n + 1, dtype=np.int64),
            "category": _decode(category, _names("cat", n_cat)),
            "tags": tags,
            "price": price,
        }
    )
    pq.write_table(table, path)


def _write_user_features(
    path: Path, config: SynthConfig, taste: np.ndarray, rng: np.random.Generator
) -> None:
    n = config.users
    # Age follows the favourite category half of the time: a user feature with some signal.
    favourite = np.argmax(taste, axis=1) % len(AGE_BUCKETS)
    age = np.where(rng.random(n) < 0.5, favourite, rng.integers(0, len(AGE_BUCKETS), n))
    country_p = 1.0 / np.arange(1, len(COUNTRIES) + 1)
    country = rng.choice(len(COUNTRIES), n, p=country_p / country_p.sum())
    table = pa.table(
        {
            "user_id": np.arange(1, n + 1, dtype=np.int64),
            "age_bucket": _decode(age, pa.array(AGE_BUCKETS)),
            "country": _decode(country, pa.array(COUNTRIES)),
        }
    )
    pq.write_table(table, path)
