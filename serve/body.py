"""The request body before any route sees it: size cap, content type, content coding.

A pure ASGI middleware, so a refused body costs no route work:

- **size**: a ``Content-Length`` over the cap, or a chunked body that grows past it (also after
  decompression), gets 413;
- **type**: JSON is taken with ``application/json`` (or ``*/*+json``), with no ``Content-Type``
  at all (Triton's HTTP client) and with ``application/x-www-form-urlencoded`` (what
  ``curl -d`` sends by default; the body is still read as JSON, never as a form). A ``/infer``
  request carrying ``Inference-Header-Content-Length`` (the binary tensor data extension) may
  also be ``application/octet-stream``. Anything else gets 415 naming the accepted types;
- **coding**: ``Content-Encoding: gzip`` or ``deflate`` (Triton's client compresses requests so)
  is undone here; another coding gets 415.

The route then sees the plain body with ``Content-Type: application/json`` (binary inference
requests keep theirs).
"""

from __future__ import annotations

import zlib
from typing import Any

from starlette.datastructures import Headers

from recforge.serve.errors import ApiError

BINARY_HEADER = "inference-header-content-length"
JSON_TYPES = ("", "application/json", "application/x-www-form-urlencoded")
ACCEPTED = (
    "application/json (or any application/*+json), no Content-Type, "
    "application/x-www-form-urlencoded (read as JSON, as curl -d sends it); "
    "on /infer with Inference-Header-Content-Length also application/octet-stream"
)
_WBITS = {"gzip": 31, "deflate": 15, "x-gzip": 31}


class BodyGate:
    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        try:
            scope, body = await self._read(scope, receive)
        except ApiError as exc:
            await exc.response()(scope, receive, send)
            return
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, scope: dict, receive: Any) -> tuple[dict, bytes]:
        headers = Headers(scope=scope)
        media = (headers.get("content-type") or "").split(";")[0].strip().lower()
        binary = BINARY_HEADER in headers and scope["path"].endswith("/infer")
        is_json = media in JSON_TYPES or (
            media.startswith("application/") and media.endswith("+json")
        )
        if not (is_json or (binary and media == "application/octet-stream")):
            raise ApiError(415, f"Content-Type {media!r} is not accepted; send {ACCEPTED}")
        coding = (headers.get("content-encoding") or "identity").strip().lower()
        if coding not in ("identity", *_WBITS):
            raise ApiError(
                415, f"Content-Encoding {coding!r} is not accepted; send identity, gzip or deflate"
            )
        too_large = ApiError(413, f"request body over {self.max_body_bytes} bytes")
        length = headers.get("content-length")
        if length is not None and (
            not (length.isascii() and length.isdigit()) or int(length) > self.max_body_bytes
        ):
            raise too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if coding in _WBITS:
            inflate = zlib.decompressobj(_WBITS[coding])
            try:
                body = inflate.decompress(body, self.max_body_bytes + 1)
            except zlib.error as exc:
                raise ApiError(400, f"the body is not valid {coding}: {exc}") from None
            if len(body) > self.max_body_bytes or inflate.unconsumed_tail:
                raise too_large
        kept = [
            (k, v)
            for k, v in scope["headers"]
            if k not in (b"content-type", b"content-length", b"content-encoding")
        ]
        kind = b"application/octet-stream" if binary and not is_json else b"application/json"
        kept += [(b"content-type", kind), (b"content-length", str(len(body)).encode())]
        return {**scope, "headers": kept}, body
