"""`recforge serve`: the HTTP service over :class:`recforge.serve.recommender.Recommender`
(docs/architecture.md §10).

Routes: ``POST /v1/recommend``, ``POST /v1/recommend:batch``, ``GET /healthz``, ``GET /v1/model``
(the manifest), ``POST /v1/admin/reload`` (also on SIGHUP), ``GET /metrics`` (Prometheus),
OpenAPI docs at ``/docs``, and the raw model through the Open Inference Protocol (KServe v2) as
Triton speaks it (:mod:`recforge.serve.kserve`).

Reload swaps one reference: a request takes the current model once at its start and finishes
on it, so requests in flight during a reload complete on the old model and none fail; with
``--workers`` all workers switch at one instant (:mod:`recforge.serve.holder`). Bodies are
checked before any route (:mod:`recforge.serve.body`: size, content type, coding); every 4xx has
one shape (:mod:`recforge.serve.errors`); the OpenAPI document states what the loaded model
accepts and every status each route answers (:mod:`recforge.serve.openapi`). At most
``max_concurrency`` recommendation/inference requests are in flight; more get 503 at once
(:mod:`recforge.serve.ops`, which also keeps the metrics). The two recommendation routes are
answered in front of FastAPI's router, with the same answers (:mod:`recforge.serve.fastpath`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Annotated, Any

import orjson
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from recforge.artifact import MODEL, ArtifactError
from recforge.serve.batcher import Batcher
from recforge.serve.body import BodyGate
from recforge.serve.errors import ApiError, error_responses, install_error_handlers
from recforge.serve.explain import EXPLAIN_TOP
from recforge.serve.fastpath import FastRoutes
from recforge.serve.holder import ModelHolder
from recforge.serve.kserve import MAX_BATCH, JsonInt, kserve_router
from recforge.serve.openapi import install_contract
from recforge.serve.ops import ConcurrencyLimit, Instrument, ServeMetrics
from recforge.serve.recommender import (
    MAX_K,
    NoUserStoreError,
    Recommender,
    RequestError,
    UnknownUserError,
)
from recforge.serve.workers import Cluster, listening_socket, serve_workers


def _dumps(payload: Any) -> bytes:
    try:
        return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError:
        # Echoed unknown history ids orjson refuses (integers beyond 64 bits, lone
        # surrogates): the standard library escapes them into valid JSON.
        return json.dumps(payload, separators=(",", ":")).encode()


log = logging.getLogger(__name__)


ItemId = JsonInt | StrictStr
FeatureValue = StrictStr | StrictInt | StrictFloat | StrictBool | list[ItemId]
MAX_HISTORY = 10_000
MAX_CONCURRENCY = 64
MAX_BATCH_SIZE = 64  # dynamic batching: requests per onnxruntime call at most (1: off)
MAX_QUEUE_DELAY_US = 500  # how long a batch that is not full waits for more requests
JSON = "application/json"


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: ItemId | None = Field(
        None, description="a user known to the model (its history is used)"
    )
    history: list[ItemId] | None = Field(
        None,
        max_length=MAX_HISTORY,
        description="original item ids, oldest first; unknown ones are ignored",
    )
    k: JsonInt = Field(10, ge=1, le=MAX_K, description="number of items")
    exclude_seen: StrictBool = Field(True, description="leave out items of the user's history")
    exclude: list[ItemId] = Field(
        default_factory=list, max_length=MAX_HISTORY, description="more items to leave out"
    )
    user_features: dict[StrictStr, FeatureValue] | None = Field(
        None,
        max_length=256,
        description="two-tower models with user features: raw values by feature name "
        "(one value per categorical feature, a list per list feature, a number per numeric one), "
        "e.g. for a new user; unknown values are treated as missing and reported",
    )
    exclude_categories: (
        dict[StrictStr, Annotated[list[ItemId], Field(max_length=MAX_HISTORY)]] | None
    ) = Field(
        None,
        max_length=64,
        description="leave out items whose value of an item categorical/list feature is one of "
        "these (`{feature: [values]}`, compared as text; unknown values exclude nothing)",
    )
    diversity: StrictFloat = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="MMR re-ranking over item embeddings among the top max(50, 5k): "
        "0 = the plain ranking, 1 = most diverse; scores stay the model's",
    )
    explain: StrictBool = Field(
        False,
        description=f"add to each item `because`: up to {EXPLAIN_TOP} history items that most "
        "support it, with the score it would lose without each (leave-one-out)",
    )


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: list[RecommendRequest] = Field(..., min_length=1, max_length=MAX_BATCH)


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: StrictStr | None = Field(
        None, description="new artifact (path or models:/...); default: the same source"
    )


class Support(BaseModel):
    item_id: int | str
    score: float = Field(..., description="score the item loses without this history item")


class ScoredItem(BaseModel):
    item_id: int | str
    score: float = Field(..., description="model score, or the training count for a fallback")
    because: list[Support] | None = Field(
        None, description="`explain`: the most supporting history items, strongest first"
    )


class ModelInfo(BaseModel):
    kind: str
    run_id: str | None
    sha256: str = Field(..., description="the first 12 hex digits of model.onnx's sha256")


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    fallback: bool = Field(..., description="no usable history: the most-popular items")
    unknown_history_items: list[int | str]
    unknown_user_features: list[str] = Field(..., description="`name=value`, treated as missing")
    model: ModelInfo


class BatchResponse(BaseModel):
    results: list[RecommendResponse]


class HealthResponse(BaseModel):
    status: str
    model: ModelInfo
    items: int
    reloads: int
    worker: int = Field(..., description="process id of the worker that answered (--workers)")


class ReloadResponse(BaseModel):
    status: str
    model: ModelInfo
    reloads: int


def create_app(
    source: str,
    threads: int = 1,
    index: str = "auto",
    tracking_uri: str | None = None,
    max_body_bytes: int = 1 << 20,
    model_name: str = "recforge",
    ef_search: int = 512,
    max_concurrency: int = MAX_CONCURRENCY,
    max_batch_size: int = MAX_BATCH_SIZE,
    max_queue_delay_us: int = MAX_QUEUE_DELAY_US,
    cluster: Cluster | None = None,
) -> FastAPI:
    if max_concurrency < 0:
        raise ValueError(f"max_concurrency must be >= 0 (0: no limit), not {max_concurrency}")
    metrics = ServeMetrics(max_concurrency)
    holder = ModelHolder(source, threads, index, tracking_uri, ef_search, metrics)
    app = FastAPI(
        title="recforge",
        description="Recommendations from a recforge ONNX artifact. Every 4xx answers "
        '`{"error": message, "code": kind, "field": path or null}`.',
        version="1",
    )
    # Batching off (1) keeps the route thread pool: one recommend_batch call per HTTP request.
    batcher = (
        Batcher(max_batch_size, max_queue_delay_us, lambda: metrics.active)
        if max_batch_size > 1
        else None
    )
    app.state.holder, app.state.metrics, app.state.batcher = holder, metrics, batcher
    if cluster is not None:
        cluster.start(holder)
    # Outermost last: Instrument sees every answer (503s and body errors too); the limit
    # answers before any body is read; the two recommendation routes are answered inside all
    # three, without FastAPI's per-request work (serve/fastpath.py), by the handlers below.
    app.add_middleware(
        FastRoutes,
        routes={
            "/v1/recommend": (RecommendRequest, lambda body: one(body)),
            "/v1/recommend:batch": (BatchRequest, lambda body: many(body)),
        },
    )
    app.add_middleware(BodyGate, max_body_bytes=max_body_bytes)
    app.add_middleware(ConcurrencyLimit, max_concurrency=max_concurrency, metrics=metrics)
    app.add_middleware(Instrument, router=app.router, metrics=metrics)
    install_error_handlers(app)

    def describe(model: Recommender) -> dict[str, Any]:
        return {
            "kind": model.manifest["kind"],
            "run_id": model.manifest.get("run_id"),
            "sha256": model.manifest["files"][MODEL][:12],
        }

    async def answer(
        model: Recommender, requests: list[RecommendRequest], batch: bool = False
    ) -> list[dict[str, Any]]:
        dumped = [r.model_dump() for r in requests]
        try:
            if batcher is None:
                results = await run_in_threadpool(model.recommend_batch, dumped)
            else:
                results = await batcher.submit(model, dumped)
        except UnknownUserError as exc:
            raise ApiError(404, str(exc), "unknown_user", "user_id") from None
        except NoUserStoreError as exc:
            raise ApiError(422, str(exc), field="user_id") from None
        except RequestError as exc:
            raise ApiError(422, str(exc), field=_field(exc, batch)) from None
        fallbacks = sum(r.fallback for r in results)
        if fallbacks:
            metrics.fallbacks.inc(fallbacks)
        info = describe(model)
        return [{**r.as_dict(), "model": info} for r in results]

    async def one(body: RecommendRequest) -> bytes:
        return _dumps((await answer(holder.current, [body]))[0])

    async def many(body: BatchRequest) -> bytes:
        return _dumps({"results": await answer(holder.current, body.requests, batch=True)})

    body_errors = error_responses(400, 413, 415, 422)
    limited = error_responses(503)

    @app.post(
        "/v1/recommend",
        summary="Top-k items for one user or history",
        response_model=None,
        responses={
            200: {"model": RecommendResponse},
            **error_responses(404),
            **body_errors,
            **limited,
        },
    )
    async def recommend(body: RecommendRequest) -> Response:  # the contract; FastRoutes answers
        return Response(await one(body), media_type=JSON)

    @app.post(
        "/v1/recommend:batch",
        summary=f"Top-k items for up to {MAX_BATCH} requests",
        response_model=None,
        responses={200: {"model": BatchResponse}, **error_responses(404), **body_errors, **limited},
    )
    async def recommend_batch(body: BatchRequest) -> Response:  # as recommend
        return Response(await many(body), media_type=JSON)

    @app.get("/healthz", summary="Status, model and reloads", response_model=HealthResponse)
    def healthz() -> dict[str, Any]:
        model = holder.current
        return {
            "status": "ok",
            "model": describe(model),
            "items": model.num_items,
            "reloads": holder.reloads,
            "worker": os.getpid(),
        }

    @app.get(
        "/metrics",
        summary="Prometheus metrics (text exposition format)",
        response_class=PlainTextResponse,
    )
    def prometheus_metrics() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/model", summary="The artifact's manifest")
    def model_manifest() -> dict[str, Any]:
        return holder.current.manifest

    @app.post(
        "/v1/admin/reload",
        summary="Load the artifact again (or another one) and swap atomically",
        response_model=ReloadResponse,
        responses={**error_responses(409), **body_errors},
    )
    def reload(body: ReloadRequest | None = None) -> dict[str, Any]:
        try:
            source = body.source if body else None
            model = cluster.reload(holder, source) if cluster else holder.reload(source)
        except (ArtifactError, OSError, ValueError) as exc:
            raise ApiError(
                409,
                f"reload refused, still serving the old model: {exc}",
                field="source" if body and body.source else None,
            ) from None
        return {"status": "reloaded", "model": describe(model), "reloads": holder.reloads}

    app.include_router(kserve_router(lambda: holder.current, model_name))
    install_contract(app, lambda: holder.current)
    return app


def _field(exc: RequestError, batch: bool) -> str | None:
    """The body path of a user-control error (serve/rerank.py names its field), else None."""
    field = getattr(exc, "field", None)
    if field is None or not batch:
        return field
    return f"requests.{exc.request}.{field}"


def install_sighup(app: FastAPI, cluster: Cluster | None = None) -> None:
    """SIGHUP reloads the model (only from the main thread, where signal handlers may be set);
    with workers, every worker's."""
    holder: ModelHolder = app.state.holder

    def handler(signum: int, frame: Any) -> None:
        threading.Thread(target=_reload_logged, args=(holder, cluster), daemon=True).start()

    signal.signal(signal.SIGHUP, handler)


def _reload_logged(holder: ModelHolder, cluster: Cluster | None) -> None:
    try:
        cluster.reload(holder, None) if cluster else holder.reload()
        log.info("reloaded %s (SIGHUP)", holder.source)
    except Exception as exc:
        log.error("reload on SIGHUP refused, still serving the old model: %s", exc)


def main(args: Any) -> int:
    import sys

    workers = getattr(args, "workers", 1)
    if workers > 1:
        return serve_workers(args, workers, _worker_main)
    try:
        app = _app(args)
    except (ArtifactError, OSError, ValueError) as exc:
        print(f"recforge serve: error: {exc}", file=sys.stderr)
        return 2
    install_sighup(app)
    print(f"serving {args.source} on http://{args.host}:{args.port} (docs: /docs)", flush=True)
    return _run(app, args)


def _app(args: Any, cluster: Cluster | None = None) -> FastAPI:
    return create_app(
        cluster.served_source() if cluster else args.source,
        threads=args.threads,
        index=args.index,
        tracking_uri=args.tracking_uri,
        model_name=args.model_name,
        ef_search=args.ef_search,
        max_concurrency=getattr(args, "max_concurrency", MAX_CONCURRENCY),
        max_batch_size=getattr(args, "max_batch_size", MAX_BATCH_SIZE),
        max_queue_delay_us=getattr(args, "max_queue_delay_us", MAX_QUEUE_DELAY_US),
        cluster=cluster,
    )


def _worker_main(options: dict[str, Any], cluster_dir: str, workers: int) -> None:
    """One of `--workers N` (a spawned process): the app on its own SO_REUSEPORT socket."""
    import argparse

    logging.basicConfig(level=logging.WARNING)
    args = argparse.Namespace(**options)
    cluster = Cluster(cluster_dir, workers)
    app = _app(args, cluster)
    install_sighup(app, cluster)
    sys_exit = _run(app, args, listening_socket(args.host, args.port))
    raise SystemExit(sys_exit)


def _run(app: FastAPI, args: Any, sock: Any = None) -> int:
    import uvicorn

    # uvicorn's access log, when asked for, is one line per request: client address, method,
    # path (with query string) and status; never a request body (nor do our own logs carry one).
    access_log = bool(getattr(args, "access_log", False))
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", access_log=access_log
    )
    if access_log:  # after Config set every uvicorn logger to log_level
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    server = uvicorn.Server(config)
    server.run(sockets=[sock] if sock is not None else None)
    return 0 if server.started else 1  # e.g. the port is taken (uvicorn logged why)
