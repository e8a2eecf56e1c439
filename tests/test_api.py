"""The read API's answers other than a found dashboard: 404, 422, 503."""

from __future__ import annotations

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.main import create_app
from models.dashboard import Dashboard
from models.settings import RedisSettings
from scripts import platform_sim as p
from scripts.throwaway import free_port


def test_never_built_answers_503_with_retry_after(api: TestClient) -> None:
    response = api.get("/v1/users/hizrianraz/dashboard")
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert "detail" in response.json()


def test_redis_unreachable_answers_503() -> None:
    app = create_app(RedisSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    with TestClient(app) as client:
        response = client.get("/v1/users/hizrianraz/dashboard")
    assert response.status_code == 503
    assert response.headers["Retry-After"]


@pytest.mark.parametrize(
    "handle", ["-leading-dash", "a" * 40, "has space", "semi;colon", "_under", "ünï"]
)
def test_malformed_handle_is_422(api: TestClient, handle: str) -> None:
    assert api.get(f"/v1/users/{handle}/dashboard").status_code == 422


def test_unknown_handle_is_404_once_built(engine: Engine, catch_up, api: TestClient) -> None:
    with engine.begin() as conn:
        p.create_user(conn, "someone")
    catch_up()
    assert api.get("/v1/users/someone/dashboard").status_code == 200
    response = api.get("/v1/users/no-one-here/dashboard")
    assert response.status_code == 404
    assert response.json()["detail"]


def test_answer_matches_the_published_schema_and_payloads_never_enter_redis(
    engine: Engine, catch_up, api: TestClient, rclient: redis.Redis
) -> None:
    with engine.begin() as conn:
        uid = p.create_user(conn, "schema.check", None)
        agent = p.create_agent(conn, uid, "a")
        p.add_event(conn, agent, model=None, provider=None, payload='{"secret": "do-not-leak"}')
    catch_up()
    values: list[bytes] = []
    for key in rclient.scan_iter():
        kind = rclient.type(key)
        if kind == b"string":
            values.append(rclient.get(key) or b"")
        elif kind == b"hash":
            values.extend(rclient.hvals(key))
        elif kind == b"set":
            values.extend(rclient.smembers(key))
    assert any(b"schema.check" in v for v in values)  # the scan does see the user's data
    assert not any(b"do-not-leak" in v for v in values)
    response = api.get("/v1/users/Schema.Check/dashboard")
    assert response.headers["content-type"] == "application/json"
    body = Dashboard.model_validate_json(response.content)
    assert body.recent_events[0].model is None
    assert body.recent_events[0].created_at.utcoffset() is not None
    assert "payload" not in response.text
