"""High availability (issue 4): many projectors, one leader, fenced writes.

The lease is a Postgres advisory lock on a session that the server ends when it stays idle
for a whole lease (projector/leader.py); the fence is a token Redis checks inside the batch
write. Processes are real (tests/procs.py); dashboards are judged against the seed SQL.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import orjson
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from models import keys
from models.settings import ProjectorSettings
from projector.db import Database
from projector.leader import LEASE_APPLICATION_NAME, Leadership
from projector.sink import Deposed
from projector.worker import Projector
from tests.procs import Proc, ProcGroup
from tests.projection_helpers import all_agree, dump_live_generation, wait_for, wait_until
from tests.test_faults import bulk_events, seed

# Short lease so the frozen-leader test is quick; takeover is bounded by lease + poll.
ENV = {"LEADER_LEASE_SECONDS": "1.5", "STANDBY_POLL_SECONDS": "0.2", "IDLE_POLL_SECONDS": "0.2"}
TAKEOVER_S = 5.0  # the bound


def leader_info(client: redis.Redis) -> dict[str, object] | None:
    raw = client.get(keys.LEADER)
    return None if raw is None else dict(orjson.loads(raw))


def leader_pid(client: redis.Redis) -> int | None:
    info = leader_info(client)
    return None if info is None else int(str(info["holder"]).rsplit(":", 1)[1])


def lease_sessions(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "select a.pid from pg_stat_activity a join pg_locks l on l.pid = a.pid"
                    " where l.locktype = 'advisory' and l.granted and a.application_name = :n"
                ),
                {"n": LEASE_APPLICATION_NAME},
            ).scalars()
        )


def start_pair(procs: ProcGroup, rclient: redis.Redis) -> tuple[Proc, Proc]:
    """Two projectors; returns (leader, standby) once one leads and the other stands by."""
    first = procs.projector(**ENV)
    assert first.wait_for_log("leading", 60), first.log()
    second = procs.projector(**ENV)
    assert second.wait_for_log("standing by", 60), second.log()
    assert leader_pid(rclient) == first.pid
    return first, second


def takeover(standby: Proc, act: Callable[[], None]) -> float:
    """Seconds from ``act`` (which disables the leader) until ``standby`` leads."""
    started = time.monotonic()
    act()
    assert standby.wait_for_log("leading", 30), standby.log()
    took = time.monotonic() - started
    assert took < TAKEOVER_S, f"takeover took {took:.2f}s"
    return took


@pytest.mark.timeout(180)
def test_one_leads_the_standby_takes_over_when_the_leader_is_killed(
    engine: Engine,
    rclient: redis.Redis,
    check_all: Callable[[], int],
    procs: ProcGroup,
) -> None:
    seed(engine, users=12, agents_per_user=2, events=400)
    leader, standby = start_pair(procs, rclient)
    wait_until(all_agree(check_all), "the leader to catch up")
    assert "batch:" not in standby.log(), "the standby applied a batch while another led"
    assert len(lease_sessions(engine)) == 1

    bulk_events(engine, 300)
    took = takeover(standby, leader.kill)
    assert leader_pid(rclient) == standby.pid
    wait_until(all_agree(check_all), "the new leader to catch up")
    print(f"takeover after SIGKILL: {took:.2f}s")


@pytest.mark.timeout(180)
def test_a_frozen_leader_loses_the_lease_and_writes_nothing_after_it_thaws(
    engine: Engine,
    rclient: redis.Redis,
    check_all: Callable[[], int],
    procs: ProcGroup,
) -> None:
    seed(engine, users=12, agents_per_user=2, events=400)
    frozen, standby = start_pair(procs, rclient)
    wait_until(all_agree(check_all), "the leader to catch up")
    old_token = int(rclient.get(keys.LEADER_TOKEN) or 0)

    took = takeover(standby, lambda: frozen.send(signal.SIGSTOP))
    bulk_events(engine, 300)
    assert int(rclient.get(keys.LEADER_TOKEN) or 0) > old_token
    wait_until(all_agree(check_all), "the new leader to apply what was written")
    before = dump_live_generation(rclient)

    frozen.send(signal.SIGCONT)
    assert frozen.wait_for_log("standing by", 30), frozen.log()
    time.sleep(1.0)  # room for a stale write, had the fence let one through
    assert dump_live_generation(rclient) == before
    assert leader_pid(rclient) == standby.pid
    bulk_events(engine, 100)
    wait_until(all_agree(check_all), "the leader to carry on")
    print(f"takeover of a frozen leader: {took:.2f}s")


@pytest.mark.timeout(180)
def test_a_leader_that_loses_its_database_session_stands_down(
    engine: Engine,
    rclient: redis.Redis,
    check_all: Callable[[], int],
    procs: ProcGroup,
) -> None:
    seed(engine, users=8, agents_per_user=2, events=200)
    cut_off, standby = start_pair(procs, rclient)
    wait_until(all_agree(check_all), "the leader to catch up")
    (session,) = lease_sessions(engine)
    with engine.connect() as conn:
        conn.execute(text("select pg_terminate_backend(:pid)"), {"pid": session})
    assert cut_off.wait_for_log("lost the lease", 30), cut_off.log()
    wait_for(lambda: leader_pid(rclient) is not None and lease_sessions(engine), "a new leader")
    bulk_events(engine, 200)
    wait_until(all_agree(check_all), "whoever leads to apply the new events")
    assert len(lease_sessions(engine)) == 1
    assert cut_off.alive() and standby.alive()


def test_a_deposed_leaders_write_is_refused_even_at_the_same_position(
    engine: Engine,
    db: Database,
    rclient: redis.Redis,
    settings: ProjectorSettings,
) -> None:
    # In-process, so the stale write is certain to be attempted: the old leader's batch
    # starts at exactly the position Redis holds, and only the token can refuse it.
    seed(engine, users=4, agents_per_user=2, events=50)
    old = Leadership(settings.database_url, rclient, lease_seconds=30)
    new = Leadership(settings.database_url, rclient, lease_seconds=30)
    try:
        assert old.try_acquire()
        assert not new.try_acquire(), "two leaders at once"
        projector = Projector(db, rclient, settings, leadership=old)
        projector.run(threading.Event(), until_caught_up=True)
        (session,) = lease_sessions(engine)
        with engine.connect() as conn:  # what the server does to a session idle for a lease
            conn.execute(text("select pg_terminate_backend(:pid)"), {"pid": session})
        wait_for(new.try_acquire, "the lock to be free")
        assert new.token is not None and old.token is not None and new.token > old.token
        bulk_events(engine, 30)
        before = dump_live_generation(rclient)
        with pytest.raises(Deposed):
            projector.step()
        assert dump_live_generation(rclient) == before
        assert not old.confirm()
    finally:
        old.release()
        new.release()


def test_a_leader_whose_token_redis_forgot_takes_a_new_one_and_carries_on(
    engine: Engine,
    db: Database,
    rclient: redis.Redis,
    settings: ProjectorSettings,
    api: TestClient,
    check_all: Callable[[], int],
) -> None:
    seed(engine, users=4, agents_per_user=2, events=50)
    lead = Leadership(settings.database_url, rclient, lease_seconds=30)
    try:
        assert lead.try_acquire()
        projector = Projector(db, rclient, settings, leadership=lead)
        projector.run(threading.Event(), until_caught_up=True)
        rclient.delete(keys.LEADER_TOKEN)  # as after a restart that kept the read model
        bulk_events(engine, 30)
        projector.run(threading.Event(), until_caught_up=True)
        assert lead.held()
        assert int(rclient.get(keys.LEADER_TOKEN) or 0) == lead.token
        check_all()
    finally:
        lead.release()


@pytest.mark.timeout(240)
def test_two_rebuilds_at_once_beside_a_running_projector_leave_one_consistent_model(
    engine: Engine,
    rclient: redis.Redis,
    check_all: Callable[[], int],
    procs: ProcGroup,
) -> None:
    seed(engine, users=20, agents_per_user=3, events=3000)
    projector = procs.projector(**ENV)
    assert projector.wait_for_log("leading", 60), projector.log()
    wait_until(all_agree(check_all), "the projector to build and catch up")
    first = procs.script("scripts/rebuild.py")
    second = procs.script("scripts/rebuild.py")
    for _ in range(5):
        bulk_events(engine, 200)
        time.sleep(0.1)
    procs.run(first)
    procs.run(second)
    wait_until(all_agree(check_all), "the projector to follow the last swap")
    current = int(rclient.get(keys.CURRENT) or 0)
    live = {int(g) for g in rclient.smembers(keys.GENERATIONS)}
    assert live == {current}, f"generations left behind: {live - {current}}"
    stray = [
        k for k in rclient.scan_iter(match="rm:g[0-9]*") if not k.startswith(b"rm:g%d:" % current)
    ]
    assert not stray, stray[:5]
    assert projector.alive()
