"""One error shape for every 4xx (and the 503 of overload) of `recforge serve`
(docs/architecture.md §10).

Every error answer, on every route (``/v1``, ``/v2`` and an unknown path alike), is::

    {"error": "<message for a person>", "code": "<stable machine code>", "field": "<path>" | null}

``error`` is a string, as the Open Inference Protocol (KServe v2) requires, so Triton's clients
show the message as is; ``code`` tells error kinds apart without parsing messages; ``field`` is the
dotted path of the offending part of the body (``k``, ``requests.0.history.2``,
``inputs.1.shape``) when one field is to blame, else null.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

CODES = {
    400: ("malformed_body", "The body is not JSON (or not a well-framed binary request)."),
    404: ("not_found", "No such route, model, model version or user."),
    405: ("method_not_allowed", "The route does not take this method."),
    409: ("reload_refused", "The new model could not be loaded; the old one is still served."),
    413: ("body_too_large", "The request body is over the server's limit."),
    415: ("unsupported_media_type", "The body's Content-Type or Content-Encoding is not accepted."),
    422: ("invalid_request", "The body is JSON but not a valid request."),
    503: (
        "overloaded",
        "Too many requests in flight (--max-concurrency); retry after Retry-After seconds.",
    ),
}
# Headers an error status always carries, as documented in the OpenAPI responses.
HEADERS = {
    503: {
        "Retry-After": {
            "description": "seconds to wait before retrying",
            "schema": {"type": "string"},
            "required": True,
        }
    }
}


class ErrorBody(BaseModel):
    """The answer of every 4xx and of a 503 (overloaded)."""

    error: str = Field(..., description="what went wrong, for a person")
    code: str = Field(
        ...,
        description="machine-readable kind: "
        + ", ".join(sorted({c for c, _ in CODES.values()}))
        + ", unknown_model, unknown_user",
    )
    field: str | None = Field(None, description="dotted path of the offending body field, if one")


class ApiError(Exception):
    """An answer with a 4xx (or 503) status in the shape of :class:`ErrorBody`."""

    def __init__(
        self, status: int, message: str, code: str | None = None, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field
        self.code = code or CODES.get(status, ("error", ""))[0]
        self.headers: dict[str, str] | None = None

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": self.message, "code": self.code, "field": self.field},
            status_code=self.status,
            headers=self.headers,
        )


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status with the shared error schema."""
    return {
        s: {
            "model": ErrorBody,
            "description": CODES[s][1],
            **({"headers": HEADERS[s]} if s in HEADERS else {}),
        }
        for s in statuses
    }


# Pydantic's names of union members in an error location: not part of the body's path.
_TYPE_TAGS = {"int", "str", "float", "bool", "none", "dict", "list", "function-after"}


def _path(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or None


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """Pydantic's error list -> one ApiError: 400 if the body is not JSON at all, else 422 naming
    the first problem (and how many more there are)."""
    if not errors:
        return ApiError(422, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", first.get("msg", ""))
        return ApiError(400, f"the body is not valid JSON: {reason}")
    field = _path(tuple(first.get("loc", ())))
    message = f"{field or 'body'}: {first.get('msg', 'invalid')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return ApiError(422, message, field=field)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404 and exc.detail == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        else:
            message = str(exc.detail)
        error = ApiError(status, message)
        error.headers = dict(exc.headers) if exc.headers else None
        return error.response()
