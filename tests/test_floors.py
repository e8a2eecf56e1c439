"""The floors hint: each full top's 12th event, kept beside the documents.

A backlog batch is ranked by owner in Postgres; an event older than its owner's floor cannot
enter the owner's top, so the ranking drops it before sorting. The hint is written in the same
atomic step as the documents (and by the rebuild), and it may only ever cost speed: the
projector checks it against the documents it loads and ranks again if it was too high.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import orjson
import pytest
import redis
from sqlalchemy import Engine

from models import keys
from models.settings import ProjectorSettings
from projector import sink, source
from projector.db import Database
from projector.render import decode_floor
from projector.worker import Projector
from scripts import platform_sim as p

T0 = datetime(2025, 3, 1, tzinfo=UTC)


def _rank_as(kind: str, monkeypatch: pytest.MonkeyPatch) -> str:
    if kind != "small slice":
        monkeypatch.setattr(source, "BIG_SLICE", 1)
    if kind == "big slice, sparse ids":
        monkeypatch.setattr(source, "DENSE_SPAN", 0)
    return kind


@pytest.fixture(params=["small slice", "big slice, dense ids", "big slice, sparse ids"])
def any_slice(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Ranked as a live batch is (no floors), or as a backlog's batch is (floors in arrays
    indexed by agent id, or joined by owner; see source.candidates)."""
    return _rank_as(request.param, monkeypatch)


@pytest.fixture(params=["big slice, dense ids", "big slice, sparse ids"])
def big_slice(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Only the ways of ranking that use the floors."""
    return _rank_as(request.param, monkeypatch)


def _world(engine: Engine, rng: random.Random) -> dict[str, list[int]]:
    """Three owners: one with a full top and plenty below it, one just full, one short of 12."""
    agents: dict[str, list[int]] = {}
    with engine.begin() as conn:
        for handle, count in (("deep", 40), ("just", 12), ("short", 5)):
            uid = p.create_user(conn, handle)
            agents[handle] = [p.create_agent(conn, uid, f"{handle}-{i}") for i in range(2)]
            for _ in range(count):
                at = T0 + timedelta(minutes=rng.randrange(60 * 24 * 30))
                p.add_event(conn, rng.choice(agents[handle]), created_at=at)
    return agents


def _hints(client: redis.Redis) -> dict[str, tuple[str, int]]:
    gen = int(client.get(keys.CURRENT) or 0)
    handles = _handles(client, gen)
    raw = client.hgetall(keys.floors(gen))
    return {handles[int(uid)]: decode_floor(floor) for uid, floor in raw.items()}


def _doc_floors(client: redis.Redis) -> dict[str, tuple[str, int]]:
    """The 12th event of every stored document with a full top, read from the documents."""
    gen = int(client.get(keys.CURRENT) or 0)
    found = {}
    for uid, handle in _handles(client, gen).items():
        doc = client.get(keys.user_doc(gen, uid))
        assert doc is not None, handle
        events = orjson.loads(doc)["recent_events"]
        if len(events) >= keys.TOP_N:
            found[handle] = (events[11]["created_at"], events[11]["seq"])
    return found


def _handles(client: redis.Redis, gen: int) -> dict[int, str]:
    prefix = keys.handle(gen, "")
    return {
        int(client.get(key) or 0): key.decode()[len(prefix) :]
        for key in client.scan_iter(match=prefix + "*")
    }


def _run(settings: ProjectorSettings, client: redis.Redis) -> None:
    db = Database(settings.database_url)
    try:
        Projector(db, client, settings).run(threading.Event(), until_caught_up=True)
    finally:
        db.close()


def test_the_hint_is_each_full_tops_12th_event(
    any_slice: str,
    engine: Engine,
    rclient: redis.Redis,
    settings: ProjectorSettings,
    check_all: Callable[[], int],
) -> None:
    rng = random.Random(3)
    agents = _world(engine, rng)
    _run(settings, rclient)  # no read model yet: a rebuild writes the hint
    assert _hints(rclient) == _doc_floors(rclient)
    assert set(_hints(rclient)) == {"deep", "just"}

    # Live batches: newer and older events, an agent moving from deep to short (both are
    # recomputed: short's top fills up), and just renamed.
    with engine.begin() as conn:
        for _ in range(30):
            handle = rng.choice(["deep", "just", "short"])
            at = T0 + timedelta(minutes=rng.randrange(60 * 24 * 40))
            p.add_event(conn, rng.choice(agents[handle]), created_at=at)
    with engine.begin() as conn:
        short = conn.exec_driver_sql("select id from users where handle = 'short'").scalar_one()
        just = conn.exec_driver_sql("select id from users where handle = 'just'").scalar_one()
        p.transfer_agent(conn, agents["deep"][0], short)
        p.rename_user(conn, just, "justin")
    _run(settings, rclient)
    assert _hints(rclient) == _doc_floors(rclient)
    assert set(_hints(rclient)) == {"deep", "justin", "short"}
    assert check_all() == 3

    # A top that empties: deep hands its last agent to short, and its hint goes with it.
    with engine.begin() as conn:
        p.transfer_agent(conn, agents["deep"][1], short)
    _run(settings, rclient)
    assert _hints(rclient) == _doc_floors(rclient)
    assert set(_hints(rclient)) == {"justin", "short"}
    assert check_all() == 3


def test_events_older_than_every_floor_reach_no_ranking(
    big_slice: str,
    engine: Engine,
    rclient: redis.Redis,
    settings: ProjectorSettings,
    check_all: Callable[[], int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    agents = _world(engine, random.Random(5))
    _run(settings, rclient)
    with engine.begin() as conn:
        for i in range(25):
            handle = ("deep", "just")[i % 2]
            p.add_event(conn, agents[handle][i % 2], created_at=T0 - timedelta(days=1 + i))
    caplog.set_level(logging.INFO, logger="projector")
    _run(settings, rclient)
    batches = [r.fields for r in caplog.records if hasattr(r, "fields")]
    assert [(b["events"], b["candidates"]) for b in batches] == [(25, 0)]
    assert check_all() == 3  # the heights moved; the tops did not


def test_a_hint_above_the_top_costs_speed_not_correctness(
    big_slice: str,
    engine: Engine,
    rclient: redis.Redis,
    settings: ProjectorSettings,
    check_all: Callable[[], int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    agents = _world(engine, random.Random(9))
    _run(settings, rclient)
    gen = int(rclient.get(keys.CURRENT) or 0)
    uids = {handle: uid for uid, handle in _handles(rclient, gen).items()}
    # A hint in the future would drop every new event of deep's before the sort.
    rclient.hset(keys.floors(gen), str(uids["deep"]), "9999-12-31T00:00:00.000000+00:00 1")
    with engine.begin() as conn:
        for i in range(4):
            p.add_event(conn, agents["deep"][i % 2], created_at=T0 + timedelta(days=60, hours=i))
    caplog.set_level(logging.INFO, logger="projector")
    _run(settings, rclient)
    assert any("floors hint above" in r.getMessage() for r in caplog.records)
    assert check_all() == 3
    assert _hints(rclient) == _doc_floors(rclient)  # and the write put the hint right


def test_owners_load_in_chunks_each_with_its_own_agents(
    engine: Engine,
    rclient: redis.Redis,
    settings: ProjectorSettings,
    check_all: Callable[[], int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Three owners, two to a chunk: the second chunk must pair its documents with its own
    # owners' agents (names are re-rendered from them).
    monkeypatch.setattr(sink, "_LOAD_CHUNK", 2)
    agents = _world(engine, random.Random(11))
    _run(settings, rclient)
    with engine.begin() as conn:
        for handle in ("deep", "just", "short"):
            p.add_event(conn, agents[handle][1], created_at=T0 + timedelta(days=90))
    _run(settings, rclient)  # a fresh projector: every owner is loaded from Redis
    assert check_all() == 3
