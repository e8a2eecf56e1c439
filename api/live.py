"""Live updates: ``GET /v1/users/{handle}/dashboard/stream`` (Server-Sent Events) and the page
at ``/ui/{handle}`` that shows it, both fed by the change hub (api/changes.py).

The stream sends the current dashboard on connect (``event: dashboard``, ``id:`` the projection's
``generation:position``), then the dashboard again each time it changes, and a comment line
(``: heartbeat``) when nothing was sent for ``SSE_HEARTBEAT_SECONDS``. A client that reconnects,
with or without ``Last-Event-ID``, gets the current state at once. Each stream holds one flag,
not a queue: while a slow client is still being written to, further changes only set the flag,
and it gets the latest state next, never a backlog. If the handle stops naming a user (renamed
away, deleted) the stream sends ``event: gone`` and ends; while there is no read model it sends
nothing and waits (the rebuild's flip wakes it).
"""

from __future__ import annotations

import asyncio
import functools
import signal
import threading
from collections.abc import AsyncIterator, Callable
from importlib import resources
from types import FrameType
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.params import Depends as DependsParam
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api.changes import MAX_WAIT_MS, ChangeHub
from api.freshness import entity_tag
from api.store import Lookup
from models.dashboard import Problem
from models.handles import HANDLE_PATTERN, handle_key

Handle = Annotated[str, Path(pattern=HANDLE_PATTERN, examples=["hizrianraz"])]

# ?min_seq=S&wait_ms=W on the dashboard route (api/main.py): read-your-writes. Read by hand,
# and only when there is a query string: declared as FastAPI query parameters they cost every
# dashboard request ~20 us of validation, a fifth of its whole cost (measured in-process, 54 us
# without them, 72-75 us with), which took the API below 0.8 of a constant-body app's req/s.
DEFAULT_WAIT_MS = 1000
_MIN_SEQ_DOC = (
    "Wait until the user's owner_chain_height is at least this (the seq of the caller's own"
    " event), at most wait_ms; if the time runs out, the answer is marked stale"
    " (projection.stale: true, X-Projection-Stale: true)"
)
_WAIT_MS_DOC = "How long min_seq may wait, in milliseconds (ignored without min_seq)"
WAIT_PARAMETERS: dict[str, Any] = {
    "parameters": [
        {
            "name": "min_seq",
            "in": "query",
            "required": False,
            "description": _MIN_SEQ_DOC,
            "schema": {"type": "integer", "minimum": 0, "title": "Min Seq"},
        },
        {
            "name": "wait_ms",
            "in": "query",
            "required": False,
            "description": _WAIT_MS_DOC,
            "schema": {
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_WAIT_MS,
                "default": DEFAULT_WAIT_MS,
                "title": "Wait Ms",
            },
        },
    ]
}


def wait_params(request: Request) -> tuple[int | None, int]:
    """``(min_seq, wait_ms)`` from the query string; a 422 (the usual FastAPI shape) if bad."""
    if not request.scope.get("query_string"):
        return None, DEFAULT_WAIT_MS
    query = request.query_params
    min_seq = _int_param(query.get("min_seq"), "min_seq", None)
    wait_ms = _int_param(query.get("wait_ms"), "wait_ms", MAX_WAIT_MS)
    return min_seq, DEFAULT_WAIT_MS if wait_ms is None else wait_ms


def _int_param(raw: str | None, name: str, most: int | None) -> int | None:
    if raw is None:
        return None
    # ASCII digits only: int() would also take "+1", "1_000" and other scripts' digits.
    digits = raw[1:] if raw.startswith("-") else raw
    value = int(raw) if digits.isascii() and digits.isdigit() and len(raw) <= 30 else None
    if value is None:
        error = {"type": "int_parsing", "msg": "Input should be a valid integer"}
    elif value < 0:
        error = {"type": "greater_than_equal", "msg": "Input should be greater than or equal to 0"}
    elif most is not None and value > most:
        error = {"type": "less_than_equal", "msg": f"Input should be less than or equal to {most}"}
    else:
        return value
    raise RequestValidationError([{**error, "loc": ("query", name), "input": raw[:200]}])


RETRY_MS = 2000  # EventSource's reconnection delay, sent once per stream
_GONE = b'event: gone\ndata: {"detail":"no user has this handle"}\n\n'
_HEARTBEAT = b": heartbeat\n\n"
_STATIC = frozenset({"dashboard.js", "dashboard.css"})
_MEDIA = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


def mark_stale(body: bytes) -> bytes:
    """The answer with ``"stale": true`` added to its ``projection`` (the body's last object)."""
    if not body.endswith(b"}}"):
        raise ValueError("a dashboard body ends with its projection object")
    return body[:-2] + b',"stale":true}}'


def stale_response(found: Lookup) -> Response:
    """A min_seq wait that ran out: what there is, marked stale in the body and a header, with
    the freshness headers of the plain answer and the ETag of these bytes (never a 304)."""
    body = mark_stale(found.body)
    headers = {"ETag": entity_tag(body).decode(), "Cache-Control": "no-cache"}
    if found.served is not None:
        headers.update((name.decode(), value.decode()) for name, value in found.served.tail.headers)
    headers["X-Projection-Stale"] = "true"
    return Response(body, media_type="application/json", headers=headers)


def event_id(body: bytes) -> str:
    """Monotonic within a generation: the projection's ``generation:position``."""
    projection = orjson.loads(body)["projection"]
    return f"{projection['generation']}:{projection['position']}"


def frame(body: bytes) -> bytes:
    # The body is compact JSON: no raw newline can end the data line early.
    return b"id: " + event_id(body).encode() + b"\nevent: dashboard\ndata: " + body + b"\n\n"


async def _events(
    hub: ChangeHub, handle_lower: str, first: bytes, heartbeat: float
) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    # Subscribed here, not in the route: a client gone before the first byte never starts the
    # generator, and leaves no subscription behind. A new subscription reads once more at
    # once, so a change between the route's read and this point is not lost.
    sub = hub.subscribe(handle_lower, shared=True)
    try:
        yield b"retry: %d\n" % RETRY_MS + frame(first)
        last, sent_at = first, loop.time()
        while True:
            if not sub.changed.is_set():
                try:
                    async with asyncio.timeout(max(0.0, sent_at + heartbeat - loop.time())):
                        await sub.changed.wait()
                except TimeoutError:
                    yield _HEARTBEAT
                    sent_at = loop.time()
                    continue
            sub.changed.clear()
            if hub.closing:
                return  # the server is stopping; EventSource reconnects, to another process
            if sub.rebind:
                await hub.bind(sub)
            found = await hub.read(sub.handle)
            if found.status == "unknown":
                yield _GONE
                return
            if found.status == "found" and found.body != last:
                yield frame(found.body)
                last, sent_at = found.body, loop.time()
    finally:
        hub.unsubscribe(sub)


def end_streams_on_exit(hub: ChangeHub) -> Callable[[], None]:
    """Chain a handler before the server's own for SIGTERM and SIGINT that ends every stream.

    uvicorn's graceful shutdown waits for the responses in progress, and a stream never ends by
    itself: without this, a stopping API would wait for its clients for ever. Returns the undo.
    Off the main thread (a test client), signals are not ours to handle: nothing is done.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(sig: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(hub.shut_down)
        chained = previous[signal.Signals(sig)]
        if callable(chained):
            chained(sig, frame)

    for sig in previous:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, chained in previous.items():
            if chained is not None:
                signal.signal(sig, chained)

    return restore


def _unavailable(request: Request) -> Response:
    return JSONResponse(
        {"detail": "the dashboard read model is not available yet; retry shortly"},
        status_code=503,
        headers={"Retry-After": request.app.state.retry_after},
    )


def live_router(guards: list[DependsParam], auth_responses: dict[int | str, Any]) -> APIRouter:
    router = APIRouter()

    @router.get(
        "/v1/users/{handle}/dashboard/stream",
        response_class=StreamingResponse,
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": "Server-Sent Events: `dashboard` events (the dashboard's JSON),"
                " `: heartbeat` comments, `gone` when the handle stops naming a user",
            },
            404: {"model": Problem, "description": "No user has this handle"},
            422: {"description": "Malformed handle"},
            503: {"model": Problem, "description": "No read model to answer from yet"},
            **auth_responses,
        },
        dependencies=guards,
    )
    async def dashboard_stream(handle: Handle, request: Request) -> Response:
        hub: ChangeHub = request.app.state.changes
        found = await hub.read(handle_key(handle))
        if found.status == "unknown":
            return JSONResponse({"detail": "no user has this handle"}, status_code=404)
        if found.status != "found":
            return _unavailable(request)
        heartbeat: float = request.app.state.sse_heartbeat
        return StreamingResponse(
            _events(hub, handle_key(handle), found.body, heartbeat),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @router.get("/ui/{handle}", include_in_schema=False)
    async def page(handle: Handle, request: Request) -> Response:
        # The same page for every handle; its script asks the API and shows a clear message
        # for an unknown handle. The status says it too, for anything that is not a browser.
        hub: ChangeHub = request.app.state.changes
        found = await hub.read(handle_key(handle))
        html = _asset("dashboard.html")
        status = 404 if found.status == "unknown" else 200
        return Response(html, status_code=status, media_type="text/html; charset=utf-8")

    @router.get("/ui/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in _STATIC:
            return JSONResponse({"detail": "not found"}, status_code=404)
        return Response(_asset(name), media_type=_MEDIA[name[name.rfind(".") :]])

    return router


@functools.cache
def _asset(name: str) -> bytes:
    return resources.files("api").joinpath("static", name).read_bytes()
