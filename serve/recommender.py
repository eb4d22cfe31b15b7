"""`Recommender`: recommendations from an exported artifact, on CPU, without torch
(docs/architecture.md §10).

Both model kinds serve the same way: the ONNX user encoder (SASRec, or the two-tower user tower,
which also reads the known user's index and features from ``users.parquet``) runs in
onnxruntime; items are scored by a matrix product with ``item_embeddings.npy`` (exact top-k), or
through a faiss HNSW index (inner product) for large catalogues. History items are original item
ids; unknown ones are skipped and reported. A request whose history has no usable item gets the
most-popular items, marked ``fallback``.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recforge.artifact import (
    ANN_AUTO_MIN_ITEMS,
    ANN_INDEX,
    ITEM_EMBEDDINGS,
    ITEMS,
    MODEL,
    USER_FEATURES,
    USER_VECTOR,
    USERS,
    ArtifactError,
    read_verified_manifest,
    user_key,
    user_store,
)
from recforge.serve.artifact import resolve_source
from recforge.serve.topk import top_k_rows
from recforge.serve.user_features import UserFeatureError, UserFeatures

log = logging.getLogger(__name__)

MAX_K = 1000
EXACT_LIMIT = ANN_AUTO_MIN_ITEMS  # 200,000
"""Catalogues up to this size are searched exactly (a (B, N) matrix product is fast there)."""


class RequestError(ValueError):
    """A request that cannot be answered as asked (bad k, nothing to go on, ...): a 4xx, never a
    500."""


class UnknownUserError(RequestError):
    """A ``user_id`` the model has no history for (HTTP 404)."""


class NoUserStoreError(RequestError):
    """A ``user_id`` sent to an artifact exported with ``--user-store none`` (HTTP 422)."""


@dataclass
class Recommendation:
    items: list[Any]
    scores: list[float]
    fallback: bool = False
    """True when the user had no usable history and got the most-popular items."""
    unknown_history_items: list[Any] = field(default_factory=list)
    """History items that are not in the catalogue (ignored)."""
    unknown_user_features: list[str] = field(default_factory=list)
    """``name=value`` of user feature values the model has no code for (treated as missing)."""
    because: list[list[dict[str, Any]]] | None = None
    """``explain``: per item, the history items that most support it (serve/explain.py)."""

    def as_dict(self) -> dict[str, Any]:
        items = [{"item_id": i, "score": s} for i, s in zip(self.items, self.scores)]
        for item, why in zip(items, self.because or ()):
            item["because"] = why
        return {
            "items": items,
            "fallback": self.fallback,
            "unknown_history_items": self.unknown_history_items,
            "unknown_user_features": self.unknown_user_features,
        }


class Recommender:
    """Loaded artifact: user encoder session, item vectors, id maps, known users' histories."""

    def __init__(
        self,
        directory: Path,
        manifest: dict[str, Any],
        threads: int = 1,
        index: str = "auto",
        ef_search: int = 512,
    ) -> None:
        import onnxruntime as ort
        import pyarrow.parquet as pq

        self.directory, self.manifest = directory, manifest
        options = ort.SessionOptions()
        # One request is a small graph: intra-op threads beyond a few cores only add handoffs,
        # and a server runs several sessions' requests concurrently anyway.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(directory / MODEL), options, providers=["CPUExecutionProvider"]
        )
        # (N, D) float32, memory-mapped read-only: pages are shared by every process serving the
        # artifact and nothing here writes them (scores are a new array; faiss copies on build).
        self.item_embeddings = np.load(directory / ITEM_EMBEDDINGS, mmap_mode="r")
        items = pq.read_table(directory / ITEMS).to_pydict()
        self.item_ids: list[Any] = items["item_id"]  # position p <-> item index p + 1
        self.index_of = {item: idx for idx, item in zip(items["item_idx"], items["item_id"])}
        counts = np.asarray(items["count"], dtype=np.int64)
        self.counts = counts
        self.popular = np.argsort(-counts, kind="stable")  # positions, most popular first
        from recforge.serve.rerank import ItemCategories  # (rerank imports this module)

        self.categories = ItemCategories(items)  # for exclude_categories
        self.max_len = int(manifest["max_len"])
        self.kind = manifest["kind"]  # read_manifest checked it is a registered family
        self.inputs: list[dict[str, Any]] = manifest["inputs"]
        self.input_names = [spec["name"] for spec in self.inputs]
        self.histories: dict[Any, list[int]] = {}
        self.user_rows: dict[Any, int] = {}
        self.user_inputs: dict[str, list[Any]] = {}
        """Per user input of the model other than ``item_ids``: its value for each known user."""
        # Hashed stores key users by user_key(salt, id): requests are looked up by _key(user_id).
        store = user_store(manifest)
        self.user_store: str = store["mode"]
        self._salt: str | None = store.get("salt")
        if (directory / USERS).is_file():
            users = pq.read_table(directory / USERS).to_pydict()
            self.histories = dict(zip(users["user_id"], users["history"]))
            self.user_rows = {user: row for row, user in enumerate(users["user_id"])}
            self.user_inputs = {name: users[name] for name in self.input_names[1:] if name in users}
        self.user_features = (
            UserFeatures.load(directory) if USER_FEATURES in manifest["files"] else None
        )
        missing = [name for name in self.input_names[1:] if name not in self.user_inputs]
        if missing:
            raise ArtifactError(
                f"{directory}: {USERS} lacks the column(s) {missing} that {MODEL} takes"
            )
        num_items = self.item_embeddings.shape[0]
        if not np.isfinite(self.item_embeddings).all():
            raise ArtifactError(f"{directory}: {ITEM_EMBEDDINGS} holds NaN or inf")
        if self.item_embeddings.shape != (int(manifest["num_items"]), int(manifest["dim"])):
            raise ArtifactError(
                f"{directory}: {ITEM_EMBEDDINGS} has shape {self.item_embeddings.shape}, "
                f"manifest says ({manifest['num_items']}, {manifest['dim']})"
            )
        self.ann = None
        if index == "hnsw" or (index == "auto" and num_items > EXACT_LIMIT):
            from recforge.serve.ann import HNSWIndex

            self.ann = self._saved_index(ef_search) or HNSWIndex(
                self.item_embeddings, ef_search=ef_search
            )

    def _saved_index(self, ef_search: int) -> Any:
        """The HNSW index `recforge export --ann` wrote into the artifact (sha256 already
        verified), or None when there is none: the caller builds one then."""
        if ANN_INDEX not in self.manifest["files"]:
            return None
        from recforge.serve.ann import HNSWIndex

        start = time.perf_counter()
        try:
            ann = HNSWIndex.load(self.directory / ANN_INDEX, ef_search=ef_search)
        except (RuntimeError, ValueError) as exc:
            raise ArtifactError(f"{self.directory}: {ANN_INDEX}: {exc}") from None
        if ann.shape != self.item_embeddings.shape:
            raise ArtifactError(
                f"{self.directory}: {ANN_INDEX} holds {ann.shape} vectors, "
                f"{ITEM_EMBEDDINGS} has shape {self.item_embeddings.shape}"
            )
        log.info(
            "HNSW index loaded from the artifact (%s, %d items) in %.2f s, not rebuilt",
            ANN_INDEX,
            ann.shape[0],
            time.perf_counter() - start,
        )
        return ann

    @classmethod
    def load(
        cls,
        source: str | os.PathLike,
        threads: int = 1,
        index: str = "auto",
        ef_search: int = 512,
        tracking_uri: str | None = None,
    ) -> Recommender:
        """Load a directory, ``models:/NAME@ALIAS`` or ``runs:/RUN/export``; verifies every
        sha256."""
        if index not in ("auto", "exact", "hnsw"):
            raise ValueError(f"index={index!r}: expected 'auto', 'exact' or 'hnsw'")
        if ef_search < 1:
            raise ValueError(f"ef_search={ef_search}: must be >= 1")
        directory = resolve_source(str(source), tracking_uri)
        manifest = read_verified_manifest(directory)
        return cls(directory, manifest, threads=threads, index=index, ef_search=ef_search)

    @property
    def num_items(self) -> int:
        return self.item_embeddings.shape[0]

    # --- requests ---

    def _history_indexes(
        self, user_id: Any, history: Sequence[Any] | None
    ) -> tuple[list[int], list[Any]]:
        if user_id is not None:
            if self.user_store == "none":
                raise NoUserStoreError(
                    "this model was exported without a user store (--user-store none): it keeps "
                    "no user ids or histories, so send 'history' (and 'user_features') instead "
                    "of 'user_id'"
                )
            key = self._key(user_id)
            if key not in self.user_rows:
                # The id is not echoed: answers and logs never carry a raw user id.
                raise UnknownUserError("user_id is unknown to this model (pass 'history' instead)")
            indexes = list(self.histories[key])
        else:
            indexes = []
        unknown = []
        for item in history or ():
            idx = self.index_of.get(item)
            if idx is None:
                unknown.append(item)
            else:
                indexes.append(idx)
        return indexes, unknown

    def recommend(
        self,
        user_id: Any = None,
        history: Sequence[Any] | None = None,
        k: int = 10,
        exclude_seen: bool = True,
        exclude: Sequence[Any] = (),
        user_features: dict[str, Any] | None = None,
        exclude_categories: dict[str, Sequence[Any]] | None = None,
        diversity: float = 0.0,
        explain: bool = False,
    ) -> Recommendation:
        """Top-``k`` original item ids and scores for a known user or an explicit history (or both:
        the history then extends the user's); a two-tower model with user features also takes
        ``user_features`` (raw values, e.g. for a user it never saw). ``exclude_categories``
        (``{item feature: [values]}``) and ``diversity`` (MMR, 0 = plain ranking) shape the list
        (serve/rerank.py); ``explain`` adds each item's supporting history items
        (serve/explain.py)."""
        return self.recommend_batch(
            [
                {
                    "user_id": user_id,
                    "history": history,
                    "k": k,
                    "exclude_seen": exclude_seen,
                    "exclude": exclude,
                    "user_features": user_features,
                    "exclude_categories": exclude_categories,
                    "diversity": diversity,
                    "explain": explain,
                }
            ]
        )[0]

    def recommend_batch(self, requests: Sequence[dict[str, Any]]) -> list[Recommendation]:
        """Several requests, encoded in one onnxruntime call; ``exclude_categories``,
        ``diversity`` and ``explain`` are applied by serve/rerank.py and serve/explain.py."""
        from recforge.serve.explain import explanations
        from recforge.serve.rerank import parse_control, rerank

        parsed, controls = [], []
        for i, request in enumerate(requests):
            k = request.get("k", 10)
            if (
                isinstance(k, bool)
                or not isinstance(k, int)
                or not 1 <= k <= min(MAX_K, self.num_items)
            ):
                raise RequestError(
                    f"request {i}: k={k!r} must be an integer in 1..{min(MAX_K, self.num_items)}"
                )
            raw_features = request.get("user_features")
            if (
                request.get("user_id") is None
                and request.get("history") is None
                and not raw_features
            ):
                raise RequestError(f"request {i}: give 'user_id', 'history' or 'user_features'")
            if raw_features and self.user_features is None:
                raise RequestError(f"request {i}: this model reads no user features")
            indexes, unknown = self._history_indexes(request.get("user_id"), request.get("history"))
            excluded = {
                self.index_of[x] for x in request.get("exclude") or () if x in self.index_of
            }
            if request.get("exclude_seen", True):
                excluded.update(indexes)
            controls.append(parse_control(request, i, k, self.categories))
            excluded |= controls[-1].excluded
            k = min(controls[-1].fetch, self.num_items)  # more than k only for diversity
            user_values = self._user_values(
                self.user_rows.get(self._key(request.get("user_id")))
                if request.get("user_id") is not None
                else None
            )
            unknown_features: list[str] = []
            if raw_features:
                try:
                    unknown_features = self.user_features.apply(raw_features, user_values)
                except UserFeatureError as exc:
                    raise RequestError(f"request {i}: {exc}") from None
            parsed.append(
                (
                    k,
                    indexes[-self.max_len :],
                    unknown,
                    excluded,
                    user_values,
                    unknown_features,
                    bool(indexes) or bool(raw_features),
                )
            )
        # Encoded: requests with a usable history, or (two-tower) with user features to go on.
        with_history = [j for j, p in enumerate(parsed) if p[6]]
        vectors = (
            self._encode([parsed[j][1] for j in with_history], [parsed[j][4] for j in with_history])
            if with_history
            else None
        )
        exact = None
        if vectors is not None and self.ann is None:
            # Exact search: one (B, N) matrix product and one blocked top-k for the whole batch.
            scores = vectors @ self.item_embeddings.T  # (B, N)
            for r, j in enumerate(with_history):
                if parsed[j][3]:
                    scores[r, np.fromiter((i - 1 for i in parsed[j][3]), dtype=np.int64)] = -np.inf
            exact = top_k_rows(scores, max(parsed[j][0] for j in with_history))
        out: list[Recommendation] = []
        row = {j: r for r, j in enumerate(with_history)}
        for j, (k, window, unknown, excluded, user, unknown_features, encoded) in enumerate(parsed):
            if not encoded:
                positions = list(
                    itertools.islice(
                        (p for p in self.popular if p + 1 not in excluded), controls[j].k
                    )
                )
                # Fallback scores are training interaction counts, not model scores; no history,
                # so nothing to explain, and popularity is not re-ranked for diversity.
                out.append(
                    Recommendation(
                        [self.item_ids[p] for p in positions],
                        [float(self.counts[p]) for p in positions],
                        fallback=True,
                        unknown_history_items=unknown,
                        because=[[] for _ in positions] if controls[j].explain else None,
                    )
                )
                continue
            if exact is None:
                positions, top = self._ann_top_k(vectors[row[j]], k, excluded)
            else:
                keep = exact[1][row[j]] > -np.inf  # excluded items score -inf
                positions, top = exact[0][row[j]][keep][:k].tolist(), exact[1][row[j]][keep][:k]
            control = controls[j]
            positions, top = rerank(control, positions, top, self.item_embeddings)
            out.append(
                Recommendation(
                    [self.item_ids[p] for p in positions],
                    [float(s) for s in top],
                    unknown_history_items=unknown,
                    unknown_user_features=unknown_features,
                    because=explanations(
                        self._encode, window, user, positions, self.item_embeddings, self.item_ids
                    )
                    if control.explain
                    else None,
                )
            )
        return out

    def _key(self, user_id: Any) -> Any:
        """The user store's key of a requested ``user_id``."""
        if self.user_store == "hashed" and user_id is not None:
            return user_key(self._salt or "", user_id)
        return user_id

    def _user_values(self, row: int | None) -> dict[str, Any]:
        """The user inputs (other than ``item_ids``) of a known user's row, or of an unknown user:
        ``user_idx`` 0, each categorical feature's "missing" code, no list codes, numbers 0."""
        values: dict[str, Any] = {}
        for spec in self.inputs[1:]:
            name = spec["name"]
            if row is not None:
                values[name] = self.user_inputs[name][row]
            elif name == "user_idx":
                values[name] = 0
            elif spec["dtype"] == "float32":
                values[name] = [0.0] * int(spec["shape"][1])
            else:
                values[name] = list(spec.get("missing", []))
        return values

    def _encode(self, histories: list[list[int]], users: list[dict[str, Any]]) -> np.ndarray:
        feeds = {"item_ids": _padded(histories, 0)}  # (B, L) right-padded; a row may be empty
        for spec in self.inputs[1:]:
            name = spec["name"]
            if name == "user_idx":
                feeds[name] = np.array([u[name] for u in users], dtype=np.int64)
            elif spec["dtype"] == "float32":
                feeds[name] = np.array([u[name] for u in users], dtype=np.float32).reshape(
                    len(users), -1
                )
            else:  # feature codes, right-padded with -1
                feeds[name] = _padded([u[name] for u in users], -1)
        return self.session.run([USER_VECTOR], feeds)[0]  # (B, D)

    def encode_histories(self, ids: np.ndarray) -> np.ndarray:
        """SASRec's raw model: padded item indexes (B, L) int64 -> user vectors (B, D)."""
        return self.run_model({"item_ids": ids})

    def run_model(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The raw ONNX model on the manifest's inputs, validated first (names, dtypes, shapes,
        ranges: an out-of-range index would otherwise fail inside onnxruntime)."""
        if sorted(feeds) != sorted(self.input_names):
            raise RequestError(
                f"inputs {sorted(feeds)}: the model takes exactly {self.input_names}"
            )
        batch = None
        for spec in self.inputs:
            name, x = spec["name"], feeds[spec["name"]]
            if x.dtype != np.dtype(spec["dtype"]) or x.ndim != len(spec["shape"]):
                raise RequestError(
                    f"input {name!r}: expected {spec['dtype']} of shape {spec['shape']}, "
                    f"got {x.dtype} of shape {list(x.shape)}"
                )
            fixed = [(i, d) for i, d in enumerate(spec["shape"]) if isinstance(d, int)]
            if any(x.shape[i] != d for i, d in fixed) or 0 in x.shape:
                raise RequestError(
                    f"input {name!r}: shape {list(x.shape)} does not fit {spec['shape']}"
                )
            if x.ndim == 2 and "max_width" in spec and x.shape[1] > spec["max_width"]:
                raise RequestError(
                    f"input {name!r}: width {x.shape[1]} is over {spec['max_width']}"
                )
            if batch is not None and x.shape[0] != batch:
                raise RequestError(f"input {name!r}: batch {x.shape[0]}, other inputs have {batch}")
            batch = x.shape[0]
            if name == "item_ids" and x.shape[1] > 1 and ((x[:, 1:] != 0) & (x[:, :-1] == 0)).any():
                raise RequestError(
                    "input 'item_ids': rows must be right-padded (no item after a 0)"
                )
            if "range" in spec and (x.min() < spec["range"][0] or x.max() > spec["range"][1]):
                raise RequestError(
                    f"input {name!r}: values must lie in {spec['range'][0]}..{spec['range'][1]}"
                )
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                raise RequestError(f"input {name!r}: values must be finite")
        return self.session.run([USER_VECTOR], feeds)[0]

    def _ann_top_k(
        self, vector: np.ndarray, k: int, excluded: set[int]
    ) -> tuple[list[int], np.ndarray]:
        positions, scores = self.ann.search(
            vector, k, np.fromiter((i - 1 for i in excluded), dtype=np.int64)
        )
        return positions, np.array(scores, dtype=np.float32)


def _padded(rows: list[list[int]], pad: int) -> np.ndarray:
    """(B, max(1, longest row)) int64, each row right-padded with ``pad``."""
    out = np.full((len(rows), max([1] + [len(r) for r in rows])), pad, dtype=np.int64)
    for r, values in enumerate(rows):
        out[r, : len(values)] = values
    return out
