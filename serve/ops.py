"""Operating `recforge serve`: a bounded number of requests in flight, and Prometheus metrics
(docs/architecture.md §10).

Two pure ASGI middlewares, outermost first:

- :class:`Instrument` times every HTTP request and counts it by route *template* (``/v2/models/
  {name}/infer``, never the raw path; ``unmatched`` for paths no route serves), method and
  status, so label sets stay bounded whatever clients send;
- :class:`ConcurrencyLimit` lets at most ``max_concurrency`` requests of the *work* routes
  (``POST /v1/recommend``, ``POST /v1/recommend:batch``, ``POST .../infer``) be in flight; one
  more is answered at once with 503, ``Retry-After`` and the error shape of
  :mod:`recforge.serve.errors` (code ``overloaded``), before its body is read, rather than
  queued behind the others with unbounded latency. Health, metrics, metadata, docs and reload
  are never limited, so probes and scrapes still answer under overload. ``0`` means no limit.

The asyncio event loop runs every middleware call on one thread, so the in-flight count needs no
lock: nothing awaits between its test and its increment.

:class:`ServeMetrics` holds the collectors in a registry of its own (one per app, so several
apps in one process do not collide); ``GET /metrics`` exposes it in the Prometheus text format.
Per process (no ``PROMETHEUS_MULTIPROC_DIR``): with ``--workers N`` each worker
answers with its own counts.
"""

from __future__ import annotations

import re
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)
from starlette.routing import compile_path

from recforge.serve.errors import ApiError

RETRY_AFTER_S = 1
UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Request latency buckets (seconds): sub-millisecond health checks to multi-second batches.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def is_limited(scope: dict[str, Any]) -> bool:
    """The work routes: recommendations and v2 inference (POST). Everything else is exempt."""
    if scope["method"] != "POST":
        return False
    path = scope["path"]
    return path in ("/v1/recommend", "/v1/recommend:batch") or (
        path.startswith("/v2/models/") and path.endswith("/infer")
    )


class ServeMetrics:
    """The service's Prometheus collectors, in their own registry."""

    def __init__(self, max_concurrency: int) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        process_collector.ProcessCollector(registry=registry)  # process_resident_memory_bytes...
        platform_collector.PlatformCollector(registry=registry)
        gc_collector.GCCollector(registry=registry)
        self.requests = Counter(
            "recforge_http_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.errors = Counter(
            "recforge_http_errors",
            "HTTP requests answered with a status >= 400, by route template, method and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "recforge_http_request_duration_seconds",
            "time from a request's arrival to its last response byte, by route template",
            ["route", "method"],
            buckets=BUCKETS,
            registry=registry,
        )
        # The same count as a plain int, read by the batcher's thread (serve/batcher.py) to wait
        # for more requests only while others are in flight.
        self.active = 0
        self.in_flight = Gauge(
            "recforge_http_requests_in_flight",
            "requests of the limited (work) routes being served now",
            registry=registry,
        )
        self.max_concurrency = Gauge(
            "recforge_http_max_concurrency",
            "the in-flight limit of the work routes (--max-concurrency; 0: none)",
            registry=registry,
        )
        self.max_concurrency.set(max_concurrency)
        self.rejected = Counter(
            "recforge_http_rejected_overload",
            "requests answered 503 (overloaded) because --max-concurrency were in flight",
            registry=registry,
        )
        self.fallbacks = Counter(
            "recforge_fallbacks",
            "recommendations answered with the most-popular fallback (no usable history)",
            registry=registry,
        )
        self.model = Info(
            "recforge_model",
            "the model being served: version (first 12 hex digits of model.onnx's sha256), "
            "kind, run id, source",
            registry=registry,
        )
        self.reloads = Counter(
            "recforge_model_reloads",
            "model reloads (HTTP or SIGHUP) by result: success, or failure (old model kept)",
            ["result"],
            registry=registry,
        )
        for result in ("success", "failure"):
            self.reloads.labels(result=result)  # both series exist from the start, at 0
        self.loaded_at = Gauge(
            "recforge_model_loaded_timestamp_seconds",
            "Unix time the served model was loaded",
            registry=registry,
        )

    def served(self, manifest: dict[str, Any], sha256: str, source: str) -> None:
        """The model now served (at start and after each successful reload)."""
        self.model.info(
            {
                "version": sha256[:12],
                "kind": str(manifest.get("kind", "")),
                "run_id": str(manifest.get("run_id") or ""),
                "source": source,
            }
        )
        self.loaded_at.set_to_current_time()

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class ConcurrencyLimit:
    """At most ``max_concurrency`` work requests in flight; the next one gets 503 at once."""

    def __init__(self, app: Any, max_concurrency: int, metrics: ServeMetrics) -> None:
        self.app, self.limit, self.metrics = app, max_concurrency, metrics
        self.in_flight = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not is_limited(scope):
            await self.app(scope, receive, send)
            return
        if self.limit and self.in_flight >= self.limit:
            self.metrics.rejected.inc()
            error = ApiError(
                503,
                f"overloaded: {self.in_flight} requests in flight (--max-concurrency "
                f"{self.limit}); retry after {RETRY_AFTER_S} s",
            )
            error.headers = {"Retry-After": str(RETRY_AFTER_S)}
            await error.response()(scope, receive, send)
            return
        self.in_flight += 1
        self.metrics.active += 1
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.metrics.active -= 1
            self.metrics.in_flight.dec()


class Instrument:
    """Counts and times every HTTP request by route template, method and status."""

    def __init__(self, app: Any, router: Any, metrics: ServeMetrics) -> None:
        self.app, self.router, self.metrics = app, router, metrics
        self._table: list[tuple[re.Pattern[str], frozenset[str] | None, str]] | None = None

    def table(self) -> list[tuple[re.Pattern[str], frozenset[str] | None, str]]:
        """(regex, methods, template) of every route, included routers flattened; built at the
        first request, when every route is registered."""
        if self._table is None:
            try:  # FastAPI 0.16x keeps an included router whole; this flattens it
                from fastapi.routing import iter_route_contexts

                routes: list[Any] = list(iter_route_contexts(self.router.routes))
            except ImportError:
                routes = list(self.router.routes)
            table = []
            for route in routes:
                path = getattr(route, "path", None)
                if path:
                    methods = getattr(route, "methods", None)
                    table.append((compile_path(path)[0], frozenset(methods or ()) or None, path))
            self._table = table
        return self._table

    def route(self, scope: dict) -> str:
        path, method, partial = scope["path"], scope["method"], None
        for regex, methods, template in self.table():
            if regex.match(path):
                if methods is None or method in methods:
                    return template
                partial = partial or template  # right path, wrong method: 405
        return partial or UNMATCHED

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        route = self.route(scope)  # before the app: routing adds to the scope
        status = 500  # if the app fails before it answers, uvicorn sends a 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            method = scope["method"] if scope["method"] in METHODS else "other"
            labels = {"route": route, "method": method, "status": str(status)}
            self.metrics.requests.labels(**labels).inc()
            if status >= 400:
                self.metrics.errors.labels(**labels).inc()
            self.metrics.latency.labels(route=route, method=method).observe(
                time.perf_counter() - start
            )
