"""``uvicorn api.main:app``: the thin read API. Redis only; Postgres is never touched here."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Path, Request
from fastapi.params import Depends as DependsParam
from fastapi.responses import JSONResponse, Response

from api.cache import DashboardCache, listen
from api.changes import ChangeHub
from api.docs import DASHBOARD_DESCRIPTION, DASHBOARD_RESPONSES, access_responses
from api.errors import install_error_handlers
from api.health import install_health
from api.live import (
    WAIT_PARAMETERS,
    end_streams_on_exit,
    live_router,
    stale_response,
    wait_params,
)
from api.metrics import install_metrics
from api.store import DashboardStore
from models.dashboard import Dashboard
from models.handles import HANDLE_PATTERN, handle_key
from models.settings import RedisSettings, get_redis_settings

Handle = Annotated[str, Path(pattern=HANDLE_PATTERN, examples=["hizrianraz"])]
# Redis connections per API process; more requests than this queue for one. Under 500
# connections on 2 busy cores some waited over 2 s (answered 503), so the wait is long: an
# overloaded API answers late rather than wrongly.
REDIS_POOL_SIZE = 128
POOL_WAIT_SECONDS = 10


def _access_control(conf: RedisSettings) -> tuple[list[DependsParam], dict[int | str, Any]]:
    """The route's dependencies and extra documented answers: none while auth is off."""
    if not conf.jwt_enabled:
        return [], {}
    from api.auth import OwnerAccess  # PyJWT is imported only when access control is on

    challenge = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return [Depends(OwnerAccess(conf))], access_responses(challenge)


def create_app(settings: RedisSettings | None = None) -> FastAPI:
    conf = settings or get_redis_settings()
    guards, auth_responses = _access_control(conf)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A blocking pool: a burst of cache misses (every invalidation sends all requests in
        # flight to Redis at once) waits for a connection instead of failing. redis-py's default
        # pool raises once 100 are in use, which answered 503 to most of 500 connections.
        pool = aioredis.BlockingConnectionPool.from_url(
            conf.redis_url,
            max_connections=REDIS_POOL_SIZE,
            timeout=POOL_WAIT_SECONDS,
            socket_timeout=2,
            socket_connect_timeout=2,
            retry_on_timeout=False,
        )
        client = aioredis.Redis(connection_pool=pool)
        cache = DashboardCache()
        app.state.store = DashboardStore(client, cache)
        app.state.retry_after = str(conf.retry_after_seconds)
        # Live updates and ?min_seq= waits, woken by the cache's invalidation feed (no second
        # connection): api/changes.py.
        app.state.changes = ChangeHub(
            client, app.state.store, cache, conf.sse_shared_refresh_seconds
        )
        app.state.sse_heartbeat = conf.sse_heartbeat_seconds
        restore_signals = end_streams_on_exit(app.state.changes)
        feed = asyncio.create_task(listen(conf.redis_url, cache), name="cache-invalidation")
        # Objects made at start-up live for ever; freezing them keeps the collector from
        # walking them on every collection, which showed as tens of ms of p99 latency.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            feed.cancel()
            app.state.changes.close()
            restore_signals()
            with contextlib.suppress(asyncio.CancelledError):
                await feed
            await client.aclose()
            await pool.disconnect()  # a pool passed in is not closed by the client

    # No redirect to the slashed or unslashed twin of a path: an unknown path is a JSON 404.
    app = FastAPI(
        title="Audit-chain dashboards", version="0.1.0", lifespan=lifespan, redirect_slashes=False
    )
    install_error_handlers(app)

    @app.get(
        "/v1/users/{handle}/dashboard",
        response_model=Dashboard,
        description=DASHBOARD_DESCRIPTION,
        responses={**DASHBOARD_RESPONSES, **auth_responses},
        dependencies=guards,
        openapi_extra=WAIT_PARAMETERS,
    )
    async def dashboard(handle: Handle, request: Request) -> Response:
        min_seq, wait_ms = wait_params(request)
        store: DashboardStore = request.app.state.store
        stale = False
        try:
            if min_seq is None:
                found = await store.dashboard(handle_key(handle))
            else:
                hub: ChangeHub = request.app.state.changes
                found, stale = await hub.wait_for_height(handle_key(handle), min_seq, wait_ms)
        except aioredis.RedisError:
            found = None
        if found is not None and found.status == "found" and stale:
            return stale_response(found)
        if found is not None and found.status == "found":
            # 200 with ETag and X-Projection-* headers, or 304 when If-None-Match names it
            return found.response(request.headers.get("if-none-match"))
        if found is not None and found.status == "unknown":
            return JSONResponse({"detail": "no user has this handle"}, status_code=404)
        return JSONResponse(
            {"detail": "the dashboard read model is not available yet; retry shortly"},
            status_code=503,
            headers={"Retry-After": request.app.state.retry_after},
        )

    # Routes are matched in order: the others go after the dashboard, so that a dashboard
    # request is not first tried against each of them (measured: ~1.7 us a route tried).
    app.include_router(live_router(guards, auth_responses))
    install_metrics(app)  # its own registry: GET /metrics, and a pure ASGI middleware
    install_health(app, conf)  # GET /healthz, GET /readyz
    return app


@functools.cache
def _default_app() -> FastAPI:
    return create_app()


def __getattr__(name: str) -> FastAPI:
    # ``uvicorn api.main:app`` builds the app from the environment on first access, so that
    # importing this module reads no settings (and a test's create_app(settings) reads none).
    if name == "app":
        return _default_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
