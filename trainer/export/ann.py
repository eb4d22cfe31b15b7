"""The HNSW index of an export artifact (``recforge export --ann``, docs/architecture.md §9).

Built here, once, over the item vectors the artifact serves (faiss ``IndexHNSWFlat``, inner
product, ids = catalogue positions = item index - 1), written as :data:`recforge.artifact.
ANN_INDEX`, and loaded by the server (:mod:`recforge.serve.ann`) instead of being rebuilt at every
start (~350 s for 1M items on 2 cores). Its recall@10 against exact search is measured on a fixed
sample of query vectors and recorded in the manifest's ``ann`` entry:

- queries: up to :data:`~recforge.artifact.ANN_RECALL_QUERIES` known users (a seeded sample of
  ``users.parquet`` rows with a non-empty history), encoded by the exported ONNX graph exactly as
  the server encodes a known user (last ``max_len`` history items, and the two-tower user
  inputs); with no such user, a seeded sample of the item vectors themselves (``query_source``
  says which);
- exact: the brute-force top-10 by inner product over the whole catalogue, a block of queries at
  a time (no (queries, N) matrix); HNSW: the index at ``ef_search`` (the server's default), no
  exclusions. recall@10 = mean |HNSW top-10 ∩ exact top-10| / 10.

The build runs on every core (``faiss.omp_set_num_threads(os.cpu_count())``, restored after):
the export is a batch job. The serving layer pins one OpenMP thread per query instead.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from recforge import artifact
from recforge.trainer.export.errors import ExportError

ANN_CHOICES = ("auto", "hnsw", "none")
QUERY_BLOCK = 64
"""Queries scored exactly at a time: a (64, N) float32 block (256 MB at N = 1M)."""


def wants_index(ann: str, num_items: int) -> bool:
    """Whether ``--ann`` asks for an index on a catalogue of ``num_items``."""
    if ann not in ANN_CHOICES:
        raise ExportError(f"ann={ann!r}: expected one of {ANN_CHOICES}")
    return ann == "hnsw" or (ann == "auto" and num_items > artifact.ANN_AUTO_MIN_ITEMS)


def build_index(
    item_embeddings: np.ndarray,
    path: Path,
    m: int = artifact.HNSW_M,
    ef_construction: int = artifact.HNSW_EF_CONSTRUCTION,
) -> tuple[Any, float]:
    """Build the HNSW index over ``item_embeddings`` (N, D) and write it to ``path``; returns the
    index and the build seconds."""
    import faiss

    if m < 2 or ef_construction < 1:
        raise ExportError(f"HNSW M={m}, efConstruction={ef_construction}: need M >= 2, ef >= 1")
    vectors = np.ascontiguousarray(item_embeddings, dtype=np.float32)  # no copy if already so
    threads = faiss.omp_get_max_threads()
    # A one-off batch job: every core, whatever OMP_NUM_THREADS the caller runs under.
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    try:
        index = faiss.IndexHNSWFlat(vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.add(vectors)
    finally:
        faiss.omp_set_num_threads(threads)
    seconds = time.perf_counter() - start
    faiss.write_index(index, str(path))
    return index, seconds


def query_vectors(
    model_path: Path,
    users: Any,
    input_specs: list[dict[str, Any]],
    max_len: int,
    item_embeddings: np.ndarray,
    count: int = artifact.ANN_RECALL_QUERIES,
    seed: int = 0,
) -> tuple[np.ndarray, str]:
    """(Q, D) query vectors and their source (``"users"`` or ``"item_vectors"``): see the module
    docstring. ``users`` is the ``users.parquet`` table (pyarrow)."""
    rng = np.random.default_rng(seed)
    if users is not None and users.num_rows:
        import pyarrow.compute as pc

        lengths = pc.list_value_length(users.column("history")).to_numpy(zero_copy_only=False)
        eligible = np.flatnonzero(lengths > 0)
        if len(eligible):
            rows = np.sort(rng.choice(eligible, size=min(count, len(eligible)), replace=False))
            sample = users.take(rows).to_pydict()
            return _encode_users(model_path, sample, input_specs, max_len), "users"
    n = item_embeddings.shape[0]
    rows = np.sort(rng.choice(n, size=min(count, n), replace=False))
    return np.asarray(item_embeddings[rows], dtype=np.float32), "item_vectors"


def _encode_users(
    model_path: Path, sample: dict[str, list[Any]], specs: list[dict[str, Any]], max_len: int
) -> np.ndarray:
    """The ONNX graph over the sampled users' stored inputs, as the server feeds a known user."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    histories = [list(h)[-max_len:] for h in sample["history"]]
    out = []
    for start in range(0, len(histories), 256):
        stop = min(start + 256, len(histories))
        feeds = {"item_ids": _padded(histories[start:stop], 0)}
        for spec in specs[1:]:
            name, values = spec["name"], sample[spec["name"]][start:stop]
            if name == "user_idx":
                feeds[name] = np.asarray(values, dtype=np.int64)
            elif spec["dtype"] == "float32":
                feeds[name] = np.asarray(values, dtype=np.float32).reshape(len(values), -1)
            else:
                feeds[name] = _padded([list(v) for v in values], -1)
        out.append(session.run([artifact.USER_VECTOR], feeds)[0])
    return np.concatenate(out).astype(np.float32, copy=False)


def _padded(rows: list[list[int]], pad: int) -> np.ndarray:
    out = np.full((len(rows), max([1] + [len(r) for r in rows])), pad, dtype=np.int64)
    for r, values in enumerate(rows):
        out[r, : len(values)] = values
    return out


def exact_top_k(queries: np.ndarray, item_embeddings: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) positions of the exact top-``k`` by inner product, ``QUERY_BLOCK`` queries at a
    time."""
    k = min(k, item_embeddings.shape[0])
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), QUERY_BLOCK):
        scores = queries[start : start + QUERY_BLOCK] @ item_embeddings.T  # (b, N)
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        out[start : start + QUERY_BLOCK] = np.take_along_axis(part, order, axis=1)
    return out


def recall_vs_exact(
    index: Any,
    queries: np.ndarray,
    item_embeddings: np.ndarray,
    ef_search: int = artifact.HNSW_EF_SEARCH,
    k: int = artifact.ANN_RECALL_K,
) -> float:
    """Mean |HNSW top-k ∩ exact top-k| / k over ``queries``."""
    import faiss

    k = min(k, item_embeddings.shape[0])
    exact = exact_top_k(queries, item_embeddings, k)
    params = faiss.SearchParametersHNSW(efSearch=max(ef_search, k))
    _, approx = index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact))
    return hits / (k * len(queries))


def write_index(
    directory: Path,
    item_embeddings: np.ndarray,
    users: Any,
    input_specs: list[dict[str, Any]],
    max_len: int,
    m: int = artifact.HNSW_M,
    ef_construction: int = artifact.HNSW_EF_CONSTRUCTION,
    ef_search: int = artifact.HNSW_EF_SEARCH,
) -> dict[str, Any]:
    """Build and write ``directory/ANN_INDEX`` and measure it; returns the manifest's ``ann``."""
    index, build_seconds = build_index(
        item_embeddings, directory / artifact.ANN_INDEX, m, ef_construction
    )
    start = time.perf_counter()
    queries, source = query_vectors(
        directory / artifact.MODEL, users, input_specs, max_len, item_embeddings
    )
    recall = recall_vs_exact(index, queries, item_embeddings, ef_search)
    return {
        "kind": "hnsw",
        "file": artifact.ANN_INDEX,
        "metric": "inner_product",
        "m": m,
        "ef_construction": ef_construction,
        "ef_search": ef_search,
        f"recall@{artifact.ANN_RECALL_K}_vs_exact": round(recall, 4),
        "queries": len(queries),
        "query_source": source,
        "build_seconds": round(build_seconds, 2),
        "recall_seconds": round(time.perf_counter() - start, 2),
    }
