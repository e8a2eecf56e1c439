"""Exhausted or slow parts (issue 4): Redis at maxmemory, Postgres timeouts, dropped sessions.

Each failure must leave the read model exactly as it was (the batch is all or nothing), be said
in the projector's log, and be recovered from without losing anything once the cause is gone.
Dashboards are judged against the seed SQL (tests/oracle.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from models import keys
from projector.db import APPLICATION_NAME
from tests.procs import ProcGroup
from tests.projection_helpers import all_agree, dump_live_generation, wait_until
from tests.test_faults import bulk_events, seed


@pytest.fixture
def full_redis(rclient: redis.Redis) -> Iterator[Callable[[bool], None]]:
    """Turn Redis's memory limit on (below what it uses, no eviction) and off again."""
    policy = rclient.config_get("maxmemory-policy")["maxmemory-policy"]

    def full(on: bool) -> None:
        if on:
            used = int(rclient.info("memory")["used_memory"])
            rclient.config_set("maxmemory-policy", "noeviction")
            rclient.config_set("maxmemory", max(1, used - 64 * 1024))
        else:
            rclient.config_set("maxmemory", 0)

    yield full
    rclient.config_set("maxmemory", 0)
    rclient.config_set("maxmemory-policy", policy)


@pytest.mark.timeout(120)
def test_redis_at_maxmemory_refuses_whole_batches_then_everything_applies(
    engine: Engine,
    rclient: redis.Redis,
    api: TestClient,
    catch_up: Callable[[], None],
    check_all: Callable[[], int],
    procs: ProcGroup,
    full_redis: Callable[[bool], None],
) -> None:
    seed(engine, users=10, agents_per_user=2, events=300)
    catch_up()
    before = dump_live_generation(rclient)
    position = rclient.hget(keys.global_hash(int(rclient.get(keys.CURRENT) or 0)), "pos")
    full_redis(True)
    bulk_events(engine, 400)
    projector = procs.projector(IDLE_POLL_SECONDS="0.2", MAX_BACKOFF_SECONDS="0.5")
    assert projector.wait_for_log("Redis is out of memory", 60, count=2), projector.log()
    # Refused whole: not one document, and not the position, moved.
    assert dump_live_generation(rclient) == before
    gen = int(rclient.get(keys.CURRENT) or 0)
    assert rclient.hget(keys.global_hash(gen), "pos") == position
    # Reads still work while Redis is full.
    handle = engine.connect().execute(text("select handle from users limit 1")).scalar_one()
    assert api.get(f"/v1/users/{handle}/dashboard").status_code == 200
    assert projector.alive()

    full_redis(False)
    wait_until(all_agree(check_all), "the projector to apply the held-back batch")
    assert projector.alive()


@pytest.mark.timeout(180)
def test_a_statement_timeout_shrinks_the_batch_and_it_is_retried_whole(
    engine: Engine,
    rclient: redis.Redis,
    db_url: str,
    catch_up: Callable[[], None],
    check_all: Callable[[], int],
    procs: ProcGroup,
) -> None:
    seed(engine, users=30, agents_per_user=3, events=500)
    catch_up()
    bulk_events(engine, 150_000)
    dbname = db_url.rsplit("/", 1)[1]
    with engine.connect() as conn:  # as a DBA would: every new session of this database
        conn.execute(text(f"alter database {dbname} set statement_timeout = '10ms'"))
        conn.commit()
    try:
        projector = procs.projector(BATCH_SIZE="500000", IDLE_POLL_SECONDS="0.2")
        assert projector.wait_for_log("Postgres cancelled the batch", 60), projector.log()
        wait_until(all_agree(check_all), "every event applied in smaller batches", timeout=120)
    finally:
        with engine.connect() as conn:
            conn.execute(text(f"alter database {dbname} reset statement_timeout"))
            conn.commit()
    assert "retrying it whole, at most 250000 events" in projector.log()
    assert projector.alive()


@pytest.mark.timeout(180)
def test_a_session_dropped_in_the_middle_of_a_batch_is_retried_whole(
    engine: Engine,
    rclient: redis.Redis,
    catch_up: Callable[[], None],
    check_all: Callable[[], int],
    procs: ProcGroup,
) -> None:
    seed(engine, users=30, agents_per_user=3, events=500)
    catch_up()
    bulk_events(engine, 150_000)
    projector = procs.projector(BATCH_SIZE="500000", IDLE_POLL_SECONDS="0.2")
    busy = text(
        "select pid from pg_stat_activity where application_name = :n and state = 'active'"
        " and query ilike '%audit_events%' and pid <> pg_backend_pid()"
    )
    terminated = 0
    deadline = time.monotonic() + 60
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        while not terminated:
            assert time.monotonic() < deadline, projector.log()
            for pid in conn.execute(busy, {"n": APPLICATION_NAME}).scalars():
                terminated += int(
                    conn.execute(text("select pg_terminate_backend(:p)"), {"p": pid}).scalar_one()
                )
            time.sleep(0.005)
    assert projector.wait_for_log("store unreachable", 30), projector.log()
    wait_until(all_agree(check_all), "the batch to be read and applied again", timeout=120)
    assert projector.alive()
