"""The front door of `distill serve`'s prediction route: an ASGI middleware that answers a body that is not
multipart/form-data (415), one over the size limit (413) or one that cannot be parsed (400) with a one-line JSON
`detail`, before anything is parsed or queued; the other routes pass through."""
from __future__ import annotations

import json
from typing import Any, Callable, Optional

from starlette.datastructures import Headers
from starlette.formparsers import MultiPartParser

from distill.common.errors import first_line

__all__ = ["FIELD", "RequestGate"]

FIELD = "image"  # the multipart file field a request carries its image in


class RequestGate:
    """ASGI middleware in front of the prediction route: a 415 for a body that is not multipart/form-data, a
    413 for one over `max_bytes` (counted as it arrives, whatever Content-Length claims), before anything is
    parsed or queued. The other routes (/health, /info) pass through."""

    def __init__(self, app: Any, path: str = "/predict", max_bytes: int = 16 << 20) -> None:
        self.app, self.path, self.max_bytes = app, path, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":  # as the parser downstream matches it: lower case, its parameters kept
            scope = {**scope, "headers": [(k, b"multipart/form-data" + (v[v.index(b";"):] if b";" in v else b""))
                                          if k.lower() == b"content-type" else (k, v) for k, v in scope["headers"]]}
        if kind != "multipart/form-data":
            return await _reply(send, 415, f"expected Content-Type multipart/form-data with a file field '{FIELD}', "
                                           f"got '{kind or 'none'}' (curl -F {FIELD}=@picture.png URL)")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _reply(send, 413, f"body of {int(declared)} bytes, over the limit of {self.max_bytes}")
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await _reply(send, 413, f"body over the limit of {self.max_bytes} bytes")
        problem = await _malformed(scope, bytes(body))
        if problem:
            return await _reply(send, 400, f"malformed multipart/form-data body: {problem}")
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)


async def _malformed(scope: dict, body: bytes) -> Optional[str]:
    """Why a multipart body cannot be parsed (no boundary, a boundary that is not in it, garbage), or None: parsed
    here once, the same way LitServe parses it, so that a bad body is a 400 and not the parser's error as a 500."""
    async def stream() -> Any:
        yield body

    try:
        form = await MultiPartParser(Headers(raw=scope["headers"]), stream()).parse()
    except Exception as err:  # noqa: BLE001 - python-multipart and starlette raise several kinds for a bad body
        return first_line(err, 120, typed=True)
    await form.close()
    return None


async def _reply(send: Callable, status: int, detail: str) -> None:
    payload = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
