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
from fastapi import APIRouter, Path, Query, Request
from fastapi.params import Depends as DependsParam
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api.changes import MAX_WAIT_MS, ChangeHub
from api.freshness import entity_tag
from api.store import Lookup
from models.dashboard import Problem
from models.handles import HANDLE_PATTERN, handle_key

Handle = Annotated[str, Path(pattern=HANDLE_PATTERN, examples=["hizrianraz"])]

# ?min_seq=S&wait_ms=W on the dashboard route (api/main.py): read-your-writes.
DEFAULT_WAIT_MS = 1000
MinSeq = Annotated[
    int | None,
    Query(
        ge=0,
        description="Wait until the user's owner_chain_height is at least this (the seq of the"
        " caller's own event), at most wait_ms; if the time runs out, the answer is marked"
        " stale (projection.stale: true, X-Projection-Stale: true)",
    ),
]
WaitMs = Annotated[
    int,
    Query(
        ge=0,
        le=MAX_WAIT_MS,
        description="How long min_seq may wait, in milliseconds (ignored without min_seq)",
    ),
]

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
