"""Every error the API answers is JSON, whatever the request looked like.

FastAPI's defaults already answer JSON for most errors, but not all, and not for every input:
- a 422 echoes the offending input, and an input holding a lone surrogate (which an ASGI server
  may pass on from a path it decoded leniently) cannot be encoded as UTF-8, so rendering the
  422 itself failed and the client got a text/plain 500;
- an unexpected exception became Starlette's text/plain "Internal Server Error".

Here error bodies are rendered with ``ensure_ascii``, so any Python string is encodable (a lone
surrogate becomes a ``\\udxxx`` escape), and echoed inputs are cut to a bounded length, so a
64 KB path does not come back as a 64 KB error.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("api.errors")

MAX_ECHO = 200  # characters of an offending input echoed back in a 422


class ErrorJSON(JSONResponse):
    """A JSON error body that renders any string, lone surrogates included."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _echo(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_ECHO:
        return value[:MAX_ECHO] + "..."
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return _echo(str(value))


def _validation_detail(exc: RequestValidationError) -> list[dict[str, Any]]:
    detail = []
    for error in exc.errors():
        item: dict[str, Any] = {
            "type": str(error.get("type", "")),
            "loc": [_echo(part) for part in error.get("loc", ())],
            "msg": str(error.get("msg", "")),
        }
        if "input" in error:
            item["input"] = _echo(error["input"])
        detail.append(item)
    return detail


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=headers)
    return ErrorJSON({"detail": exc.detail}, status_code=exc.status_code, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return ErrorJSON({"detail": _validation_detail(exc)}, status_code=422)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    # Starlette re-raises after sending this, so the server still logs the traceback.
    log.error(
        "unexpected error answering %s %r", request.method, request.scope.get("path", "")[:MAX_ECHO]
    )
    return ErrorJSON({"detail": "internal error"}, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
