"""Issue 5, operations: the API's Prometheus metrics at /metrics, scraped from a real uvicorn
process and parsed with prometheus_client's own parser, checked against the requests made."""

from __future__ import annotations

import random
import string
import time
from collections.abc import Callable

import httpx
import prometheus_client
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from api.main import create_app
from models.settings import RedisSettings
from scripts import platform_sim as p
from scripts.throwaway import RedisServer, free_port
from tests.procs import ProcGroup

ROUTE = "/v1/users/{handle}/dashboard"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(http: httpx.Client | TestClient) -> Samples:
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def requests(samples: Samples, route: str, status: int, method: str = "GET") -> float:
    return value(
        samples, "dashboard_api_requests_total", route=route, method=method, status=str(status)
    )


def _wait_until(predicate: Callable[[], bool], seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def built(engine: Engine, catch_up: Callable[[], None]) -> None:
    with engine.begin() as conn:
        uid = p.create_user(conn, "counted")
        p.add_event(conn, p.create_agent(conn, uid, "a"))
    catch_up()


def test_counters_match_the_requests_made(built: None, procs: ProcGroup) -> None:
    api = procs.api()
    with httpx.Client(base_url=api.base_url, timeout=10) as http:
        assert _wait_until(
            lambda: value(scrape(http), "dashboard_api_invalidation_feed_live") == 1.0
        )
        before = scrape(http)
        etag = ""
        for _ in range(3):
            ok = http.get(ROUTE.format(handle="counted"))
            assert ok.status_code == 200
            etag = ok.headers["etag"]
        assert (
            http.get(ROUTE.format(handle="Counted"), headers={"If-None-Match": etag}).status_code
            == 304
        )
        for handle in ("nobody", "no-one"):
            assert http.get(ROUTE.format(handle=handle)).status_code == 404
        assert http.get(ROUTE.format(handle="-bad")).status_code == 422
        assert http.post(ROUTE.format(handle="counted")).status_code == 405
        for path in ("/nope", "/v1/users/counted/dashboard/extra", "/v1/users/a%2Fb/dashboard"):
            assert http.get(path).status_code == 404
        assert http.get("/healthz").status_code == 200
        after = scrape(http)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    def delta_requests(route: str, status: int, method: str = "GET") -> float:
        return requests(after, route, status, method) - requests(before, route, status, method)

    assert delta_requests(ROUTE, 200) == 3
    assert delta_requests(ROUTE, 304) == 1
    assert delta_requests(ROUTE, 404) == 2
    assert delta_requests(ROUTE, 422) == 1
    assert delta_requests(ROUTE, 405, "POST") == 1
    assert delta_requests("unmatched", 404) == 3
    assert delta_requests("/healthz", 200) == 1
    assert delta_requests("/metrics", 200) == 1  # the first scrape (the second is still running)
    # Every request timed: the histogram's count per route equals the requests counted.
    assert delta("dashboard_api_request_duration_seconds_count", route=ROUTE) == 8
    assert delta("dashboard_api_request_duration_seconds_bucket", route=ROUTE, le="+Inf") == 8
    assert delta("dashboard_api_request_duration_seconds_sum", route=ROUTE) > 0
    # The 200s, the 304 and the 404s reached the store; the 422 and the 405 did not. Once one
    # answer is in memory, the others come from it: one miss per handle, hits for the rest.
    hits = delta("dashboard_api_cache_hits_total")
    misses = delta("dashboard_api_cache_misses_total")
    assert hits + misses == 6
    assert misses == 3  # "counted" once, and the two unknown handles
    assert value(after, "dashboard_api_cache_entries") == 1
    assert value(after, "dashboard_api_redis_errors_total") == 0
    assert value(after, "dashboard_api_invalidation_feed_reconnects_total") == 0
    assert value(after, "process_resident_memory_bytes") > 1_000_000  # the API's own RSS
    # Raw paths never become label values.
    routes = {dict(labels).get("route") for _, labels in after}
    assert not any("nope" in (r or "") or "counted" in (r or "") for r in routes)


def test_label_cardinality_stays_bounded_under_fuzzing(api: TestClient) -> None:
    rng = random.Random(5)
    alphabet = string.ascii_letters + string.digits + "-._~%"
    for _ in range(300):
        path = "/" + "/".join(
            "".join(rng.choices(alphabet, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 5))
        )
        api.get(path)
        api.get(f"/v1/users/{path.strip('/').replace('/', '')[:30]}/dashboard")
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        api.request(method, "/v1/users/x/dashboard")
    samples = scrape(api)
    series = [dict(labels) for name, labels in samples if name == "dashboard_api_requests_total"]
    routes = {s["route"] for s in series}
    assert routes <= {ROUTE, "unmatched", "/metrics"}, routes
    assert len(series) <= 12, series  # a handful of (route, method, status), not 600 paths
    assert sum(requests(samples, s["route"], int(s["status"]), s["method"]) for s in series) == 604


def test_redis_errors_are_counted() -> None:
    app = create_app(RedisSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    with TestClient(app) as client:
        for _ in range(2):
            assert client.get(ROUTE.format(handle="someone")).status_code == 503
        assert client.get("/readyz").status_code == 503
        samples = scrape(client)
    assert value(samples, "dashboard_api_redis_errors_total") == 3
    assert value(samples, "dashboard_api_cache_misses_total") == 2
    assert requests(samples, ROUTE, 503) == 2
    assert value(samples, "dashboard_api_invalidation_feed_live") == 0


def test_feed_reconnects_are_counted(
    built: None, procs: ProcGroup, redis_server: RedisServer, rclient: redis.Redis
) -> None:
    api = procs.api()
    with httpx.Client(base_url=api.base_url, timeout=10) as http:
        assert _wait_until(
            lambda: value(scrape(http), "dashboard_api_invalidation_feed_live") == 1.0
        )
        assert value(scrape(http), "dashboard_api_invalidation_feed_reconnects_total") == 0
        redis_server.stop()
        try:
            assert _wait_until(
                lambda: value(scrape(http), "dashboard_api_invalidation_feed_live") == 0.0
            )
            assert http.get(ROUTE.format(handle="counted")).status_code == 503
        finally:
            redis_server.start()
        assert _wait_until(
            lambda: value(scrape(http), "dashboard_api_invalidation_feed_live") == 1.0
        )
        samples = scrape(http)
    assert value(samples, "dashboard_api_invalidation_feed_reconnects_total") == 1
    assert value(samples, "dashboard_api_redis_errors_total") >= 1
    assert requests(samples, ROUTE, 503) == 1


def test_each_app_has_its_own_registry(redis_server: RedisServer) -> None:
    """No global side effect: nothing lands in prometheus_client's default registry, and two
    apps in one process count apart."""
    apps = [create_app(RedisSettings(redis_url=redis_server.url)) for _ in range(2)]
    with TestClient(apps[0]) as first, TestClient(apps[1]) as second:
        first.get("/healthz")
        first.get("/healthz")
        second.get("/healthz")
        assert requests(scrape(first), "/healthz", 200) == 2
        assert requests(scrape(second), "/healthz", 200) == 1
    default = prometheus_client.REGISTRY
    assert default.get_sample_value("dashboard_api_cache_hits_total") is None
    assert not any(m.name.startswith("dashboard_api") for m in default.collect())
