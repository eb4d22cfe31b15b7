"""The Open Inference Protocol (KServe v2) over the raw ONNX model, as Triton speaks it over HTTP
(docs/architecture.md §10).

Every required endpoint: ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2`` (server
metadata), ``GET /v2/models/{name}[/versions/{version}]`` (model metadata), ``.../ready``,
``POST .../infer``; and Triton's model configuration extension ``GET .../config``. The model has
one version, ``"1"``, as in the Triton repository ``recforge export --triton`` writes.

Inference takes every manifest input (INT64/FP32), as JSON ``data`` (flat or nested, row-major)
or through the **binary tensor data extension**: the JSON header is the first
``Inference-Header-Content-Length`` bytes of the body and each input with
``parameters.binary_data_size`` takes that many bytes (little-endian) from what follows, in input
order. Outputs are JSON unless asked binary (``parameters.binary_data_output`` for all, or
``outputs[i].parameters.binary_data``); a binary answer is ``application/octet-stream`` with the
JSON header's length in ``Inference-Header-Content-Length``. Errors: 400 for a body that is not
JSON or badly framed, 404 for another model name or version, 422 for inputs the model cannot
take (names, dtypes, shapes, ranges), all in the shape of :mod:`recforge.serve.errors`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
)

from recforge import __version__
from recforge.artifact import MODEL, TRITON_SHA256_PARAMETER, TRITON_VERSION, onnx_dims
from recforge.serve.body import BINARY_HEADER
from recforge.serve.errors import ApiError, error_responses, validation_error
from recforge.serve.recommender import Recommender, RequestError

MAX_BATCH = 256
V2_TYPES = {"int64": "INT64", "float32": "FP32"}
NUMPY = {"INT64": np.dtype("<i8"), "FP32": np.dtype("<f4")}
EXTENSIONS = ["binary_tensor_data", "model_configuration"]


def _integral(value: Any) -> Any:
    """JSON has one number type: 5.0 is the integer 5 (JSON Schema agrees), 5.5 is no integer."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[StrictInt, BeforeValidator(_integral)]
"""An integer as JSON Schema's ``integer``: 5 and 5.0, never "5", true or 5.5."""


# --- request and response bodies (the protocol's JSON; also the OpenAPI contract) ---


class InferInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    shape: list[JsonInt] = Field(..., max_length=8)
    datatype: StrictStr = Field(..., description="INT64 or FP32, as the model's metadata says")
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data_size`: the input's bytes follow the JSON header"
    )
    data: list[Any] | None = Field(None, description="row-major values, flat or nested")


class InferOutputRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data`: true for this output in binary"
    )


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: StrictStr | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data_output`: true for every output in binary"
    )
    inputs: list[InferInput] = Field(..., min_length=1, max_length=16)
    outputs: list[InferOutputRequest] | None = Field(None, max_length=16)


class InferOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[float] | None = Field(None, description="absent when sent in binary")
    parameters: dict[str, Any] | None = Field(None, description="`binary_data_size` if binary")


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(None, description="the request's id, when it had one")
    outputs: list[InferOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class ConfigTensor(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    data_type: str
    dims: list[int]


class ModelConfigBody(BaseModel):
    """Triton's model configuration (its protobuf as JSON), for the served model."""

    model_config = ConfigDict(extra="allow")
    name: str
    platform: str
    backend: str
    max_batch_size: int
    input: list[ConfigTensor]
    output: list[ConfigTensor]


INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "JSON; or, with the header Inference-Header-Content-Length: N, N bytes of "
        "JSON followed by the inputs' raw little-endian bytes (binary tensor data extension)",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
        },
    }
}
INFER_OK = {
    200: {
        "model": InferResponse,
        "description": "JSON, or for binary outputs the JSON header (its length in "
        "Inference-Header-Content-Length) followed by the outputs' raw bytes",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def metadata(model: Recommender, name: str) -> dict[str, Any]:
    m = model.manifest
    return {
        "name": name,
        "versions": [TRITON_VERSION],
        "platform": "onnxruntime_onnx",
        "inputs": [_tensor_meta(t) for t in m["inputs"]],
        "outputs": [_tensor_meta(t) for t in m["outputs"]],
    }


def _tensor_meta(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": spec["name"],
        "datatype": V2_TYPES[spec["dtype"]],
        "shape": onnx_dims(spec["shape"]),
    }


def model_config(model: Recommender, name: str) -> dict[str, Any]:
    """What Triton answers for the repository ``recforge export --triton`` writes."""
    m = model.manifest

    def tensors(specs: list[dict[str, Any]], output: bool) -> list[dict[str, Any]]:
        return [
            {
                "name": s["name"],
                "data_type": "TYPE_" + V2_TYPES[s["dtype"]],
                "dims": onnx_dims(s["shape"]),
                "is_shape_tensor": False,
                **(
                    {"label_filename": ""}
                    if output
                    else {"format": "FORMAT_NONE", "optional": False}
                ),
            }
            for s in specs
        ]

    return {
        "name": name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": 0,
        "input": tensors(m["inputs"], False),
        "output": tensors(m["outputs"], True),
        "instance_group": [{"name": f"{name}_0", "kind": "KIND_CPU", "count": 1}],
        "default_model_filename": MODEL,
        "parameters": {TRITON_SHA256_PARAMETER: {"string_value": m["files"][MODEL]}},
    }


# --- inference ---


def _flat(data: list[Any], where: str, depth: int = 0) -> list[Any]:
    """Nested row-major lists -> one flat list (the protocol allows both spellings)."""
    if not any(isinstance(v, list) for v in data):
        return data
    if not all(isinstance(v, list) for v in data) or depth >= 8:
        raise ApiError(422, f"{where}: mixes numbers and lists, or nests too deep", field=where)
    out: list[Any] = []
    for values in data:
        out.extend(_flat(values, where, depth + 1))
    return out


def _bool_param(params: dict[str, Any] | None, key: str, where: str, default: bool) -> bool:
    value = (params or {}).get(key, default)
    if not isinstance(value, bool):
        raise ApiError(422, f"{where}.{key} must be true or false", field=f"{where}.{key}")
    return value


def _unsupported(params: dict[str, Any] | None, where: str) -> None:
    for key in ("shared_memory_region", "classification"):
        if key in (params or {}):
            raise ApiError(
                422, f"{where}: {key} is not supported by this server", field=f"{where}.{key}"
            )


def _feeds(body: InferRequest, binary: bytes) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for i, tensor in enumerate(body.inputs):
        where = f"inputs.{i}"
        _unsupported(tensor.parameters, f"{where}.parameters")
        dtype = NUMPY.get(tensor.datatype)
        if dtype is None:
            raise ApiError(
                422,
                f"input {tensor.name!r}: datatype {tensor.datatype!r}; "
                "the model takes INT64 or FP32",
                field=f"{where}.datatype",
            )
        if tensor.name in feeds:
            raise ApiError(422, f"input {tensor.name!r} given twice", field=f"{where}.name")
        shape = tensor.shape
        if not shape or min(shape) < 1 or shape[0] > MAX_BATCH:
            raise ApiError(
                422,
                f"input {tensor.name!r}: shape {shape} must have positive dims and batch <= "
                f"{MAX_BATCH}",
                field=f"{where}.shape",
            )
        size = math.prod(shape)
        nbytes = (tensor.parameters or {}).get("binary_data_size")
        if nbytes is not None:
            if tensor.data is not None:
                raise ApiError(
                    422, f"input {tensor.name!r}: both data and binary_data_size", field=where
                )
            if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
                raise ApiError(
                    422,
                    f"input {tensor.name!r}: binary_data_size must be a non-negative integer",
                    field=f"{where}.parameters.binary_data_size",
                )
            if nbytes != size * dtype.itemsize:
                raise ApiError(
                    422,
                    f"input {tensor.name!r}: binary_data_size {nbytes} != {size} values of "
                    f"{dtype.itemsize} bytes",
                    field=f"{where}.parameters.binary_data_size",
                )
            if offset + nbytes > len(binary):
                raise ApiError(
                    400, f"input {tensor.name!r}: the body ends before its {nbytes} bytes"
                )
            array = np.frombuffer(binary, dtype=dtype, count=size, offset=offset)
            feeds[tensor.name] = array.astype(dtype.newbyteorder("="), copy=True).reshape(shape)
            offset += nbytes
            continue
        if tensor.data is None:
            raise ApiError(
                422, f"input {tensor.name!r}: no data (and no binary_data_size)", field=where
            )
        values = _flat(tensor.data, f"{where}.data")
        if len(values) != size:
            raise ApiError(
                422,
                f"input {tensor.name!r}: {len(values)} values for shape {shape}",
                field=f"{where}.data",
            )
        ok = (int,) if tensor.datatype == "INT64" else (int, float)
        if not all(isinstance(v, ok) and not isinstance(v, bool) for v in values):
            kind = "integers" if tensor.datatype == "INT64" else "numbers"
            raise ApiError(
                422, f"input {tensor.name!r}: data must be {kind}", field=f"{where}.data"
            )
        try:
            feeds[tensor.name] = np.asarray(values, dtype=dtype).reshape(shape)
        except (OverflowError, ValueError):
            raise ApiError(
                422,
                f"input {tensor.name!r}: a value is out of {tensor.datatype}'s range",
                field=f"{where}.data",
            ) from None
    if offset != len(binary):
        raise ApiError(400, f"{len(binary) - offset} bytes after the last binary input")
    return feeds


def infer(model: Recommender, name: str, raw: bytes, header_length: str | None) -> Response:
    if header_length is not None:
        digits = header_length.strip()
        if not (digits.isascii() and digits.isdigit()) or int(digits) > len(raw):
            raise ApiError(
                400, f"Inference-Header-Content-Length {header_length!r} does not fit the body"
            )
        head, binary = raw[: int(digits)], raw[int(digits) :]
    else:
        head, binary = raw, b""
    try:
        body = InferRequest.model_validate_json(head)
    except ValidationError as exc:
        raise validation_error(list(exc.errors())) from None
    _unsupported(body.parameters, "parameters")
    all_binary = _bool_param(body.parameters, "binary_data_output", "parameters", False)
    outputs = [s["name"] for s in model.manifest["outputs"]]
    wanted: list[tuple[str, bool]] = []
    for i, out in enumerate(body.outputs or ()):
        if out.name not in outputs or any(out.name == w for w, _ in wanted):
            raise ApiError(
                422,
                f"output {out.name!r}: the model's outputs are {outputs} (each asked once)",
                field=f"outputs.{i}.name",
            )
        _unsupported(out.parameters, f"outputs.{i}.parameters")
        wanted.append(
            (
                out.name,
                _bool_param(out.parameters, "binary_data", f"outputs.{i}.parameters", all_binary),
            )
        )
    if not wanted:
        wanted = [(n, all_binary) for n in outputs]
    feeds = _feeds(body, binary)
    try:
        vectors = model.run_model(feeds)  # the only output: user_vector (B, D)
    except RequestError as exc:
        raise ApiError(422, str(exc)) from None
    result: dict[str, Any] = {"model_name": name, "model_version": TRITON_VERSION}
    if body.id is not None:
        result["id"] = body.id
    result["outputs"], chunks = [], []
    for out_name, as_binary in wanted:
        array = np.ascontiguousarray(vectors, dtype="<f4")
        entry: dict[str, Any] = {"name": out_name, "datatype": "FP32", "shape": list(array.shape)}
        if as_binary:
            chunks.append(array.tobytes())
            entry["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            entry["data"] = array.reshape(-1).tolist()
        result["outputs"].append(entry)
    if not chunks:
        return JSONResponse(result)
    header = json.dumps(result, separators=(",", ":")).encode()
    return Response(
        header + b"".join(chunks),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


# --- routes ---


def kserve_router(current: Callable[[], Recommender], model_name: str) -> APIRouter:
    """The v2 routes; ``current()`` is the model serving right now (reloads swap it)."""
    router = APIRouter(tags=["KServe v2 (Open Inference Protocol)"])
    not_found = error_responses(404)

    def check(name: str, version: str | None = None) -> None:
        if name != model_name:
            raise ApiError(
                404, f"model {name!r} not found (this server has {model_name!r})", "unknown_model"
            )
        if version is not None and version != TRITON_VERSION:
            raise ApiError(
                404,
                f"model {name!r} has no version {version!r} (it has {TRITON_VERSION!r})",
                "unknown_model",
            )

    @router.get("/v2/health/live", summary="Server live", response_model=Live)
    def live() -> dict[str, Any]:
        return {"live": True}

    @router.get("/v2/health/ready", summary="Server ready", response_model=Ready)
    def ready() -> dict[str, Any]:
        return {"ready": True}

    @router.get("/v2", summary="Server metadata", response_model=ServerMetadata)
    def server_metadata() -> dict[str, Any]:
        return {"name": "recforge", "version": __version__, "extensions": EXTENSIONS}

    def unversioned(name: str) -> str:
        check(name)
        return name

    def versioned(name: str, version: str) -> str:
        check(name, version)
        return name

    for prefix, target, suffix in (
        ("/v2/models/{name}", unversioned, ""),
        ("/v2/models/{name}/versions/{version}", versioned, " (one version)"),
    ):

        @router.get(
            prefix,
            summary="Model metadata" + suffix,
            response_model=ModelMetadata,
            responses=not_found,
        )
        def model_metadata(name: str = Depends(target)) -> dict[str, Any]:
            return metadata(current(), model_name)

        @router.get(
            prefix + "/ready",
            summary="Model ready" + suffix,
            response_model=ModelReady,
            responses=not_found,
        )
        def model_ready(name: str = Depends(target)) -> dict[str, Any]:
            return {"name": model_name, "ready": True}

        @router.get(
            prefix + "/config",
            summary="Model configuration (Triton's)" + suffix,
            response_model=ModelConfigBody,
            responses=not_found,
        )
        def config(name: str = Depends(target)) -> dict[str, Any]:
            return model_config(current(), model_name)

        @router.post(
            prefix + "/infer",
            summary="Inference on the raw model" + suffix,
            response_model=None,
            responses={**INFER_OK, **error_responses(400, 404, 413, 415, 422, 503)},
            openapi_extra=INFER_BODY,
        )
        async def model_infer(request: Request, name: str = Depends(target)) -> Response:
            raw = await request.body()
            model = current()  # taken once: a reload during the request does not change it
            return await run_in_threadpool(
                infer, model, model_name, raw, request.headers.get(BINARY_HEADER)
            )

    return router
