"""Issue 5, freshness: X-Projection-* headers, a strong ETag, If-None-Match -> 304, Cache-Control,
and the route's answers as OpenAPI documents them.

The HTTP round trips run against a real ``uvicorn api.main:app`` process with httpx, fed by the
real projector; the parsing and comparison rules are also checked on their own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.cache import DashboardCache
from api.freshness import header_name, none_match, parse_tail
from api.main import create_app
from models import keys
from models.settings import RedisSettings
from projector.records import Cursor, Position
from projector.render import render_tail
from scripts import platform_sim as p
from tests.procs import ProcGroup

ROUTE = "/v1/users/{handle}/dashboard"
SECRET = "s3cret-for-tests-only-0123456789abcdef"


def _projection_headers(projection: dict[str, Any]) -> dict[str, str]:
    """What the headers must say: one per non-null member, as its JSON scalar reads."""
    want = {}
    for member, value in projection.items():
        if value is None:
            continue
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        want[header_name(member).lower()] = text
    return want


def _sent_projection_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("x-projection-")}


# --- the rules on their own --------------------------------------------------------------------


def test_tail_parsed_generically_into_headers() -> None:
    cursor = Cursor(Position(88412, 1000187), Position(88412, 17))
    at = datetime(2026, 12, 4, 18, 20, 11, 509000, tzinfo=UTC)
    tail = parse_tail(render_tail(3, cursor, 1000187, committed_at=at))
    assert tail.ok and tail.projection is not None
    assert tail.projection["generation"] == 3
    headers = {k.decode(): v.decode() for k, v in tail.headers}
    assert headers == _projection_headers(tail.projection)
    assert headers["x-projection-position"] == "88412:1000187"
    assert headers["x-projection-committed-at"].startswith("2026-12-04T18:20:11.509")
    # A null member sends no header; a member the projector adds later gets one.
    without = parse_tail(render_tail(3, cursor, 5))
    assert "x-projection-committed-at" not in {k.decode() for k, _ in without.headers}
    grown = parse_tail(b',"global_chain_height":1},"projection":{"generation":1,"stale":true}}')
    assert dict(grown.headers)[b"x-projection-stale"] == b"true"
    for garbage in (b"}", b"", b"TAIL", b',"global_chain_height":1},"projection":[1]}'):
        assert not parse_tail(garbage).ok


@pytest.mark.parametrize(
    ("header", "matches"),
    [
        ('"abc"', True),
        ('W/"abc"', True),  # weak comparison, as RFC 9110 asks for If-None-Match
        ('"x", "abc"', True),
        ('"x",W/"abc" , "y"', True),
        ("*", True),
        (" * ", True),
        ('"abcd"', False),
        ('"xabc"', False),
        ("abc", False),  # not an entity-tag
        ('"ab"c"', False),
        ("", False),
        ('"x", *', False),  # "*" is only valid alone
    ],
)
def test_if_none_match_comparison(header: str, matches: bool) -> None:
    assert none_match(header, b'"abc"') is matches


def test_an_answer_is_built_once_per_document_and_tail() -> None:
    """Bytes, ETag and headers are made on the first hit after a change, then reused as they are;
    a new tail is parsed once, however many users' answers it ends."""
    cache = DashboardCache()
    cache.attach(lambda: 0)
    doc = b'{"handle":"alice","chain_meta":{"owner_chain_height":1'
    cursor = Cursor(Position(10, 5), Position(10, 1))
    cache.put(cache.epoch, "alice", 3, 7, doc, render_tail(3, cursor, 5))
    first = cache.served("alice")
    assert first is not None and cache.served("alice") is first
    assert first.response().headers["etag"] == first.etag.decode()
    cache.invalidate([keys.global_hash(3).encode()])  # the shared tail changed
    assert cache.served("alice") is None
    cache.put(cache.epoch, "bob", 3, 8, doc.replace(b"alice", b"bob"), render_tail(3, cursor, 6))
    second = cache.served("alice")
    assert second is not None and second is not first
    assert second.etag != first.etag
    assert cache.served("alice") is second
    bob = cache.served("bob")
    assert bob is not None and bob.tail is second.tail  # one parse for both


# --- a real server -----------------------------------------------------------------------------


@pytest.fixture
def user_agent(engine: Engine, catch_up: Callable[[], None]) -> int:
    with engine.begin() as conn:
        uid = p.create_user(conn, "fresh.one", "Fresh One")
        agent = p.create_agent(conn, uid, "agent-a")
        p.add_event(conn, agent)
        other = p.create_user(conn, "someone-else")
        p.create_agent(conn, other, "agent-b")
    catch_up()
    return agent


def test_etag_and_304_round_trip_over_http(
    user_agent: int, engine: Engine, catch_up: Callable[[], None], procs: ProcGroup
) -> None:
    api = procs.api()
    url = ROUTE.format(handle="Fresh.One")
    with httpx.Client(base_url=api.base_url, timeout=10) as http:
        first = http.get(url)
        assert first.status_code == 200
        etag = first.headers["etag"]
        assert etag == '"' + hashlib.blake2b(first.content, digest_size=16).hexdigest() + '"'
        assert first.headers["cache-control"] == "no-cache"
        assert first.headers["content-type"] == "application/json"
        projection = first.json()["projection"]
        assert _sent_projection_headers(first) == _projection_headers(projection)
        assert set(_sent_projection_headers(first)) >= {
            "x-projection-generation",
            "x-projection-position",
            "x-projection-applied-at",
        }

        # The same bytes again (now from the API's memory): the same validator and headers.
        again = http.get(url)
        assert again.content == first.content
        assert again.headers["etag"] == etag
        assert _sent_projection_headers(again) == _sent_projection_headers(first)

        for header in (etag, f'"nope", W/{etag}', "*", f"{etag}, {etag}"):
            not_modified = http.get(url, headers={"If-None-Match": header})
            assert not_modified.status_code == 304, header
            assert not_modified.content == b""
            assert not_modified.headers["etag"] == etag
            assert not_modified.headers["cache-control"] == "no-cache"
            assert _sent_projection_headers(not_modified) == _sent_projection_headers(first)
        for header in ('"nope"', etag[:-2] + '"', etag.strip('"')):
            assert http.get(url, headers={"If-None-Match": header}).status_code == 200, header

        # The user's dashboard changes: the old validator no longer matches.
        with engine.begin() as conn:
            _, seq = p.add_event(conn, user_agent)
        catch_up()
        changed = http.get(url, headers={"If-None-Match": etag})
        assert changed.status_code == 200
        assert changed.json()["recent_events"][0]["seq"] == seq
        new_etag = changed.headers["etag"]
        assert new_etag != etag
        assert _sent_projection_headers(changed) == _projection_headers(
            changed.json()["projection"]
        )
        assert changed.headers["x-projection-position"] != first.headers["x-projection-position"]
        # A live batch knows its commit time (the throwaway Postgres tracks commit timestamps;
        # the first answer came from a rebuild, which does not).
        assert changed.json()["projection"]["committed_at"] is not None
        assert "x-projection-committed-at" in changed.headers
        assert http.get(url, headers={"If-None-Match": new_etag}).status_code == 304

        # Errors carry no validator.
        for missing in (ROUTE.format(handle="nobody"), ROUTE.format(handle="-bad")):
            error = http.get(missing, headers={"If-None-Match": "*"})
            assert error.status_code in (404, 422)
            assert "etag" not in error.headers


def test_a_change_elsewhere_changes_the_bytes_and_so_the_etag(
    user_agent: int, engine: Engine, catch_up: Callable[[], None], procs: ProcGroup
) -> None:
    """The shared tail (global height, position) is part of every answer: a strong ETag follows
    the bytes, so another user's event changes it too, and the headers follow the new tail."""
    api = procs.api()
    url = ROUTE.format(handle="fresh.one")
    with httpx.Client(base_url=api.base_url, timeout=10) as http:
        before = http.get(url)
        with engine.begin() as conn:
            other = p.create_user(conn, "third")
            p.add_event(conn, p.create_agent(conn, other, "c"))
        catch_up()
        after = http.get(url, headers={"If-None-Match": before.headers["etag"]})
    assert after.status_code == 200
    assert after.json()["recent_events"] == before.json()["recent_events"]
    assert (
        after.json()["chain_meta"]["global_chain_height"]
        > (before.json()["chain_meta"]["global_chain_height"])
    )
    assert after.headers["etag"] != before.headers["etag"]
    assert _sent_projection_headers(after) == _projection_headers(after.json()["projection"])


# --- OpenAPI -----------------------------------------------------------------------------------


def _operation(schema: dict[str, Any]) -> dict[str, Any]:
    operation: dict[str, Any] = schema["paths"][ROUTE]["get"]
    return operation


def _example_of(response: dict[str, Any]) -> Any:
    return response["content"]["application/json"]["example"]


def test_openapi_documents_answers_headers_and_examples(api: TestClient) -> None:
    schema = api.get("/openapi.json").json()
    responses = _operation(schema)["responses"]
    assert {"200", "304", "404", "422", "503"} <= set(responses)
    assert "401" not in responses and "403" not in responses  # access control is off
    ok = responses["200"]
    assert ok["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Dashboard"}
    for answer in ("200", "304"):
        headers = responses[answer]["headers"]
        assert {
            "ETag",
            "Cache-Control",
            "X-Projection-Generation",
            "X-Projection-Position",
            "X-Projection-Applied-At",
            "X-Projection-Committed-At",
        } <= set(headers)
        assert headers["ETag"]["required"] and not headers["X-Projection-Committed-At"]["required"]
    assert "content" not in responses["304"]  # no body
    assert "If-None-Match" in _operation(schema)["description"]
    assert _example_of(responses["404"]) == {"detail": "no user has this handle"}
    assert _example_of(responses["422"])["detail"][0]["loc"] == ["path", "handle"]
    assert "Retry-After" in responses["503"]["headers"]
    assert _example_of(responses["503"])["detail"]
    dashboard = schema["components"]["schemas"]["Dashboard"]
    assert dashboard["examples"][0]["handle"] == "hizrianraz"
    assert "committed_at" in schema["components"]["schemas"]["Projection"]["properties"]
    for path in ("/healthz", "/readyz", "/metrics"):
        assert "get" in schema["paths"][path], path
    assert "503" in schema["paths"]["/readyz"]["get"]["responses"]
    assert api.get("/docs").status_code == 200


def test_openapi_documents_401_and_403_when_access_control_is_on(redis_server: Any) -> None:
    app = create_app(RedisSettings(redis_url=redis_server.url, dashboard_jwt_key=SECRET))
    responses = _operation(app.openapi())["responses"]
    for status, detail in (("401", "the token has expired"), ("403", "own dashboard")):
        assert detail in _example_of(responses[status])["detail"]
        assert "WWW-Authenticate" in responses[status]["headers"]
    assert {"200", "304", "404", "422", "503"} <= set(responses)
