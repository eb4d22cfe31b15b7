"""Approximate top-k by inner product for large catalogues: a faiss HNSW index.

faiss (Meta, actively released, CPU wheels on PyPI) over hnswlib (last release 2023): same HNSW
algorithm, plus exact and IVF indexes behind one API if a catalogue outgrows HNSW's memory.
OpenMP is pinned to one thread before faiss loads: on 2 cores its default pool is erratic inside
a server thread (0.3–20 ms per query, docs/architecture.md §11), and the server parallelises
across requests.

efSearch is 512 by default (``recforge serve --ef-search``). On 1M random unit vectors in 64-D,
the hard case for any graph index, recall@10 against exact search was 0.51 at efSearch 128
(1.5 ms per query), 0.89 at 512 (3.6 ms) and 0.997 at 2048 (11.5 ms; exact search: 16 ms), with
M=32 and efConstruction=80 (build: 352 s on 2 busy cores). `benchmarks/serve_latency.py`.

`recforge export` builds the index once and writes it into the artifact
(:data:`recforge.artifact.ANN_INDEX`); :meth:`HNSWIndex.load` reads it with its vector storage
memory-mapped (``IO_FLAG_MMAP_IFC``), so starting a server costs a file read, not a build.
"""

from __future__ import annotations

import os

import numpy as np


class HNSWIndex:
    """HNSW (inner product) over item vectors (N, D); ``search`` returns catalogue positions."""

    source = "built"
    """``"built"`` (here, from the vectors) or the path of the index file it was loaded from."""

    def __init__(
        self, vectors: np.ndarray, m: int = 32, ef_construction: int = 80, ef_search: int = 512
    ) -> None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import faiss

        self.index = faiss.IndexHNSWFlat(vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = ef_construction
        self.ef_search = ef_search
        # Building is a one-off batch job: all cores. Queries then run on one OpenMP thread.
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        faiss.omp_set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    @classmethod
    def load(cls, path: str | os.PathLike, ef_search: int = 512) -> HNSWIndex:
        """The index written by ``recforge export --ann`` (faiss ``write_index``), vectors
        memory-mapped where this faiss can (read-only; queries never write them)."""
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import faiss

        self = cls.__new__(cls)
        try:
            self.index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
        except (AttributeError, RuntimeError):  # an older faiss, or a storage it cannot map
            self.index = faiss.read_index(str(path))
        if not isinstance(self.index, faiss.IndexHNSW):
            raise ValueError(f"{path}: a {type(self.index).__name__}, not an HNSW index")
        if self.index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"{path}: the HNSW index does not use inner product")
        self.ef_search = ef_search
        self.source = str(path)
        faiss.omp_set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        return self

    @property
    def shape(self) -> tuple[int, int]:
        """(items, dimension) the index holds."""
        return int(self.index.ntotal), int(self.index.d)

    def search(
        self, vector: np.ndarray, k: int, excluded: np.ndarray | None = None
    ) -> tuple[list[int], list[float]]:
        """Top-``k`` catalogue positions (and scores) for one vector, ``excluded`` positions left
        out inside the search (so a long seen-history does not widen it)."""
        import faiss

        k = min(k, self.index.ntotal)
        selector = None
        if excluded is not None and len(excluded):
            batch = faiss.IDSelectorBatch(np.ascontiguousarray(excluded, dtype=np.int64))
            selector = faiss.IDSelectorNot(batch)
        # Per call, not on the index: efSearch must cover k, or HNSW returns fewer than k results,
        # and one large-k request must not slow every later one down.
        params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k), sel=selector)
        scores, positions = self.index.search(
            np.ascontiguousarray(vector[None, :], dtype=np.float32), k, params=params
        )
        keep = positions[0] >= 0  # fewer than k reachable items: -1 padding
        return positions[0][keep].tolist(), scores[0][keep].tolist()
