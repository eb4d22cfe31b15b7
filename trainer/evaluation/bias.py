"""Bias and filter-bubble report of an evaluation (docs/architecture.md §7), computed from the
top-K lists the :class:`~recforge.trainer.evaluation.metrics.RankingEvaluator` already builds.

:class:`BiasAccumulator` attaches to an evaluator as its ``listener``: every finished row block
hands it the block's filtered top-K items, filtered ranks and weights, and the accumulator reads
the users' histories and ids from the batch context set by :meth:`BiasAccumulator.batch`. With
``k`` the bias cut-off (the evaluator's smallest K), ``L_u`` user u's filtered top-k list, ``H_u``
the history before the target, ``c_i`` item i's training interaction count and ``C = sum c_i``:

- ``gini@k``: Gini index of the recommendation counts ``r_i`` (lists holding item i, weighted)
  over all N items, sorted ascending: ``sum_j (2j - N - 1) r_(j) / (N sum r)``; 0 = every item
  recommended equally, (N - 1) / N = one item only. (Coverage is the evaluator's ``coverage@K``.)
- ``novelty@k``: mean over lists of the mean self-information ``-log2(max(c_i, 1) / C)`` of the
  list's items (an item unseen in training counts as seen once, so the value stays finite).
- ``ild@k``: intra-list diversity, mean over lists (of at least 2 described items) of the mean
  pairwise distance ``1 - cos(x_i, x_j)``. ``x_i`` is item i's category indicator vector when
  a category feature is used (one category: distance 1 if they differ, else 0), else its
  embedding. Computed as ``1 - (|sum x|^2 - sum |x|^2) / (m (m - 1))`` on unit vectors.
- ``calibration_kl@k``: mean over users with a categorised history of
  ``KL(p_u || q~_u) = sum_g p_u(g) ln(p_u(g) / q~_u(g))`` (nats; Steck 2018): ``p_u`` the
  history's category distribution (each item spreads weight 1 evenly over its categories;
  averaged over the history's categorised items), ``q_u`` the list's, smoothed
  ``q~ = (1 - alpha) q + alpha p`` (``alpha`` 0.01) so that KL is finite; a list without any
  categorised item scores ``ln(1 / alpha)``.
- ``popularity_lift@k``: ``mean_u mean_{i in L_u} c_i / mean_u mean_{i in H_u} c_i``
  (``history_popularity`` is the denominator); above 1, lists are more popular than histories.
- Per user group (``group_by``; categorical user features): ``group/<f>/<value>/count``,
  ``.../hr@k_filtered``, ``.../ndcg@k_filtered``, and ``group/<f>/<metric>_max_min_ratio`` over
  the groups with users (the missing value, code 0, is reported but left out of the ratio).

Distributed-correct like the evaluator: every state is a weighted sum (the recommendation counts
a dense ``(N + 1,)`` float64 vector) that :meth:`compute`, a collective, all-reduces before
dividing, so any split of the users over ranks gives the same numbers. Filler rows (weight 0)
count nowhere. No Lightning, MLflow, tracking or export here (import-linter contract).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

EMBEDDING_ILD_MAX_ITEMS = 1 << 18
"""Above this many items, ILD by embeddings is skipped (NaN): every rank would hold the whole
normalised (N, D) table. A category feature has no such limit."""

# Indexes of the weighted sums in ``BiasAccumulator._sums``.
_NAMES = (
    "lists",
    "novelty",
    "rec_pop",
    "users",
    "hist_pop",
    "ild_lists",
    "ild",
    "cal_users",
    "cal",
)
_S = {name: i for i, name in enumerate(_NAMES)}
POPULARITY_BINS = 10


@dataclass(frozen=True)
class Categories:
    """A categorical or list feature as CSR over ids ``0..n`` (code 0, missing, dropped)."""

    name: str
    offsets: Tensor  # (n + 2,) int64: codes of id i are codes[offsets[i]:offsets[i + 1]]
    codes: Tensor  # int64, each in 1..cardinality - 1
    cardinality: int
    labels: list[str]  # value of each code (index 0 = "missing")

    @staticmethod
    def from_arrays(
        name: str, offsets: np.ndarray, codes: np.ndarray, cardinality: int, labels: Sequence[str]
    ) -> Categories:
        offsets, codes = np.asarray(offsets, np.int64), np.asarray(codes, np.int64)
        keep = codes > 0
        ids = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        counts = np.bincount(ids[keep], minlength=len(offsets) - 1)
        new = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        values = ["missing", *[str(v) for v in labels]][:cardinality]
        values += [str(c) for c in range(len(values), cardinality)]
        return Categories(
            name, torch.from_numpy(new), torch.from_numpy(codes[keep]), int(cardinality), values
        )

    def expand(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For flat ``ids``: (position in ``ids``, code, 1 / number of codes of that id)."""
        offsets = self.offsets.to(ids.device)
        start, lens = offsets[ids], offsets[ids + 1] - offsets[ids]
        pos = torch.repeat_interleave(torch.arange(ids.numel(), device=ids.device), lens)
        first = torch.cumsum(lens, 0) - lens
        at = torch.arange(pos.numel(), device=ids.device) - first[pos] + start[pos]
        codes = self.codes.to(ids.device)[at]
        return pos, codes, 1.0 / lens[pos].to(torch.float64)

    def distribution(self, rows: Tensor, ids: Tensor, b: int) -> tuple[Tensor, Tensor]:
        """Per row of ``b``: summed category shares of its ``ids`` (b, C), and how many of them
        have a category (b,)."""
        pos, codes, share = self.expand(ids)
        out = torch.zeros(b, self.cardinality, dtype=torch.float64, device=ids.device)
        out.index_put_((rows[pos], codes), share, accumulate=True)
        described = torch.zeros(b, dtype=torch.float64, device=ids.device)
        first = torch.unique(pos)
        described.index_add_(0, rows[first], torch.ones_like(first, dtype=torch.float64))
        return out, described


def choose_category(item_features: dict[str, dict[str, Any]], wanted: str | None) -> str | None:
    """The item feature that defines categories: ``wanted`` by name, ``None`` for none, or
    ``"auto"``: the categorical or list feature with the fewest values (at least 2), so a
    genre-like column wins over a title-like one."""
    sparse = {
        n: int(s.get("cardinality", 0))
        for n, s in item_features.items()
        if s.get("kind") in ("categorical", "list")
    }
    if wanted is None:
        return None
    if wanted != "auto":
        if wanted not in sparse:
            raise ValueError(
                f"evaluation.category: {wanted!r} is not a categorical or list item feature "
                f"of the data (have: {sorted(sparse) or 'none'})"
            )
        return wanted
    usable = sorted((c, n) for n, c in sparse.items() if c >= 3)  # codes incl. 0: >= 2 values
    return usable[0][1] if usable else None


class BiasAccumulator:
    """Accumulates the bias report (see the module docstring). ``groups``: user feature name ->
    :class:`Categories` over user ids (categorical: one code per user)."""

    def __init__(
        self,
        num_items: int,
        item_popularity: Tensor | np.ndarray,
        k: int,
        categories: Categories | None = None,
        groups: dict[str, Categories] | None = None,
        alpha: float = 0.01,
        device: str | torch.device = "cpu",
    ) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"evaluation.calibration_alpha: must be in (0, 1], got {alpha}")
        self.num_items, self.k, self.alpha = int(num_items), int(k), float(alpha)
        self.device = torch.device(device)
        pop = torch.as_tensor(np.asarray(item_popularity), dtype=torch.float64).flatten()
        self._pop = pop.to(self.device)
        total = float(pop[1:].sum())
        self._info = (
            -torch.log2(pop.clamp(min=1.0) / total) if total > 0 else torch.zeros_like(pop)
        ).to(self.device)
        self._info[0] = 0.0
        # Popularity bins: items ranked by training count (descending, ties by index), cut into
        # POPULARITY_BINS bins of equal item counts.
        order = torch.argsort(-pop[1:], stable=True)
        bins = torch.empty(self.num_items, dtype=torch.int64)
        bins[order] = torch.arange(self.num_items) * POPULARITY_BINS // self.num_items
        self._bins = torch.cat([torch.zeros(1, dtype=torch.int64), bins]).to(self.device)
        self.categories = categories
        self.groups = dict(groups or {})
        self._vectors: Tensor | None = None
        self._ctx: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self.reset()

    @property
    def diversity_basis(self) -> str:
        if self.categories is not None:
            return f"category:{self.categories.name}"
        return "embedding" if self._vectors is not None else "none"

    @property
    def needs_item_vectors(self) -> bool:
        """ILD falls back to item embeddings (pass them to :meth:`set_item_vectors`)."""
        return self.categories is None and self.num_items <= EMBEDDING_ILD_MAX_ITEMS

    def set_item_vectors(self, vectors: Tensor | None) -> None:
        """Item vectors (N + 1, D) or (N, D) for 1..N, for ILD without categories."""
        if vectors is None:
            self._vectors = None
            return
        v = vectors.detach().to(self.device, torch.float64)
        if v.shape[0] == self.num_items:
            v = torch.cat([torch.zeros(1, v.shape[1], dtype=v.dtype, device=v.device), v])
        self._vectors = torch.nn.functional.normalize(v, dim=1)

    def reset(self) -> None:
        dev = self.device
        self._sums = torch.zeros(len(_NAMES), dtype=torch.float64, device=dev)
        self._counts = torch.zeros(self.num_items + 1, dtype=torch.float64, device=dev)
        self._hist_bins = torch.zeros(POPULARITY_BINS, dtype=torch.float64, device=dev)
        self._group_sums = {
            n: torch.zeros(g.cardinality, 3, dtype=torch.float64, device=dev)
            for n, g in self.groups.items()
        }
        self._reduced: tuple[Tensor, Tensor, Tensor, dict[str, Tensor]] | None = None

    def attach(self, evaluator: Any) -> None:
        evaluator.listener = self.add

    @torch.no_grad()
    def batch(self, seen_values: Tensor, seen_lengths: Tensor, user_idx: Tensor | None) -> None:
        """The context of the next evaluator update/finish: the local batch's histories (flat)
        and user ids, rows in the order the evaluator sees them."""
        dev = self.device
        lengths = seen_lengths.to(dev, torch.int64).flatten()
        b = lengths.numel()
        users = (
            torch.zeros(b, dtype=torch.int64, device=dev)
            if user_idx is None
            else user_idx.to(dev, torch.int64).flatten()
        )
        rows = torch.repeat_interleave(torch.arange(b, device=dev), lengths)
        self._ctx = (seen_values.to(dev, torch.int64).flatten(), rows, lengths, users)

    @torch.no_grad()
    def add(
        self, first_row: int, top_items: Tensor, valid: Tensor, rank_f: Tensor, weight: Tensor
    ) -> None:
        """The evaluator's listener: rows ``first_row ..`` of the batch context finished with
        these filtered top-K lists (``top_items``, ``valid`` (b, >= k)) and filtered ranks."""
        assert self._ctx is not None, "BiasAccumulator.batch() must describe the batch first"
        self._reduced = None
        dev, k = self.device, self.k
        items, ok = top_items[:, :k].to(dev), valid[:, :k].to(dev)
        w = weight.to(dev, torch.float64)
        b = items.shape[0]
        seen, seen_rows, lengths, users = self._ctx
        in_rows = (seen_rows >= first_row) & (seen_rows < first_row + b)
        hist, hist_rows = seen[in_rows], seen_rows[in_rows] - first_row
        hist_len = lengths[first_row : first_row + b].to(torch.float64)

        okf = ok.to(torch.float64)
        n = okf.sum(1)
        has = (n > 0).to(torch.float64)
        wk = w.unsqueeze(1).expand_as(items)
        self._counts.index_add_(0, items[ok], wk[ok])
        s = self._sums
        s[_S["lists"]] += (w * has).sum()
        s[_S["novelty"]] += (w * (self._info[items] * okf).sum(1) / n.clamp(min=1)).sum()
        s[_S["rec_pop"]] += (w * (self._pop[items] * okf).sum(1) / n.clamp(min=1)).sum()
        hist_pop = torch.zeros(b, dtype=torch.float64, device=dev)
        hist_pop.index_add_(0, hist_rows, self._pop[hist])
        users_with = (hist_len > 0).to(torch.float64)
        s[_S["users"]] += (w * users_with).sum()
        s[_S["hist_pop"]] += (w * hist_pop / hist_len.clamp(min=1)).sum()
        self._hist_bins.index_add_(0, self._bins[hist], w[hist_rows])
        self._add_diversity(items, ok, w, hist, hist_rows, b)
        rank_f = rank_f.to(dev).to(torch.float64)
        hit = (rank_f < k).to(torch.float64)
        gain = hit / torch.log2(rank_f + 2.0)
        for name, cats in self.groups.items():
            code = _one_code(cats, users[first_row : first_row + b])
            self._group_sums[name].index_add_(0, code, torch.stack([w, w * hit, w * gain], 1))

    def _add_diversity(
        self, items: Tensor, ok: Tensor, w: Tensor, hist: Tensor, hist_rows: Tensor, b: int
    ) -> None:
        s, cats = self._sums, self.categories
        rows = torch.arange(b, device=self.device).unsqueeze(1).expand_as(items)
        if cats is not None:
            q, q_n = cats.distribution(rows[ok], items[ok], b)
            # Unit indicator vectors: share 1/n per code -> 1/sqrt(n) per code.
            pos, codes, share = cats.expand(items[ok])
            unit = torch.zeros(b, cats.cardinality, dtype=torch.float64, device=self.device)
            unit.index_put_((rows[ok][pos], codes), share.sqrt(), accumulate=True)
            self._add_ild(w, (unit * unit).sum(1) - q_n, q_n)  # m unit vectors: sum |x|^2 = m
            p, p_n = cats.distribution(hist_rows, hist, b)
            p = p / p_n.clamp(min=1).unsqueeze(1)
            q = q / q_n.clamp(min=1).unsqueeze(1)
            q_s = (1 - self.alpha) * q + self.alpha * p
            kl = torch.where(p > 0, p * torch.log(p / q_s.clamp(min=1e-300)), torch.zeros_like(p))
            users = (p_n > 0).to(torch.float64)
            s[_S["cal_users"]] += (w * users).sum()
            s[_S["cal"]] += (w * users * kl.sum(1)).sum()
        elif self._vectors is not None:
            v = self._vectors[items] * ok.unsqueeze(2)  # (b, k, D); invalid entries zero
            total = v.sum(1)
            sq = (v * v).sum((1, 2))  # sum of |x|^2: m for unit vectors
            # |sum x|^2 - sum |x|^2 = sum over ordered pairs i != j of cos(x_i, x_j).
            self._add_ild(w, (total * total).sum(1) - sq, ok.sum(1).to(torch.float64))

    def _add_ild(self, w: Tensor, pair_cos: Tensor, m: Tensor) -> None:
        lists = (m >= 2).to(torch.float64)
        ild = 1.0 - pair_cos / (m * (m - 1)).clamp(min=1)
        self._sums[_S["ild_lists"]] += (w * lists).sum()
        self._sums[_S["ild"]] += (w * lists * ild).sum()

    def _reduce(self) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        if self._reduced is not None:
            return self._reduced
        sums, counts, hist_bins = self._sums.clone(), self._counts.clone(), self._hist_bins.clone()
        groups = {n: g.clone() for n, g in self._group_sums.items()}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([sums, hist_bins, *[g.flatten() for g in groups.values()]])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)  # dense: N + 1 float64 per rank
            sums, hist_bins = flat[: len(_NAMES)], flat[len(_NAMES) : len(_NAMES) + POPULARITY_BINS]
            at = len(_NAMES) + POPULARITY_BINS
            for n, g in groups.items():
                groups[n] = flat[at : at + g.numel()].reshape(g.shape)
                at += g.numel()
        self._reduced = (sums, counts, hist_bins, groups)
        return self._reduced

    def compute(self) -> dict[str, float]:
        """The bias metrics (a collective under torch.distributed: every rank calls it)."""
        sums, counts, _, groups = self._reduce()
        s = dict(zip(_NAMES, sums.tolist()))
        k = self.k

        def ratio(a: float, b: float) -> float:
            return a / b if b > 0 else math.nan

        out = {
            f"gini@{k}": gini(counts[1:]),
            f"novelty@{k}": ratio(s["novelty"], s["lists"]),
            f"ild@{k}": ratio(s["ild"], s["ild_lists"]),
            f"popularity_lift@{k}": ratio(
                ratio(s["rec_pop"], s["lists"]), ratio(s["hist_pop"], s["users"])
            ),
            "history_popularity": ratio(s["hist_pop"], s["users"]),
        }
        if self.categories is not None:
            out[f"calibration_kl@{k}"] = ratio(s["cal"], s["cal_users"])
        for name, table in groups.items():
            cats, rates = self.groups[name], {"hr": [], "ndcg": []}
            for code, (c, h, g) in enumerate(table.tolist()):
                if c <= 0:
                    continue
                label = f"group/{name}/{metric_safe(cats.labels[code])}"
                out[f"{label}/count"] = c
                out[f"{label}/hr@{k}_filtered"] = h / c
                out[f"{label}/ndcg@{k}_filtered"] = g / c
                if code > 0:
                    rates["hr"].append(h / c)
                    rates["ndcg"].append(g / c)
            for metric, values in rates.items():
                top, low = (max(values), min(values)) if values else (math.nan, math.nan)
                out[f"group/{name}/{metric}@{k}_filtered_max_min_ratio"] = (
                    top / low if low > 0 else (math.nan if not values else math.inf)
                )
        return out

    def details(self, curve_points: int = 100) -> dict[str, Any]:
        """Plot data for the report: the Lorenz curve of recommendation counts and the shares of
        training interactions, history items and recommendations per popularity bin (call after
        :meth:`compute` on every rank, or on all ranks)."""
        _, counts, hist_bins, _ = self._reduce()
        c = torch.sort(counts[1:]).values
        cum = torch.cat([torch.zeros(1, dtype=c.dtype, device=c.device), torch.cumsum(c, 0)])
        total = float(cum[-1])
        at = np.unique(np.linspace(0, self.num_items, curve_points + 1).round().astype(np.int64))
        lorenz = [[int(i) / self.num_items, float(cum[i]) / total if total else 0.0] for i in at]

        def shares(values: Tensor) -> list[float]:
            t = float(values.sum())
            return [float(v) / t if t else 0.0 for v in values.tolist()]

        train = torch.zeros(POPULARITY_BINS, dtype=torch.float64, device=self.device)
        train.index_add_(0, self._bins[1:], self._pop[1:])
        rec = torch.zeros_like(train).index_add_(0, self._bins[1:], counts[1:])
        return {
            "k": self.k,
            "diversity_basis": self.diversity_basis,
            "calibration_category": None if self.categories is None else self.categories.name,
            "calibration_alpha": self.alpha,
            "group_by": list(self.groups),
            "lorenz": lorenz,
            "popularity_bins": {
                "train": shares(train),
                "history": shares(hist_bins),
                "recommended": shares(rec),
            },
        }


def gini(counts: Tensor) -> float:
    """Gini index of non-negative ``counts`` (NaN when they sum to 0)."""
    c = torch.sort(counts.to(torch.float64)).values
    n, total = c.numel(), float(c.sum())
    if n == 0 or total <= 0:
        return math.nan
    j = torch.arange(1, n + 1, dtype=torch.float64, device=c.device)
    return float(((2 * j - n - 1) * c).sum()) / (n * total)


def metric_safe(value: str) -> str:
    """A feature value as part of an MLflow metric name (letters, digits, ``_-. :/``)."""
    return re.sub(r"[^\w.\- ]", "_", str(value)) or "_"


def _one_code(cats: Categories, ids: Tensor) -> Tensor:
    """The single code of each id (0 when missing or padding)."""
    offsets = cats.offsets.to(ids.device)
    has = offsets[ids + 1] > offsets[ids]
    codes = cats.codes.to(ids.device)
    at = offsets[ids].clamp(max=max(codes.numel() - 1, 0))
    return torch.where(has, codes[at] if codes.numel() else torch.zeros_like(ids), 0)


def from_data(
    data_dir: str,
    manifest: dict[str, Any],
    item_popularity: Any,
    k: int,
    category: str | None,
    group_by: Sequence[str],
    alpha: float,
    device: str | torch.device,
) -> BiasAccumulator:
    """An accumulator for a prepared directory: categories and user groups from its features
    (``feature_vocabs.json`` gives the value labels)."""
    import json

    from recforge.data import storage
    from recforge.data.feature_tables import load_feature_tables
    from recforge.data.layout import FEATURE_VOCABS

    features = manifest.get("features") or {}
    user_specs = features.get("user", {})
    usable = sorted(n for n, s in user_specs.items() if s.get("kind") == "categorical")
    for name in group_by:
        if name not in usable:
            kind = user_specs.get(name, {}).get("kind") or "absent"
            raise ValueError(
                f"evaluation.group_by: {name!r} must be a categorical user feature of the data "
                f"(it is {kind}; categorical ones: {usable or 'none'})"
            )
    chosen = choose_category(features.get("item", {}), category)
    cats, groups = None, {}
    if chosen is not None or group_by:
        tables = load_feature_tables(data_dir, manifest)
        try:
            vocabs = json.loads(storage.read_bytes(storage.join(data_dir, FEATURE_VOCABS)))
        except Exception:  # labels then fall back to the codes; the numbers do not change
            vocabs = {}
        if chosen is not None:
            offsets, codes = tables.item.sparse_columns[chosen]
            card = tables.item.cardinalities[chosen]
            cats = Categories.from_arrays(
                chosen, offsets, codes, card, vocabs.get("item", {}).get(chosen, [])
            )
        for name in group_by:
            offsets, codes = tables.user.sparse_columns[name]
            card = tables.user.cardinalities[name]
            labels = vocabs.get("user", {}).get(name, [])
            groups[name] = Categories.from_arrays(name, offsets, codes, card, labels)
    return BiasAccumulator(
        int(manifest["items"]), item_popularity, k, cats, groups, alpha=alpha, device=device
    )
