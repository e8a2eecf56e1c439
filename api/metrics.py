"""Prometheus metrics of the API, served at ``/metrics`` (prometheus-client).

- ``dashboard_api_requests_total{route,method,status}``: every answer, labelled by the route's
  template (``/v1/users/{handle}/dashboard``), never the raw path: a fuzzer's million paths all
  land in ``route="unmatched"``. Methods outside the standard ones are ``OTHER``.
- ``dashboard_api_request_duration_seconds{route}``: time until the answer was sent.
- ``dashboard_api_cache_hits_total`` / ``..._cache_misses_total``: dashboards answered from the
  in-process cache, and those that needed a Redis read.
- ``dashboard_api_redis_errors_total``: Redis calls that failed (answered 503).
- ``dashboard_api_invalidation_feed_reconnects_total``: times the cache's invalidation feed came
  back after the first connection; ``..._feed_live`` whether it is up now;
  ``..._cache_entries`` the dashboards held in memory.
- ``process_*``: the process's resident memory, CPU seconds, open file descriptors.

Each app gets its own registry (made by ``install_metrics`` in ``create_app``; nothing at import,
and never the process-global default registry). The request middleware is plain ASGI, and the
counts and timings are plain numbers in dicts, made into metric families only when Prometheus
scrapes: a request costs two clock reads, two dict lookups and a bisection. The cache and Redis
figures are plain integers on the store, read at scrape time too.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable
from itertools import accumulate
from typing import Any

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector
from prometheus_client import generate_latest as _render
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

NAMESPACE = "dashboard_api"
UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Seconds; the cached answer takes well under a millisecond, a Redis read about one.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_LE = (*(repr(bound) for bound in BUCKETS), "+Inf")  # "le" labels, as prometheus-client writes them


class _StoreCollector(Collector):
    """The store's and the cache's plain counts, turned into metrics at scrape time."""

    def __init__(self, app: FastAPI) -> None:
        self._app = app

    def collect(self) -> Iterable[Metric]:
        store = getattr(self._app.state, "store", None)  # set by the lifespan
        cache = getattr(store, "cache", None)

        def count(name: str, doc: str, value: Any) -> CounterMetricFamily:
            return CounterMetricFamily(f"{NAMESPACE}_{name}", doc, value=value or 0)

        def gauge(name: str, doc: str, value: Any) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{NAMESPACE}_{name}", doc, value=value or 0)

        yield count(
            "cache_hits", "Dashboards answered from the in-process cache", getattr(store, "hits", 0)
        )
        yield count(
            "cache_misses",
            "Dashboard requests that needed a Redis read",
            getattr(store, "misses", 0),
        )
        yield count(
            "redis_errors",
            "Redis calls that failed (the request was answered 503)",
            getattr(store, "redis_errors", 0),
        )
        connects = getattr(cache, "feed_connects", 0)
        yield count(
            "invalidation_feed_reconnects",
            "Times the cache invalidation feed connected again after its first connection",
            max(connects - 1, 0),
        )
        yield gauge(
            "invalidation_feed_live",
            "1 while the cache invalidation feed is connected (else answers come from Redis)",
            int(bool(getattr(cache, "live", False))),
        )
        yield gauge("cache_entries", "Dashboards held in the in-process cache", len(cache or ()))


class ApiMetrics(Collector):
    """One app's registry, and its request counts and timings.

    Kept as plain integers and floats in dicts, turned into Prometheus families only when
    scraped: a request costs a dict lookup, two additions and a bisection, no lock.
    """

    def __init__(self, app: FastAPI) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._counts: dict[tuple[str, str, int], int] = {}
        self._timings: dict[str, _Timing] = {}
        self.registry.register(self)
        self.registry.register(_StoreCollector(app))
        ProcessCollector(registry=self.registry)  # process_* (RSS, CPU, open fds), read at scrape

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        if method not in METHODS:
            method = "OTHER"  # before the key too: the dict stays as bounded as the labels
        key = (route, method, status)
        self._counts[key] = self._counts.get(key, 0) + 1
        timing = self._timings.get(route)
        if timing is None:
            timing = self._timings[route] = _Timing()
        timing.buckets[bisect_left(BUCKETS, seconds)] += 1
        timing.total += seconds

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            f"{NAMESPACE}_requests",
            "HTTP answers by route template, method and status",
            labels=["route", "method", "status"],
        )
        for (route, method, status), count in sorted(self._counts.items()):
            requests.add_metric([route, method, str(status)], count)
        yield requests
        latency = HistogramMetricFamily(
            f"{NAMESPACE}_request_duration_seconds",
            "Time to answer, by route template",
            labels=["route"],
        )
        for route, timing in sorted(self._timings.items()):
            cumulative = list(accumulate(timing.buckets))
            latency.add_metric([route], list(zip(_LE, cumulative, strict=True)), timing.total)
        yield latency

    def render(self) -> bytes:
        return _render(self.registry)


class _Timing:
    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware task and queue per request): counts and times answers."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless an answer starts: an exception that escapes is a 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # The router put the matched route in the scope; its template, never the raw path.
            route = scope.get("route")
            template = getattr(route, "path", None) if route is not None else None
            if not isinstance(template, str):
                template = UNMATCHED
            self.metrics.observe(template, scope["method"], status, time.perf_counter() - started)


def install_metrics(app: FastAPI) -> ApiMetrics:
    """The app's registry, its request middleware, and ``GET /metrics``."""
    metrics = ApiMetrics(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics",
        response_class=Response,
        responses={
            200: {
                "description": "Metrics in the Prometheus text format",
                "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
            }
        },
    )
    async def prometheus_metrics(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return metrics
