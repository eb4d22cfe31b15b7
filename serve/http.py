"""`recforge serve`: the HTTP service over :class:`recforge.serve.recommender.Recommender`
(docs/architecture.md §10).

Routes: ``POST /v1/recommend``, ``POST /v1/recommend:batch``, ``GET /healthz``, ``GET /v1/model``
(the manifest), ``POST /v1/admin/reload`` (also on SIGHUP), OpenAPI docs at ``/docs``, and the
raw model through the Open Inference Protocol (KServe v2): ``GET /v2/health/ready``,
``GET /v2/models/{name}``, ``POST /v2/models/{name}/infer``.

Reload swaps one reference: a request takes the current model once at its start and finishes
on it, so requests in flight during a reload complete on the old model and none fail. Bad
requests get a 4xx with a message; request bodies over ``max_body_bytes`` get 413.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from recforge.artifact import MODEL, USER_VECTOR, ArtifactError, onnx_dims
from recforge.serve.recommender import MAX_K, Recommender, RequestError, UnknownUserError

log = logging.getLogger(__name__)

ItemId = StrictInt | StrictStr
FeatureValue = StrictStr | StrictInt | StrictFloat | StrictBool | list[StrictStr | StrictInt]
MAX_BATCH = 256
MAX_HISTORY = 10_000


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
    k: StrictInt = Field(10, ge=1, le=MAX_K, description="number of items")
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


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: list[RecommendRequest] = Field(..., min_length=1, max_length=MAX_BATCH)


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: StrictStr | None = Field(
        None, description="new artifact (path or models:/...); default: the same source"
    )


class InferTensor(BaseModel):
    name: StrictStr
    shape: list[StrictInt]
    datatype: StrictStr
    data: list[Any]


class InferRequest(BaseModel):
    id: StrictStr | None = None
    inputs: list[InferTensor] = Field(..., min_length=1, max_length=16)


class ModelHolder:
    """The current model; replaced whole on reload."""

    def __init__(
        self, source: str, threads: int, index: str, tracking_uri: str | None, ef_search: int = 512
    ) -> None:
        self.source, self.threads, self.index, self.tracking_uri = (
            source,
            threads,
            index,
            tracking_uri,
        )
        self.ef_search = ef_search
        self.lock = threading.Lock()
        self.current = self._load(source)
        self.loaded_at = time.time()
        self.reloads = 0

    def reload(self, source: str | None = None) -> Recommender:
        with self.lock:  # one reload at a time; readers never wait
            new = self._load(source or self.source)
            self.source = source or self.source
            self.current, self.loaded_at = new, time.time()
            self.reloads += 1
            return new

    def _load(self, source: str) -> Recommender:
        return Recommender.load(
            source,
            threads=self.threads,
            index=self.index,
            ef_search=self.ef_search,
            tracking_uri=self.tracking_uri,
        )


def create_app(
    source: str,
    threads: int = 1,
    index: str = "auto",
    tracking_uri: str | None = None,
    max_body_bytes: int = 1 << 20,
    model_name: str = "recforge",
    ef_search: int = 512,
) -> FastAPI:
    holder = ModelHolder(source, threads, index, tracking_uri, ef_search)
    app = FastAPI(
        title="recforge", description="Recommendations from a recforge ONNX artifact.", version="1"
    )
    app.state.holder = holder

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Any:
        too_large = JSONResponse(
            {"detail": f"request body over {max_body_bytes} bytes"}, status_code=413
        )
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            return too_large
        if length is None and request.method in ("POST", "PUT", "PATCH"):
            # A chunked body has no length up front: read it here, capped, and hand it on (the
            # route's receive() replays request._body).
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body_bytes:
                    return too_large
                chunks.append(chunk)
            request._body = b"".join(chunks)
        return await call_next(request)

    def describe(model: Recommender) -> dict[str, Any]:
        return {
            "kind": model.manifest["kind"],
            "run_id": model.manifest.get("run_id"),
            "sha256": model.manifest["files"][MODEL][:12],
        }

    def answer(model: Recommender, requests: list[RecommendRequest]) -> list[dict[str, Any]]:
        try:
            results = model.recommend_batch([r.model_dump() for r in requests])
        except RequestError as exc:
            raise HTTPException(
                status_code=404 if isinstance(exc, UnknownUserError) else 422, detail=str(exc)
            ) from None
        return [{**r.as_dict(), "model": describe(model)} for r in results]

    @app.post("/v1/recommend", summary="Top-k items for one user or history")
    def recommend(body: RecommendRequest) -> dict[str, Any]:
        return answer(holder.current, [body])[0]

    @app.post("/v1/recommend:batch", summary="Top-k items for up to 256 requests")
    def recommend_batch(body: BatchRequest) -> dict[str, Any]:
        return {"results": answer(holder.current, body.requests)}

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        model = holder.current
        return {
            "status": "ok",
            "model": describe(model),
            "items": model.num_items,
            "reloads": holder.reloads,
        }

    @app.get("/v1/model", summary="The artifact's manifest")
    def model_manifest() -> dict[str, Any]:
        return holder.current.manifest

    @app.post(
        "/v1/admin/reload", summary="Load the artifact again (or another one) and swap atomically"
    )
    def reload(body: ReloadRequest | None = None) -> dict[str, Any]:
        try:
            model = holder.reload(body.source if body else None)
        except (ArtifactError, OSError, ValueError) as exc:
            raise HTTPException(
                status_code=409, detail=f"reload refused, still serving the old model: {exc}"
            ) from None
        return {"status": "reloaded", "model": describe(model), "reloads": holder.reloads}

    # --- Open Inference Protocol (KServe v2) over the raw ONNX model ---

    @app.get("/v2/health/ready")
    def v2_ready() -> dict[str, Any]:
        return {"ready": True}

    def check_name(name: str) -> None:
        if name != model_name:
            raise HTTPException(
                status_code=404, detail=f"model {name!r} not found (this server has {model_name!r})"
            )

    @app.get("/v2/models/{name}")
    def v2_metadata(name: str) -> dict[str, Any]:
        check_name(name)
        m = holder.current.manifest
        dtype = {"int64": "INT64", "float32": "FP32"}
        return {
            "name": model_name,
            "versions": [m["files"][MODEL][:12]],
            "platform": "onnxruntime_onnx",
            "inputs": [
                {"name": t["name"], "datatype": dtype[t["dtype"]], "shape": onnx_dims(t["shape"])}
                for t in m["inputs"]
            ],
            "outputs": [
                {"name": t["name"], "datatype": dtype[t["dtype"]], "shape": onnx_dims(t["shape"])}
                for t in m["outputs"]
            ],
        }

    @app.post("/v2/models/{name}/infer")
    def v2_infer(name: str, body: InferRequest) -> dict[str, Any]:
        check_name(name)
        model = holder.current
        v2_types = {"INT64": np.int64, "FP32": np.float32}
        feeds = {}
        for tensor in body.inputs:
            dtype = v2_types.get(tensor.datatype)
            size = int(np.prod(tensor.shape)) if tensor.shape else 1
            if (
                dtype is None
                or tensor.name in feeds
                or not tensor.shape
                or min(tensor.shape) < 1
                or tensor.shape[0] > MAX_BATCH
                or len(tensor.data) != size
            ):
                raise HTTPException(
                    status_code=422,
                    detail=f"input {tensor.name!r}: need datatype INT64 or FP32, "
                    f"a shape of positive dims with batch <= {MAX_BATCH}, len(data) == its "
                    "product, and each name once",
                )
            try:
                feeds[tensor.name] = np.asarray(tensor.data, dtype=dtype).reshape(tensor.shape)
            except (ValueError, TypeError, OverflowError):
                raise HTTPException(
                    status_code=422, detail=f"input {tensor.name!r}: data must be numbers"
                ) from None
        try:
            out = model.run_model(feeds)  # (B, D)
        except RequestError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        return {
            "model_name": model_name,
            "id": body.id,
            "outputs": [
                {
                    "name": USER_VECTOR,
                    "datatype": "FP32",
                    "shape": list(out.shape),
                    "data": out.reshape(-1).tolist(),
                }
            ],
        }

    return app


def install_sighup(app: FastAPI) -> None:
    """SIGHUP reloads the model (only from the main thread, where signal handlers may be set)."""
    holder: ModelHolder = app.state.holder

    def handler(signum: int, frame: Any) -> None:
        threading.Thread(target=_reload_logged, args=(holder,), daemon=True).start()

    signal.signal(signal.SIGHUP, handler)


def _reload_logged(holder: ModelHolder) -> None:
    try:
        holder.reload()
        log.info("reloaded %s (SIGHUP)", holder.source)
    except Exception as exc:
        log.error("reload on SIGHUP refused, still serving the old model: %s", exc)


def main(args: Any) -> int:
    import sys

    import uvicorn

    try:
        app = create_app(
            args.source,
            threads=args.threads,
            index=args.index,
            tracking_uri=args.tracking_uri,
            model_name=args.model_name,
            ef_search=args.ef_search,
        )
    except (ArtifactError, OSError, ValueError) as exc:
        print(f"recforge serve: error: {exc}", file=sys.stderr)
        return 2
    install_sighup(app)
    print(f"serving {args.source} on http://{args.host}:{args.port} (docs: /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", workers=1)
    return 0
