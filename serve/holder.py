"""The model a `recforge serve` process answers with, and how a reload replaces it
(docs/architecture.md §10).

A request takes :attr:`ModelHolder.current` once, at its start, and finishes on that model, so
a reload never fails a request in flight. One process (no ``--workers``): :meth:`reload` loads
the new model beside the old one and swaps one reference.

With ``--workers N`` a reload has two phases, so that every worker switches at the same
instant (:mod:`recforge.serve.workers`): each worker loads the new model and *stages* it
(:meth:`stage`), still serving the old one; once all have staged it, the coordinator writes the
new generation into a shared 8-byte word, and from then on every access to :attr:`current`, in
any worker, promotes and returns the new model. A request that starts after the commit is never
answered by the old model; one that starts before it never by the new. If any worker cannot
load it, the staged models are discarded and no worker changes (:meth:`discard`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from recforge.artifact import MODEL
from recforge.serve.recommender import Recommender


class ModelHolder:
    """The current model; replaced whole on reload."""

    def __init__(
        self,
        source: str,
        threads: int,
        index: str,
        tracking_uri: str | None,
        ef_search: int = 512,
        metrics: Any = None,
    ) -> None:
        self.source, self.threads, self.index, self.tracking_uri = (
            source,
            threads,
            index,
            tracking_uri,
        )
        self.ef_search = ef_search
        self.metrics = metrics
        self.lock = threading.Lock()  # one load at a time; readers never take it
        self._swap_lock = threading.Lock()  # held only for the swap itself, never for a load
        self._current = self._load(source)
        self._staged: tuple[int, str, Recommender] | None = None
        self.committed: Callable[[], int] | None = None  # the cluster's committed generation
        self.loaded_at = time.time()
        self.reloads = 0
        self._served()

    @property
    def current(self) -> Recommender:
        staged = self._staged
        if staged is not None and self.committed is not None and self.committed() >= staged[0]:
            self._promote(staged)
        return self._current

    def reload(self, source: str | None = None) -> Recommender:
        """One process: load ``source`` (default: the one served) and swap it in."""
        with self.lock:
            new = self.load(source or self.source)
            with self._swap_lock:
                self._swap(source or self.source, new)
            return new

    def load(self, source: str) -> Recommender:
        """A model from ``source``, not yet served; a failure is counted and raised."""
        try:
            return self._load(source)
        except Exception:
            if self.metrics is not None:
                self.metrics.reloads.labels(result="failure").inc()
            raise

    def stage(self, generation: int, source: str, model: Recommender) -> None:
        """Serve ``model`` once the cluster commits ``generation``."""
        with self._swap_lock:
            self._staged = (generation, source, model)

    def staged_sha(self) -> str | None:
        staged = self._staged
        return None if staged is None else staged[2].manifest["files"][MODEL][:12]

    def discard(self, generation: int) -> None:
        """Drop the staged model of ``generation`` (the reload was aborted)."""
        with self._swap_lock:
            if self._staged is not None and self._staged[0] == generation:
                self._staged = None

    def _promote(self, staged: tuple[int, str, Recommender]) -> None:
        with self._swap_lock:
            if self._staged is not staged:
                return  # another thread promoted it (or it was discarded) meanwhile
            self._staged = None
            self._swap(staged[1], staged[2])

    def _swap(self, source: str, new: Recommender) -> None:
        self.source, self._current, self.loaded_at = source, new, time.time()
        self.reloads += 1
        if self.metrics is not None:
            self.metrics.reloads.labels(result="success").inc()
        self._served()

    def _served(self) -> None:
        if self.metrics is not None:
            manifest = self._current.manifest
            self.metrics.served(manifest, manifest["files"][MODEL], self.source)

    def _load(self, source: str) -> Recommender:
        return Recommender.load(
            source,
            threads=self.threads,
            index=self.index,
            ef_search=self.ef_search,
            tracking_uri=self.tracking_uri,
        )
