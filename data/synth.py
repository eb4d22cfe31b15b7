"""Deterministic synthetic interaction data with structure a model can learn.

The data of ``recforge demo`` and of the tests, and the input of the ``data prepare``
benchmark (tens of millions of rows), so everything is vectorised with numpy: the only
Python loops run over blocks of users and sequence positions, with array operations across
the users of a block.

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

Sets larger than ``block_rows`` interactions are generated and written a block of users at a
time (:mod:`recforge.data.synth_stream`), so memory stays flat however many rows are asked for;
their rows are shuffled within each block, one row group per block, not across the whole file.
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
from recforge.data.synth_stream import (
    ITEM_STREAM,
    Block,
    Totals,
    block_count,
    blocks,
    fit_lengths,
    make_sequences,
    stream,
)

INTERACTIONS = "interactions.parquet"
ITEM_FEATURES = "item_features.parquet"
USER_FEATURES = "user_features.parquet"
SUMMARY = "synth.json"

ROW_GROUP_SIZE = 1 << 20
DEFAULT_USERS = 1000
DEFAULT_MEAN_LENGTH = 30.0
# A block needs ~100 bytes of memory per row: peak RSS ~250 MB at 1M rows, ~440 MB at 4M.
DEFAULT_BLOCK_ROWS = 2_000_000
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
USER_FEATURES_SCHEMA = pa.schema(
    [("user_id", pa.int64()), ("age_bucket", pa.string()), ("country", pa.string())]
)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SynthConfig:
    out: str
    """Output directory; must not exist unless ``generate(..., overwrite=True)``."""
    users: int | None = None
    """Number of users, ids 1..users; every user gets at least ``min_length`` interactions.
    Default 1000, or derived from ``interactions``."""
    items: int = 500
    """Number of items, ids 1..items."""
    mean_length: float | None = None
    """Mean interactions per user before clipping (lengths are lognormal). Default 30, or
    ``interactions / users`` when ``interactions`` is set."""
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
    interactions: int | None = None
    """Total interactions, exactly. With ``users``, mean_length becomes interactions / users;
    otherwise users = round(interactions / mean_length) (mean_length default 30), and then
    mean_length = interactions / users. All three given must agree. Lengths keep their lognormal
    shape, scaled and nudged to add up. None: the total is whatever the lengths add up to."""
    block_rows: int = DEFAULT_BLOCK_ROWS
    """About this many interactions are generated and written at a time (one row group each);
    memory grows with it, not with the data set. A set within one block is shuffled as a whole."""

    def __post_init__(self) -> None:
        self._resolve_size()
        self.validate()

    def _need(self, ok: bool, name: str, what: str) -> None:
        if not ok:
            raise ValueError(f"SynthConfig.{name}={getattr(self, name)!r}: {what}")

    def _resolve_size(self) -> None:
        """Fill in users and mean_length left as None (the rule is under ``interactions``)."""
        n = self.interactions
        if n is None:
            self.users = DEFAULT_USERS if self.users is None else self.users
            self.mean_length = DEFAULT_MEAN_LENGTH if self.mean_length is None else self.mean_length
            return
        self._need(_is_int(n) and n >= 1, "interactions", "must be an integer >= 1")
        if self.users is None:
            mean = DEFAULT_MEAN_LENGTH if self.mean_length is None else self.mean_length
            self._need(_is_number(mean) and mean > 0, "mean_length", "must be a number > 0")
            self.users = max(1, round(n / mean))
        else:
            self._need(_is_int(self.users) and self.users >= 1, "users", "must be an integer >= 1")
            self._need(
                self.mean_length is None
                or (
                    _is_number(self.mean_length) and math.isclose(self.mean_length, n / self.users)
                ),
                "mean_length",
                f"conflicts with interactions={n} over users={self.users} (a mean of "
                f"{n / self.users:g}); give at most two of interactions, users and mean_length",
            )
        self.mean_length = n / self.users

    def validate(self) -> None:
        need = self._need
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
            "block_rows",
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
        need(
            self.interactions is None or (_is_int(self.interactions) and self.interactions >= 1),
            "interactions",
            "must be an integer >= 1 (or None)",
        )
        need(self.block_rows >= 1, "block_rows", "must be >= 1")
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
        if self.interactions is not None:
            mean = self.interactions / self.users
            need(
                self.min_length <= mean <= self.max_length,
                "interactions",
                f"over users={self.users} is a mean of {mean:g} per user, outside [min_length="
                f"{self.min_length}, max_length={self.max_length}]",
            )
            need(math.isclose(self.mean_length, mean), "mean_length", f"must be {mean:g}")
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
    item_rng = stream(config.seed, ITEM_STREAM)
    catalog = _make_catalog(config, item_rng)
    _write_item_features(directory / ITEM_FEATURES, config, catalog, item_rng)
    count = block_count(config.users, config.mean_length, config.block_rows)
    totals = Totals(config.items)
    with (
        pq.ParquetWriter(directory / INTERACTIONS, INTERACTIONS_SCHEMA) as interactions,
        pq.ParquetWriter(directory / USER_FEATURES, USER_FEATURES_SCHEMA) as user_features,
    ):
        for block in blocks(
            config.users, config.mean_length, config.block_rows, config.interactions
        ):
            user_rng, seq_rng, shuffle_rng = block.streams(config.seed, count)
            taste, lengths = _make_users(config, block, user_rng)
            seq = make_sequences(config, catalog, taste, lengths, seq_rng)
            seq["user_id"] += block.first_user
            # One block keeps the row groups of a whole-file shuffle; a streamed block is one.
            group = ROW_GROUP_SIZE if count == 1 else max(1, seq["item"].size)
            _write_interactions(interactions, seq, shuffle_rng, group)
            _write_user_features(user_features, block, taste, user_rng)
            totals.add(lengths, seq)
            del seq, taste, lengths
    summary = {
        "config": {**asdict(config), "out": str(config.out)},
        "users": config.users,
        "items": config.items,
        "categories": config.categories,
        "blocks": count,
        **totals.summary(),
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


def _make_users(
    config: SynthConfig, block: Block, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    gamma = rng.standard_gamma(config.taste_concentration, (block.users, config.categories))
    # Small concentrations can underflow a whole row to zero; keep every taste a distribution.
    gamma = np.maximum(gamma, 1e-12)
    taste = gamma / gamma.sum(axis=1, keepdims=True)
    mu = math.log(config.mean_length) - LENGTH_SIGMA**2 / 2
    lengths = np.rint(rng.lognormal(mu, LENGTH_SIGMA, block.users))
    lengths = np.clip(lengths, config.min_length, config.max_length).astype(np.int64)
    if block.interactions is not None:
        lengths = fit_lengths(
            lengths, block.interactions, config.min_length, config.max_length, rng
        )
    return taste, lengths


def _write_interactions(
    writer: pq.ParquetWriter, seq: dict[str, Any], rng: np.random.Generator, row_group_size: int
) -> None:
    # A real event log is not grouped by user; loaders and `data prepare` must sort.
    perm = rng.permutation(seq["item"].size)
    for lo in range(0, perm.size, row_group_size):
        rows = perm[lo : lo + row_group_size]
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
            row_group_size=row_group_size,
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
    writer: pq.ParquetWriter, block: Block, taste: np.ndarray, rng: np.random.Generator
) -> None:
    n = block.users
    # Age follows the favourite category half of the time: a user feature with some signal.
    favourite = np.argmax(taste, axis=1) % len(AGE_BUCKETS)
    age = np.where(rng.random(n) < 0.5, favourite, rng.integers(0, len(AGE_BUCKETS), n))
    country_p = 1.0 / np.arange(1, len(COUNTRIES) + 1)
    country = rng.choice(len(COUNTRIES), n, p=country_p / country_p.sum())
    table = pa.table(
        {
            "user_id": np.arange(block.first_user + 1, block.first_user + n + 1, dtype=np.int64),
            "age_bucket": _decode(age, pa.array(AGE_BUCKETS)),
            "country": _decode(country, pa.array(COUNTRIES)),
        },
        schema=USER_FEATURES_SCHEMA,
    )
    writer.write_table(table)
