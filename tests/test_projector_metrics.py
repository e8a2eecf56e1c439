"""The projector's Prometheus metrics and JSON logs (issue 5), scraped from real processes.

Counters are checked against what the test committed, gauges against Redis and Postgres; every
number is read over HTTP from ``python -m projector`` and parsed by prometheus_client's parser.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import pytest
import redis
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, text

from models import keys
from models.settings import ProjectorSettings
from projector.db import Database
from projector.leader import LEASE_APPLICATION_NAME, Leadership
from projector.metrics import PrometheusMetrics, lag_seconds, store_error_kind
from projector.policy import Backoff
from projector.worker import Projector
from scripts import platform_sim as p
from scripts.throwaway import free_port
from tests.procs import Proc, ProcGroup
from tests.test_faults import bulk_events, seed

# A short lease and quick polls, so takeover is quick (as in tests/test_leader.py).
LEADER_ENV = {"LEADER_LEASE_SECONDS": "1.5", "STANDBY_POLL_SECONDS": "0.2"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def wait_for(check: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.05)


def scrapable(port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            scrape(port)
        except httpx.TransportError:
            return False
        return True

    return check


def start(procs: ProcGroup, rclient: redis.Redis, **env: str) -> tuple[Proc, int]:
    """A projector with metrics on a free port, once it leads and the read model exists."""
    port = free_port()
    proc = procs.projector(**{"METRICS_PORT": str(port), "IDLE_POLL_SECONDS": "0.1", **env})
    wait_for(scrapable(port), f"metrics on port {port}:\n{proc.log()}")
    wait_for(lambda: rclient.get(keys.CURRENT) is not None, "the first read model")
    return proc, port


def lease_sessions(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text("select pid from pg_stat_activity where application_name = :n"),
                {"n": LEASE_APPLICATION_NAME},
            ).scalars()
        )


def max_seq(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(text("select coalesce(max(seq), 0) from audit_events")).scalar_one()
        )


def applied_up_to(port: int, seq: int) -> Callable[[], bool]:
    return lambda: value(scrape(port), "projector_position_seq") == seq


@pytest.mark.timeout(180)
def test_counters_equal_what_was_committed_and_logs_are_json(
    engine: Engine, rclient: redis.Redis, procs: ProcGroup
) -> None:
    proc, port = start(procs, rclient, LOG_FORMAT="json")
    seed(engine, users=6, agents_per_user=2, events=0)  # 6 + 12 entity changes
    bulk_events(engine, 250)
    with engine.begin() as conn:  # and a few events of their own transactions
        agent = conn.execute(text("select min(id) from agents")).scalar_one()
    for _ in range(3):
        with engine.begin() as conn:
            p.add_event(conn, agent)
    wait_for(applied_up_to(port, max_seq(engine)), "every event applied")

    samples = scrape(port)
    assert value(samples, "projector_changes_applied_total", kind="event") == 253
    assert value(samples, "projector_changes_applied_total", kind="entity") == 18
    assert value(samples, "projector_leader") == 1
    assert value(samples, "projector_leader_token") == int(rclient.get(keys.LEADER_TOKEN) or 0)
    assert value(samples, "projector_generation") == int(rclient.get(keys.CURRENT) or 0)
    gen = int(rclient.get(keys.CURRENT) or 0)
    pos = orjson.loads(rclient.hget(keys.global_hash(gen), keys.GLOBAL_POS) or b"[]")
    assert value(samples, "projector_position_xid") == pos[0]
    assert value(samples, "projector_store_errors_total", store="redis", kind="oom") == 0
    assert value(samples, "projector_postgres_sample_ok") == 1

    # One JSON object a line, the batch figures as fields of their own.
    lines = [orjson.loads(line) for line in proc.log().splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "message"} <= line.keys() for line in lines)
    batches = [line for line in lines if line["message"].startswith("batch:")]
    assert batches, proc.log()
    fields = ("events", "candidates", "changes", "owners", "recomputed", "read_s", "fold_s")
    assert all(set(fields) | {"write_s", "seq"} <= b.keys() for b in batches)
    assert sum(b["events"] for b in batches) == 253
    assert sum(b["changes"] for b in batches) == 18
    assert batches[-1]["seq"] == max_seq(engine)
    assert value(samples, "projector_batch_duration_seconds_count") == len(batches)
    assert value(samples, "projector_owners_written_total") == sum(b["owners"] for b in batches)


@pytest.mark.timeout(180)
def test_lag_and_the_transaction_holding_the_horizon_back(
    engine: Engine, rclient: redis.Redis, procs: ProcGroup
) -> None:
    _, port = start(procs, rclient)
    seed(engine, users=3, agents_per_user=1, events=20)
    wait_for(applied_up_to(port, max_seq(engine)), "the seed applied")
    # Caught up: the newest commit is below the horizon the projector has read past.
    wait_for(lambda: value(scrape(port), "projector_lag_seconds") == 0, "no lag")
    assert value(scrape(port), "projector_oldest_xact_age_seconds") == 0

    with engine.connect() as holder:
        holder.execute(text("select pg_current_xact_id()"))  # an xid: the horizon stops here
        bulk_events(engine, 10)  # committed, but above the horizon: not applied
        with engine.connect() as conn:
            newest = conn.execute(
                text("select pg_xact_commit_timestamp(max(tx_id)::text::xid) from audit_events")
            ).scalar_one()
            applied = conn.execute(
                text(
                    "select pg_xact_commit_timestamp(max(tx_id)::text::xid) from audit_events"
                    " where seq <= :s"
                ),
                {"s": max_seq(engine) - 10},
            ).scalar_one()

        def held() -> bool:
            s = scrape(port)
            lag, oldest = (
                value(s, "projector_lag_seconds"),
                value(s, "projector_oldest_xact_age_seconds"),
            )
            return lag is not None and lag > 0 and oldest is not None and oldest > 0

        wait_for(held, "the lag and the holder's age to show")
        samples = scrape(port)
        # Newest commit minus the commit time of the newest change applied (the seed's).
        want = (newest - applied).total_seconds()
        assert value(samples, "projector_lag_seconds") == pytest.approx(want, abs=1e-3)
        assert value(samples, "projector_position_seq") == max_seq(engine) - 10
        holder.rollback()
    wait_for(applied_up_to(port, max_seq(engine)), "the held-back events applied")
    wait_for(lambda: value(scrape(port), "projector_lag_seconds") == 0, "no lag again")
    wait_for(lambda: value(scrape(port), "projector_oldest_xact_age_seconds") == 0, "no holder")


@pytest.mark.timeout(120)
def test_commits_that_change_nothing_projected_are_no_lag(
    engine: Engine, rclient: redis.Redis, procs: ProcGroup
) -> None:
    # No NOTIFY and a long poll: the projector does not look again for a while, so only a lag
    # that counts changes of its own streams (not any commit of the cluster) can stay at 0.
    _, port = start(procs, rclient, IDLE_POLL_SECONDS="10")
    seed(engine, users=2, agents_per_user=1, events=10)
    wait_for(applied_up_to(port, max_seq(engine)), "the seed applied")
    wait_for(lambda: value(scrape(port), "projector_lag_seconds") == 0, "no lag")
    with engine.begin() as conn:
        conn.execute(text("create table unrelated (n int)"))
    for n in range(3):
        with engine.begin() as conn:
            conn.execute(text("insert into unrelated values (:n)"), {"n": n})
    time.sleep(1.2)  # past the sampler's once-a-second cache: the next scrape asks Postgres
    assert value(scrape(port), "projector_lag_seconds") == 0


@pytest.mark.timeout(180)
def test_leadership_gauge_is_1_for_the_leader_and_0_for_a_standby(
    engine: Engine, rclient: redis.Redis, procs: ProcGroup
) -> None:
    leader, leader_port = start(procs, rclient, **LEADER_ENV)
    assert leader.wait_for_log("leading", 60), leader.log()
    standby_port = free_port()
    standby = procs.projector(METRICS_PORT=str(standby_port), **LEADER_ENV)
    assert standby.wait_for_log("standing by", 60), standby.log()
    token = int(rclient.get(keys.LEADER_TOKEN) or 0)
    assert value(scrape(leader_port), "projector_leader") == 1
    assert value(scrape(leader_port), "projector_leader_token") == token
    assert value(scrape(standby_port), "projector_leader") == 0
    assert value(scrape(standby_port), "projector_leader_token") == 0

    leader.send(signal.SIGKILL)
    wait_for(lambda: value(scrape(standby_port), "projector_leader") == 1, "the takeover")
    assert value(scrape(standby_port), "projector_leader_token") == token + 1
    seed(engine, users=2, agents_per_user=1, events=15)
    wait_for(applied_up_to(standby_port, max_seq(engine)), "the new leader applying")
    samples = scrape(standby_port)
    assert value(samples, "projector_changes_applied_total", kind="event") == 15


@pytest.mark.timeout(180)
def test_redis_out_of_memory_is_counted_apart(
    engine: Engine, rclient: redis.Redis, procs: ProcGroup
) -> None:
    _, port = start(procs, rclient, MAX_BACKOFF_SECONDS="0.5")
    seed(engine, users=4, agents_per_user=1, events=10)
    wait_for(applied_up_to(port, max_seq(engine)), "the seed applied")
    policy = rclient.config_get("maxmemory-policy")["maxmemory-policy"]
    used = int(rclient.info("memory")["used_memory"])
    rclient.config_set("maxmemory-policy", "noeviction")
    rclient.config_set("maxmemory", max(1, used - 64 * 1024))
    try:
        bulk_events(engine, 50)
        wait_for(
            lambda: (
                (
                    value(scrape(port), "projector_store_errors_total", store="redis", kind="oom")
                    or 0
                )
                >= 2
            ),
            "refused writes counted",
        )
        samples = scrape(port)
        assert value(samples, "projector_store_errors_total", store="redis", kind="connection") == 0
        assert value(samples, "projector_position_seq") == max_seq(engine) - 50
    finally:
        rclient.config_set("maxmemory", 0)
        rclient.config_set("maxmemory-policy", policy)
    wait_for(applied_up_to(port, max_seq(engine)), "the held-back batch applied")
    assert value(scrape(port), "projector_changes_applied_total", kind="event") == 60


def test_a_deposed_write_counts_as_a_fencing_refusal_and_stands_by(
    engine: Engine, db: Database, rclient: redis.Redis, settings: ProjectorSettings
) -> None:
    seed(engine, users=3, agents_per_user=1, events=20)
    metrics = PrometheusMetrics()  # no Postgres sampler: only what the worker reports
    old = Leadership(settings.database_url, rclient, lease_seconds=30)
    new = Leadership(settings.database_url, rclient, lease_seconds=30)
    try:
        projector = Projector(db, rclient, settings, leadership=old, metrics=metrics)
        projector.run(threading.Event(), until_caught_up=True)
        assert metrics.registry.get_sample_value("projector_leader") == 1
        (session,) = lease_sessions(engine)
        with engine.connect() as conn:
            conn.execute(text("select pg_terminate_backend(:pid)"), {"pid": session})
        wait_for(new.try_acquire, "the lock to be free")
        bulk_events(engine, 5)
        projector._attempt(False, Backoff(0.1))
        sample = metrics.registry.get_sample_value
        assert sample("projector_fencing_refusals_total", {"reason": "leader"}) == 1
        assert sample("projector_fencing_refusals_total", {"reason": "position"}) == 0
        assert sample("projector_leader") == 0
    finally:
        old.release()
        new.release()


def test_metrics_use_their_own_registry_and_off_means_no_port(
    procs: ProcGroup, rclient: redis.Redis
) -> None:
    ours = PrometheusMetrics()
    assert ours.registry.get_sample_value("projector_owners_written_total") == 0
    assert REGISTRY.get_sample_value("projector_owners_written_total") is None
    log = procs.run(procs.projector("--until-caught-up", METRICS_PORT="0"))
    assert "projector stopped" in log
    assert "metrics on" not in log


def test_lag_rules() -> None:
    now = datetime(2026, 12, 4, tzinfo=UTC)
    newest = (100, now)
    assert lag_seconds(newest, now - timedelta(seconds=2.5), passed=None) == 2.5
    assert lag_seconds(newest, now - timedelta(seconds=2.5), passed=100) == 2.5
    assert lag_seconds(newest, now - timedelta(seconds=2.5), passed=101) == 0
    assert lag_seconds(newest, None, passed=50) is None
    assert lag_seconds(None, now, passed=50) is None
    assert store_error_kind(redis.OutOfMemoryError("full")) == ("redis", "oom")
    assert store_error_kind(redis.ConnectionError("down")) == ("redis", "connection")


@pytest.fixture(autouse=True)
def _no_leftover_maxmemory(rclient: redis.Redis) -> Iterator[None]:
    yield
    rclient.config_set("maxmemory", 0)


@pytest.mark.timeout(120)
def test_a_rebuild_at_start_reports_its_owners(
    engine: Engine, rclient: redis.Redis, procs: ProcGroup
) -> None:
    seed(engine, users=30, agents_per_user=1, events=40)
    _, port = start(procs, rclient)  # Redis is empty: the projector builds the read model first
    wait_for(applied_up_to(port, max_seq(engine)), "the read model built")
    samples = scrape(port)
    assert value(samples, "projector_rebuild_owners_total") == 30
    assert value(samples, "projector_rebuild_owners_done") == 30
    # Built from the snapshot, not applied by batches: no change is counted as applied.
    assert value(samples, "projector_changes_applied_total", kind="event") == 0
