"""Prometheus metrics of the projector, served on its own port (``METRICS_PORT``).

The worker reports to a ``Metrics``; the base class does nothing, so a Projector built without
one (tests, scripts/rebuild.py, a rebuild's builder) pays nothing. ``PrometheusMetrics`` keeps
its own registry (never the process-global one), and its per-batch calls are a few counter
increments. What needs Postgres (the newest commit, the oldest running transaction) is asked by
a collector when Prometheus scrapes, at most once a second, on a session of its own: never on
the batch's hot path, and never on the worker's connections.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import psycopg
import redis
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from projector.db import libpq_url
from projector.policy import is_statement_timeout
from projector.sink import Head

log = logging.getLogger("projector.metrics")

FENCE_REASONS = ("leader", "generation", "position", "building")
SAMPLE_EVERY_S = 1.0


def store_error_kind(exc: BaseException) -> tuple[str, str]:
    """(store, kind) of an error the worker waits out; a fixed, small set of label values."""
    if isinstance(exc, redis.RedisError):
        if isinstance(exc, redis.OutOfMemoryError):
            return "redis", "oom"
        if isinstance(exc, redis.BusyLoadingError):
            return "redis", "loading"
        if isinstance(exc, redis.TimeoutError):
            return "redis", "timeout"
        return "redis", "connection"
    if is_statement_timeout(exc):
        return "postgres", "statement_timeout"
    orig = getattr(exc, "orig", None) or exc
    return "postgres", "connection" if isinstance(orig, psycopg.OperationalError) else "other"


def lag_seconds(
    newest: tuple[int, datetime] | None, applied_at: datetime | None, passed: int | None
) -> float | None:
    """Seconds between the newest change committed and the newest change applied.

    ``newest`` is (transaction id, commit time) of the newest change in Postgres; ``passed``
    the horizon of the last batch that found nothing left to read. A change below that horizon
    has been applied, so the lag is 0 then; otherwise it is unknown without commit timestamps,
    or right after a rebuild (nothing applied by a batch yet).
    """
    if newest is None:
        return None
    xid, committed = newest
    if passed is not None and xid < passed:
        return 0.0
    if applied_at is None:
        return None
    return max(0.0, (committed - applied_at).total_seconds())


class Metrics:
    """What the worker reports; this base records nothing."""

    def batch_applied(
        self, events: int, changes: int, owners: int, seconds: float, head: Head
    ) -> None:
        pass

    def committed(self, at: datetime | None) -> None:
        pass

    def position(self, head: Head) -> None:
        pass

    def caught_up(self, horizon: int) -> None:
        pass

    def store_error(self, exc: BaseException) -> None:
        pass

    def fenced(self, reason: str) -> None:
        pass

    def leading(self, token: int | None) -> None:
        pass

    def standing_by(self) -> None:
        pass

    def rebuild_progress(self, done: int, total: int) -> None:
        pass


class PrometheusMetrics(Metrics):
    def __init__(self, database_url: str | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # RSS, CPU, open files: what a soak watches
        self.changes = Counter(
            "projector_changes_applied",
            "Changes applied to the read model: kind=event (audit events) or entity"
            " (user and agent inserts, updates, deletes)",
            ["kind"],
            registry=r,
        )
        self.owners = Counter(
            "projector_owners_written", "User documents rewritten by batches", registry=r
        )
        self.batch_seconds = Histogram(
            "projector_batch_duration_seconds",
            "Wall time of one applied batch, read to write (the _count is the number of batches)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.position_seq = Gauge(
            "projector_position_seq",
            "Highest audit event seq applied (the served global chain height)",
            registry=r,
        )
        self.position_xid = Gauge(
            "projector_position_xid",
            "Transaction id of the event stream's cursor (every event at or below it is applied)",
            registry=r,
        )
        self.generation = Gauge(
            "projector_generation", "Read-model generation the projector writes", registry=r
        )
        self.errors = Counter(
            "projector_store_errors",
            "Failures waited out, by store (redis, postgres) and kind (connection, timeout,"
            " oom, loading, statement_timeout, other)",
            ["store", "kind"],
            registry=r,
        )
        self.fencing = Counter(
            "projector_fencing_refusals",
            "Batch writes refused by the fence: reason=leader (a newer leader's token),"
            " generation (no longer served), position (cursor moved), building",
            ["reason"],
            registry=r,
        )
        self.leader = Gauge(
            "projector_leader", "1 while this projector leads, 0 while it stands by", registry=r
        )
        self.token = Gauge(
            "projector_leader_token", "Fencing token of this projector's lead (0: none)", registry=r
        )
        self.rebuild_done = Gauge(
            "projector_rebuild_owners_done", "Owners written by the rebuild in progress", registry=r
        )
        self.rebuild_total = Gauge(
            "projector_rebuild_owners_total", "Owners the rebuild in progress writes", registry=r
        )
        # Present at 0 from the start, so a rate() or an alert has a series before the first one.
        for store, kind in [
            *(("redis", k) for k in ("connection", "timeout", "oom", "loading")),
            *(("postgres", k) for k in ("connection", "statement_timeout", "other")),
        ]:
            self.errors.labels(store, kind)
        for reason in FENCE_REASONS:
            self.fencing.labels(reason)
        for kind in ("event", "entity"):
            self.changes.labels(kind)
        self.applied_at: datetime | None = None
        self.passed: int | None = None
        self.sampler: PostgresSampler | None = None
        if database_url is not None:
            self.sampler = PostgresSampler(database_url, self)
            r.register(self.sampler)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, host, registry=self.registry)

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()

    # -- what the worker reports -----------------------------------------------------------
    def batch_applied(
        self, events: int, changes: int, owners: int, seconds: float, head: Head
    ) -> None:
        self.changes.labels("event").inc(events)
        self.changes.labels("entity").inc(changes)
        self.owners.inc(owners)
        self.batch_seconds.observe(seconds)
        self.position(head)

    def committed(self, at: datetime | None) -> None:
        if at is not None:
            self.applied_at = at

    def position(self, head: Head) -> None:
        self.position_seq.set(head.height)
        self.position_xid.set(head.cursor.events.xid)
        self.generation.set(head.gen)

    def caught_up(self, horizon: int) -> None:
        self.passed = horizon

    def store_error(self, exc: BaseException) -> None:
        self.errors.labels(*store_error_kind(exc)).inc()

    def fenced(self, reason: str) -> None:
        self.fencing.labels(reason if reason in FENCE_REASONS else "other").inc()

    def leading(self, token: int | None) -> None:
        self.leader.set(1)
        self.token.set(token or 0)

    def standing_by(self) -> None:
        self.leader.set(0)
        self.token.set(0)

    def rebuild_progress(self, done: int, total: int) -> None:
        self.rebuild_done.set(done)
        self.rebuild_total.set(total)


# The newest change is the newest transaction of the two streams the projector reads (one
# backward index probe each), not pg_last_committed_xact(): that one counts every commit of the
# cluster, so any write to another table or database would pass for a change not yet applied.
# The transaction holding the horizon back is the running one with the oldest xid, in any
# database of the cluster (xids are cluster-wide), or a prepared transaction; backend_xmin
# alone (a read-only snapshot, such as the projector's own batch) holds back vacuum, not it.
POSTGRES_SAMPLE = """
select n.tx::text::bigint as xid,
    case when n.tx is not null and current_setting('track_commit_timestamp') = 'on'
        then pg_xact_commit_timestamp(xid(n.tx)) end as committed,
    greatest(
        (select extract(epoch from clock_timestamp() - a.xact_start) from pg_stat_activity a
         where a.backend_xid is not null and a.pid <> pg_backend_pid()
         order by age(a.backend_xid) desc limit 1),
        (select extract(epoch from clock_timestamp() - min(p.prepared)) from pg_prepared_xacts p)
    )::float8 as oldest
from (select greatest(
    (select e.tx_id from audit_events e order by e.tx_id desc limit 1),
    (select c.tx_id from projector_entity_changes c order by c.tx_id desc limit 1)) as tx) n
"""


class PostgresSampler(Collector):
    """Lag and the oldest running transaction, read at scrape time, at most once a second."""

    def __init__(self, database_url: str, owner: PrometheusMetrics) -> None:
        self._dsn = libpq_url(database_url)
        self._owner = owner
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._at = -SAMPLE_EVERY_S
        self._newest: tuple[int, datetime] | None = None
        self._oldest: float | None = None

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            if time.monotonic() - self._at >= SAMPLE_EVERY_S:
                self._sample()
            lag = lag_seconds(self._newest, self._owner.applied_at, self._owner.passed)
            lag_family, oldest_family, ok_family = self._families()
            if lag is not None:
                lag_family.add_metric([], lag)
            if self._oldest is not None:
                oldest_family.add_metric([], self._oldest)
            ok_family.add_metric([], 0 if self._conn is None else 1)
            return [lag_family, oldest_family, ok_family]

    def _families(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "projector_lag_seconds",
                "Commit time of the newest change in Postgres (events, entity changes) minus"
                " that of the newest change applied; 0 once the projector has read past it;"
                " absent when unknown (no track_commit_timestamp, or nothing applied since a"
                " rebuild)",
            ),
            GaugeMetricFamily(
                "projector_oldest_xact_age_seconds",
                "Age of the oldest running (or prepared) transaction with an xid: it holds the"
                " projector's horizon, and so the dashboards, back until it ends (0: none)",
            ),
            GaugeMetricFamily(
                "projector_postgres_sample_ok",
                "1 if the last scrape-time Postgres sample succeeded",
            ),
        ]

    def _sample(self) -> None:
        self._at = time.monotonic()
        try:
            if self._conn is None:
                self._conn = psycopg.connect(
                    self._dsn,
                    autocommit=True,
                    connect_timeout=2,
                    application_name="projector-metrics",
                    options="-c statement_timeout=2000",
                )
            row = self._conn.execute(POSTGRES_SAMPLE).fetchone()
        except psycopg.Error as exc:
            log.warning("metrics: cannot sample Postgres (%s)", str(exc).strip() or exc)
            self.close()
            self._newest = self._oldest = None
            return
        assert row is not None
        xid, committed, oldest = row
        self._newest = None if xid is None or committed is None else (int(xid), committed)
        self._oldest = float(oldest or 0.0)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
