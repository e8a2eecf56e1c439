"""``/healthz`` (the process answers) and ``/readyz`` (it can serve fresh dashboards).

``/readyz`` is 200 only when, in one Redis round trip (api/store.py ``readiness``):
- Redis answers;
- a read model is served: ``rm:current`` names a generation whose global hash (cursor, shared
  tail) exists;
- the leading projector's heartbeat (``rm:projector:heartbeat``, ``{"at": epoch seconds, ...}``,
  rewritten at most once a second with a TTL) is younger than
  ``READY_MAX_HEARTBEAT_AGE_SECONDS``.
Otherwise 503, with a JSON body naming the checks that failed. Both answers carry
``Cache-Control: no-store``.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from redis.exceptions import RedisError

from models.settings import RedisSettings

NO_STORE = {"Cache-Control": "no-store"}
CHECKS = ("redis", "read_model", "heartbeat")


class Alive(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str  # "ready" or "not ready"
    failed: list[str]  # the checks that failed (in CHECKS order); empty when ready
    checks: dict[str, str]  # each check: "ok", or what is wrong
    generation: int | None = None
    heartbeat_age_seconds: float | None = None


_READY_EXAMPLE = {
    "status": "ready",
    "failed": [],
    "checks": {"redis": "ok", "read_model": "ok", "heartbeat": "ok"},
    "generation": 1,
    "heartbeat_age_seconds": 0.4,
}
_NOT_READY_EXAMPLE = {
    "status": "not ready",
    "failed": ["heartbeat"],
    "checks": {
        "redis": "ok",
        "read_model": "ok",
        "heartbeat": "stale: the projector last beat 41.2 s ago (limit 30 s)",
    },
    "generation": 1,
    "heartbeat_age_seconds": 41.2,
}


def _heartbeat_age(raw: bytes, now: float) -> float | None:
    """Seconds since the beat, or None when it is not what the projector writes."""
    try:
        at = orjson.loads(raw).get("at")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if isinstance(at, bool) or not isinstance(at, int | float):
        return None
    return max(now - float(at), 0.0)  # a beat from a clock ahead of ours is fresh, not negative


async def readiness(request: Request, max_age: float) -> tuple[bool, dict[str, Any]]:
    checks = dict.fromkeys(CHECKS, "not checked: Redis is unreachable")
    body: dict[str, Any] = {"generation": None, "heartbeat_age_seconds": None}
    try:
        found = await request.app.state.store.readiness()
    except (RedisError, OSError) as exc:
        checks["redis"] = f"unreachable: {type(exc).__name__}"
    else:
        checks["redis"] = "ok"
        if found.generation is None:
            checks["read_model"] = "none: rm:current is not set (never built, or Redis lost it)"
        elif not found.generation.isdigit():
            checks["read_model"] = "unreadable: rm:current is not a generation number"
        elif not found.built:
            checks["read_model"] = "incomplete: the served generation has no global hash"
        else:
            checks["read_model"] = "ok"
            body["generation"] = int(found.generation)
        age = None if found.heartbeat is None else _heartbeat_age(found.heartbeat, time.time())
        body["heartbeat_age_seconds"] = None if age is None else round(age, 3)
        if found.heartbeat is None:
            checks["heartbeat"] = "missing: no projector has beaten lately (the key expired)"
        elif age is None:
            checks["heartbeat"] = "unreadable: the heartbeat holds no 'at' time"
        elif age > max_age:
            checks["heartbeat"] = (
                f"stale: the projector last beat {age:.1f} s ago (limit {max_age:g} s)"
            )
        else:
            checks["heartbeat"] = "ok"
    # A check Redis kept from running is not reported as failed itself: the cause is Redis.
    failed = [name for name in CHECKS if not checks[name].startswith(("ok", "not checked"))]
    return not failed, {
        "status": "not ready" if failed else "ready",
        "failed": failed,
        "checks": checks,
        **body,
    }


def install_health(app: FastAPI, conf: RedisSettings) -> None:
    max_age = conf.ready_max_heartbeat_age_seconds

    @app.get(
        "/healthz",
        tags=["operations"],
        summary="Liveness: the process answers",
        response_model=Alive,
        responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}},
    )
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"}, headers=NO_STORE)

    @app.get(
        "/readyz",
        tags=["operations"],
        summary="Readiness: Redis reachable, read model served, projector heartbeat fresh",
        response_model=Readiness,
        responses={
            200: {"content": {"application/json": {"example": _READY_EXAMPLE}}},
            503: {
                "model": Readiness,
                "description": "A check failed; `failed` names it",
                "content": {"application/json": {"example": _NOT_READY_EXAMPLE}},
            },
        },
    )
    async def readyz(request: Request) -> JSONResponse:
        ready, body = await readiness(request, max_age)
        return JSONResponse(body, status_code=200 if ready else 503, headers=NO_STORE)
