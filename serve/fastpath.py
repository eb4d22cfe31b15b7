"""The hot JSON routes (``POST /v1/recommend`` and ``:batch``) answered without FastAPI's
per-request machinery (docs/architecture.md §10).

A pure ASGI middleware, innermost of the service's own, so the body has passed
:class:`recforge.serve.body.BodyGate` (size, content type, coding), the request is counted and
timed by :class:`recforge.serve.ops.Instrument` and holds a :class:`recforge.serve.ops.
ConcurrencyLimit` slot, exactly as for the FastAPI route. What it skips is FastAPI's: the
exception and exit-stack middlewares, the router's scan, the ``Request`` object, dependency
resolution and the endpoint wrapper, together the larger part of the event loop's time per
request. The FastAPI routes stay registered, unchanged: they make the OpenAPI document, and a
method other than POST still reaches them (405).

Answers are those of the FastAPI route, byte for byte:

- the body is parsed as FastAPI parses it (the standard library's ``json``), through orjson
  when orjson gives the same value: whenever orjson refuses a body (NaN, lone surrogates, a BOM,
  UTF-16...), the body holds a run of 19 or more digits (orjson reads integers beyond 64 bits as
  floats) or more than 256 ``[``/``{`` (nesting the standard library refuses, by recursion depth,
  where orjson goes on to 1024 levels), ``json.loads`` decides, with FastAPI's error for a body it
  cannot read;
- the value is validated by the same pydantic model with the same options (``from_attributes``,
  as FastAPI's body field), errors located under ``body`` as FastAPI locates them, and turned
  into the one error shape by the same :func:`recforge.serve.errors.validation_error`; an empty
  body is FastAPI's missing body;
- the handler's :class:`recforge.serve.errors.ApiError` is answered as the exception handler
  answers it; any other exception reaches Starlette's ``ServerErrorMiddleware`` (500), as before;
- a success is ``200`` with ``content-length`` and ``content-type: application/json``, the
  headers of the route's ``Response``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from recforge.serve.errors import ApiError, validation_error

Handler = Callable[[Any], Awaitable[bytes]]
# Integers orjson cannot hold in 64 bits come back as floats; the standard library keeps them.
_LONG_DIGITS = re.compile(rb"\d{19}")
_MAX_OPENERS = 256  # well inside the standard library's depth limit (about 900 in a route)
_JSON_HEADER = (b"content-type", b"application/json")


def loads(body: bytes) -> Any:
    """``body`` as FastAPI's ``Request.json()`` reads it, or the ApiError its failure answers."""
    if body.count(b"[") + body.count(b"{") <= _MAX_OPENERS and not _LONG_DIGITS.search(body):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass  # the standard library decides (it accepts more) and words the error
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise validation_error(
            [{"type": "json_invalid", "loc": ("body", exc.pos), "ctx": {"error": exc.msg}}]
        ) from None
    except Exception:  # e.g. bytes in no Unicode coding: FastAPI's HTTPException(400)
        raise ApiError(400, "There was an error parsing the body") from None


def parse(body: bytes, model: type[BaseModel]) -> BaseModel:
    """``body`` validated as FastAPI validates a route's one (not embedded) body parameter."""
    if not body:
        raise validation_error([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    data = loads(body)
    try:
        return model.model_validate(data, from_attributes=True)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise validation_error([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None


class FastRoutes:
    """Answers ``POST`` to each path of ``routes`` (path -> (body model, handler)); passes every
    other request on. A handler takes the validated body and returns the JSON answer's bytes."""

    def __init__(self, app: Any, routes: Mapping[str, tuple[type[BaseModel], Handler]]) -> None:
        self.app, self.routes = app, dict(routes)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        route = None
        if scope["type"] == "http" and scope["method"] == "POST":
            route = self.routes.get(scope["path"])
        if route is None:
            await self.app(scope, receive, send)
            return
        model, handle = route
        try:
            payload = await handle(parse(await _body(receive), model))
        except ApiError as exc:
            await exc.response()(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(payload)).encode()), _JSON_HEADER],
            }
        )
        await send({"type": "http.response.body", "body": payload})


async def _body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client went away: BodyGate has read what came, as for the route
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
