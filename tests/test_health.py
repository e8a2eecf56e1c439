"""Issue 5, operations: /healthz (the process answers) and /readyz (Redis reachable, a read model
served, the projector's heartbeat younger than READY_MAX_HEARTBEAT_AGE_SECONDS)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.main import create_app
from models import keys
from models.settings import RedisSettings
from scripts import platform_sim as p
from scripts.throwaway import RedisServer, free_port
from tests.procs import ProcGroup


def _beat(rclient: redis.Redis, age: float) -> None:
    """A heartbeat as the projector writes it, ``age`` seconds old."""
    rclient.set(keys.HEARTBEAT, orjson.dumps({"at": time.time() - age, "gen": 1}), ex=60)


def _ready(client: TestClient | httpx.Client) -> tuple[int, dict[str, Any]]:
    response = client.get("/readyz")
    assert response.headers["cache-control"] == "no-store"
    body: dict[str, Any] = response.json()
    assert body["status"] == ("ready" if response.status_code == 200 else "not ready")
    return response.status_code, body


def _wait_until(predicate: Callable[[], bool], seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.fixture
def built(engine: Engine, catch_up: Callable[[], None]) -> None:
    with engine.begin() as conn:
        uid = p.create_user(conn, "ready.user")
        p.add_event(conn, p.create_agent(conn, uid, "a"))
    catch_up()


def test_healthz_answers_even_without_redis() -> None:
    app = create_app(RedisSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    with TestClient(app) as client:
        response = client.get("/healthz")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}
        status, body = _ready(client)
    assert status == 503
    assert body["failed"] == ["redis"]
    assert body["checks"]["redis"].startswith("unreachable")


def test_readyz_follows_read_model_and_heartbeat(
    built: None, api: TestClient, rclient: redis.Redis
) -> None:
    _beat(rclient, 0.5)
    status, body = _ready(api)
    assert status == 200, body
    assert body["failed"] == []
    assert body["checks"] == {"redis": "ok", "read_model": "ok", "heartbeat": "ok"}
    assert body["generation"] == int(rclient.get(keys.CURRENT) or 0)
    assert 0 <= body["heartbeat_age_seconds"] < 30

    _beat(rclient, 31)  # the default limit is 30 s
    status, body = _ready(api)
    assert (status, body["failed"]) == (503, ["heartbeat"])
    assert body["checks"]["heartbeat"].startswith("stale")
    assert body["heartbeat_age_seconds"] > 30

    rclient.delete(keys.HEARTBEAT)  # expired: no projector beat within its TTL
    status, body = _ready(api)
    assert (status, body["failed"]) == (503, ["heartbeat"])
    assert body["checks"]["heartbeat"].startswith("missing")

    rclient.set(keys.HEARTBEAT, b"not json")
    assert _ready(api)[1]["checks"]["heartbeat"].startswith("unreadable")

    _beat(rclient, 0)
    assert _ready(api)[0] == 200

    gen = int(rclient.get(keys.CURRENT) or 0)
    global_hash = rclient.dump(keys.global_hash(gen))
    assert global_hash is not None
    rclient.delete(keys.global_hash(gen))
    status, body = _ready(api)
    assert (status, body["failed"]) == (503, ["read_model"])
    assert body["checks"]["read_model"].startswith("incomplete")
    rclient.restore(keys.global_hash(gen), 0, global_hash)

    rclient.delete(keys.CURRENT)  # Redis lost the read model
    status, body = _ready(api)
    assert (status, body["failed"]) == (503, ["read_model"])
    assert body["checks"]["read_model"].startswith("none")

    rclient.set(keys.CURRENT, gen)
    assert _ready(api)[0] == 200


def test_readyz_limit_is_a_setting(built: None, rclient: redis.Redis, redis_server: Any) -> None:
    _beat(rclient, 5)
    for limit, want in ((2.0, 503), (10.0, 200)):
        conf = RedisSettings(redis_url=redis_server.url, ready_max_heartbeat_age_seconds=limit)
        with TestClient(create_app(conf)) as client:
            assert _ready(client)[0] == want, limit


def test_readyz_of_a_real_api_follows_a_real_projector(
    procs: ProcGroup, engine: Engine, rclient: redis.Redis, redis_server: RedisServer
) -> None:
    """The projector beats while idle; frozen, its beat grows stale and /readyz says 503; thawed,
    /readyz is 200 again. Redis down and back flips it the same way."""
    with engine.begin() as conn:
        uid = p.create_user(conn, "live.user")
        p.add_event(conn, p.create_agent(conn, uid, "a"))
    procs.env["READY_MAX_HEARTBEAT_AGE_SECONDS"] = "2"
    api = procs.api()
    with httpx.Client(base_url=api.base_url, timeout=10) as http:
        status, body = _ready(http)
        assert (status, body["failed"]) == (503, ["read_model", "heartbeat"])  # nothing built

        projector = procs.projector()
        assert _wait_until(lambda: _ready(http)[0] == 200), procs.report()
        assert http.get("/v1/users/live.user/dashboard").status_code == 200

        projector.send(signal.SIGSTOP)
        try:
            assert _wait_until(lambda: _ready(http)[1]["failed"] == ["heartbeat"]), procs.report()
            assert _ready(http)[1]["checks"]["heartbeat"].startswith("stale")
        finally:
            projector.send(signal.SIGCONT)
        assert _wait_until(lambda: _ready(http)[0] == 200), procs.report()

        redis_server.stop()
        try:
            status, body = _ready(http)
            assert (status, body["failed"]) == (503, ["redis"])
            assert http.get("/healthz").status_code == 200  # alive, only not ready
        finally:
            redis_server.start()
        # Redis came back empty: the projector rebuilds, then beats again.
        assert _wait_until(lambda: _ready(http)[0] == 200), procs.report()
