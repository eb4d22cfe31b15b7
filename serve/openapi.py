"""The OpenAPI document of `recforge serve`, made to say exactly what the loaded model accepts
(docs/architecture.md §10).

FastAPI's document describes the pydantic models; on top of it, per loaded model (rebuilt after a
reload): ``k``'s ``maximum`` is ``min(1000, number of items)``; ``exclude_categories`` lists the
item features the artifact carries; ``user_features`` lists the model's feature names
(``propertyNames`` enum, one typed property each, nothing else; an empty object for a model
without user features); a request must carry a non-null ``user_id``, a ``history`` or a non-empty
``user_features``; the v2 input and output names and datatypes are enums. Every operation lists
the statuses it can answer, all 4xx in the one error shape of :mod:`recforge.serve.errors`;
FastAPI's own 422 schema is not used anywhere.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from recforge.serve.kserve import NUMPY, InferRequest
from recforge.serve.recommender import MAX_K, Recommender

_SCHEMAS = "#/components/schemas/"
_ITEM_ID = {"anyOf": [{"type": "integer"}, {"type": "string"}]}


def install_contract(app: FastAPI, current: Any) -> None:
    """Replace ``app.openapi`` by the model-aware document; ``current()`` is the served model."""
    cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        model = current()
        if cache.get("model") is not model:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
                separate_input_output_schemas=False,
            )
            _patch(schema, model)
            cache.update(model=model, schema=schema)
        app.openapi_schema = cache["schema"]
        return cache["schema"]

    app.openapi = openapi  # type: ignore[method-assign]


def _patch(schema: dict[str, Any], model: Recommender) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for op in (op for path in schema["paths"].values() for op in path.values()):
        validation = op.get("responses", {}).get("422", {})
        if "HTTPValidationError" in str(validation):
            del op["responses"]["422"]  # path parameters are plain strings: never a 422
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)

    infer = InferRequest.model_json_schema(ref_template=_SCHEMAS + "{model}")
    components.update(infer.pop("$defs", {}))
    components["InferRequest"] = infer
    inputs = [spec["name"] for spec in model.inputs]
    outputs = [spec["name"] for spec in model.manifest["outputs"]]
    components["InferInput"]["properties"]["name"] = {"type": "string", "enum": inputs}
    components["InferInput"]["properties"]["datatype"] = {"type": "string", "enum": list(NUMPY)}
    components["InferOutputRequest"]["properties"]["name"] = {"type": "string", "enum": outputs}

    request = components["RecommendRequest"]
    props = request["properties"]
    limit = min(MAX_K, model.num_items)
    props["k"]["maximum"] = limit
    props["k"]["description"] = f"number of items, at most {limit} for this model"
    features = model.user_features
    names = features.names if features is not None else []
    described = props["user_features"].get("description", "")
    if features is None:
        props["user_features"] = {
            "anyOf": [{"type": "object", "maxProperties": 0}, {"type": "null"}],
            "description": "this model reads no user features: leave out (or empty)",
        }
    else:
        typed: dict[str, Any] = {}
        for name in names:
            if name in features.numeric:
                typed[name] = {"type": "number"}
            elif features.kinds[name] == "list":
                typed[name] = {"type": "array", "items": _ITEM_ID, "maxItems": 10_000}
            else:
                typed[name] = {
                    "anyOf": [
                        {"type": "string"},
                        {"type": "integer"},
                        {"type": "number"},
                        {"type": "boolean"},
                    ]
                }
        props["user_features"] = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": typed,
                    "propertyNames": {"enum": names},
                    "additionalProperties": False,
                },
                {"type": "null"},
            ],
            "description": described + f"; this model reads {names}",
        }
    _patch_categories(props, model)
    grounds: list[dict[str, Any]] = [
        {"required": ["user_id"], "properties": {"user_id": {"not": {"type": "null"}}}},
        {"required": ["history"], "properties": {"history": {"type": "array"}}},
    ]
    if features is not None and names:
        grounds.append(
            {
                "required": ["user_features"],
                "properties": {"user_features": {"type": "object", "minProperties": 1}},
            }
        )
    request["anyOf"] = grounds
    request["description"] = (
        "A non-null user_id, a history"
        + (" or non-empty user_features" if names else "")
        + " is needed."
    )


def _patch_categories(props: dict[str, Any], model: Recommender) -> None:
    """``exclude_categories`` names exactly the item features the artifact carries (an empty
    object or null for a model without any), each a list of values (serve/rerank.py)."""
    names = model.categories.names
    if not names:
        props["exclude_categories"] = {
            "anyOf": [{"type": "object", "maxProperties": 0}, {"type": "null"}],
            "description": "this model's artifact holds no item categories: leave out (or empty)",
        }
        return
    values = {"type": "array", "items": _ITEM_ID, "maxItems": 10_000}
    props["exclude_categories"] = {
        "anyOf": [
            {
                "type": "object",
                "properties": {name: values for name in names},
                "propertyNames": {"enum": names},
                "additionalProperties": False,
            },
            {"type": "null"},
        ],
        "description": props["exclude_categories"].get("description", "")
        + f"; this model's item features: {names}",
    }
