"""Issue 2, point 8: a seeded random workload against the seed SQL, and rebuild == incremental.

The workload is the platform's plain SQL (scripts/platform_sim.py) from several threads, each
with its own connections: events (some back-dated, some sharing a created_at), bursts by one
noisy tenant, transfers, agent renames, handle changes and swaps, display names, new users and
agents, deletions of agents without events and of users without agents; some transactions roll
back, some are held open while the others commit. Statements Postgres refuses under that
concurrency (a handle taken meanwhile, an agent deleted meanwhile, a deadlock) roll back too.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from threading import Event

import psycopg.errors
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from models.settings import get_projector_settings
from projector.worker import Projector
from scripts import platform_sim as p
from scripts import rebuild as rebuild_script
from tests.projection_helpers import (
    LiveProjector,
    answer,
    api_documents,
    assert_sane,
    dump_live_generation,
    mismatches,
    wait_until,
    writers_running,
)

SEED = int(os.environ.get("DIFFERENTIAL_SEED", "20260214"))
NOISY = "ainfera-ai"
# What concurrent writers may legitimately hit; anything else is a failure of the test.
REFUSALS = (
    psycopg.errors.UniqueViolation,
    psycopg.errors.ForeignKeyViolation,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
)


def _ids(conn: Connection, sql: str) -> list[int]:
    return list(conn.execute(text(sql)).scalars())


def _agents(conn: Connection) -> list[int]:
    return _ids(conn, "select id from agents order by id")


def _users(conn: Connection) -> list[int]:
    return _ids(conn, "select id from users order by id")


class Workload:
    """One writer's random transactions; ``tag`` keeps names unique across writers."""

    def __init__(self, engine: Engine, seed: int, tag: str, *, hold: float, rollback: float):
        self.engine = engine
        self.rng = random.Random(seed)
        self.tag = tag
        self.hold = hold
        self.rollback = rollback
        self.n = 0
        self.tally: Counter[str] = Counter()  # operations run (committed or not)
        self.outcomes: Counter[str] = Counter()  # what became of the transactions
        self.ties = [datetime.now(UTC) + timedelta(seconds=s) for s in (-2, 4, 9, 15)]
        self.ops: list[tuple[int, Callable[[Connection], None]]] = [
            (30, self.events),
            (6, self.burst),
            (8, self.transfer),
            (5, self.rename_agent),
            (4, self.rename_user),
            (2, self.swap_handles),
            (4, self.display_name),
            (4, self.new_user),
            (5, self.new_agent),
            (3, self.delete_agent),
            (3, self.delete_user),
        ]

    def name(self, kind: str) -> str:
        self.n += 1
        return f"{kind}-{self.tag}-{self.n}"

    def when(self) -> datetime | None:
        r = self.rng.random()
        if r < 0.1:  # back-dated, from a minute to a month
            return datetime.now(UTC) - timedelta(seconds=self.rng.uniform(60, 30 * 86400))
        if r < 0.2:  # one of a few instants shared by many events and agents
            return self.rng.choice(self.ties)
        return None  # now(): the transaction's start, shared by its events

    # -- operations ----------------------------------------------------------------------------
    def events(self, conn: Connection) -> None:
        agents = _agents(conn)
        for _ in range(self.rng.randint(1, 4)):
            p.add_event(conn, self.rng.choice(agents), created_at=self.when())
        self.tally["events"] += 1

    def burst(self, conn: Connection) -> None:
        noisy = _ids(
            conn,
            "select a.id from agents a join users u on u.id = a.owner_id"
            f" where lower(u.handle) = '{NOISY}' order by a.id",
        )
        agents = noisy or _agents(conn)
        for _ in range(self.rng.randint(30, 150)):
            p.add_event(conn, self.rng.choice(agents), "e2e", created_at=self.when())
        self.tally["burst"] += 1

    def transfer(self, conn: Connection) -> None:
        p.transfer_agent(conn, self.rng.choice(_agents(conn)), self.rng.choice(_users(conn)))
        self.tally["transfer"] += 1

    def rename_agent(self, conn: Connection) -> None:
        p.rename_agent(conn, self.rng.choice(_agents(conn)), self.name("agent"))
        self.tally["rename_agent"] += 1

    def rename_user(self, conn: Connection) -> None:
        handle = self.name("h")
        handle = handle.upper() if self.rng.random() < 0.3 else handle
        p.rename_user(conn, self.rng.choice(_users(conn)), handle)
        self.tally["rename_user"] += 1

    def swap_handles(self, conn: Connection) -> None:
        a, b = self.rng.sample(_users(conn), 2)
        rows = conn.execute(
            text("select id, handle from users where id in (:a, :b)"), {"a": a, "b": b}
        )
        handles = {r.id: r.handle for r in rows}
        p.rename_user(conn, a, self.name("tmp"))
        p.rename_user(conn, b, handles[a])
        p.rename_user(conn, a, handles[b])
        self.tally["swap_handles"] += 1

    def display_name(self, conn: Connection) -> None:
        name = None if self.rng.random() < 0.3 else self.name("Display Name")
        p.set_display_name(conn, self.rng.choice(_users(conn)), name)
        self.tally["display_name"] += 1

    def new_user(self, conn: Connection) -> None:
        uid = p.create_user(conn, self.name("user"), self.name("New User"))
        if self.rng.random() < 0.5:
            agent = p.create_agent(conn, uid, self.name("agent"))
            p.add_event(conn, agent, created_at=self.when())
        self.tally["new_user"] += 1

    def new_agent(self, conn: Connection) -> None:
        p.create_agent(conn, self.rng.choice(_users(conn)), self.name("agent"))
        self.tally["new_agent"] += 1

    def delete_agent(self, conn: Connection) -> None:
        idle = _ids(
            conn,
            "select a.id from agents a where not exists"
            " (select 1 from audit_events e where e.agent_id = a.id) order by a.id",
        )
        if idle:
            p.delete_agent(conn, self.rng.choice(idle))
            self.tally["delete_agent"] += 1

    def delete_user(self, conn: Connection) -> None:
        empty = _ids(
            conn,
            "select u.id from users u where not exists"
            " (select 1 from agents a where a.owner_id = u.id) order by u.id",
        )
        if empty:
            p.delete_user(conn, self.rng.choice(empty))
            self.tally["delete_user"] += 1

    # -- transactions ---------------------------------------------------------------------------
    def pick(self) -> Callable[[Connection], None]:
        weights = [w for w, _ in self.ops]
        return self.rng.choices([op for _, op in self.ops], weights=weights)[0]

    def transaction(self) -> None:
        ops = [self.pick() for _ in range(self.rng.choice((1, 1, 1, 2, 3)))]
        held = self.rng.random() < self.hold
        rolled = self.rng.random() < self.rollback
        with self.engine.connect() as conn:
            tx = conn.begin()
            try:
                for op in ops:
                    op(conn)
                if held:
                    time.sleep(self.rng.uniform(0.3, 1.5))
                    self.outcomes["held open"] += 1
            except DBAPIError as exc:
                if not isinstance(exc.orig, REFUSALS):
                    raise
                tx.rollback()
                self.outcomes["refused by postgres"] += 1
                return
            if rolled:
                tx.rollback()
                self.outcomes["rolled back"] += 1
            else:
                tx.commit()
                self.outcomes["committed"] += 1

    def run(self, transactions: int, pause: float = 0.0, stop: Event | None = None) -> None:
        for _ in range(transactions):
            if stop is not None and stop.is_set():
                return
            self.transaction()
            if pause:
                time.sleep(self.rng.uniform(0, pause))


def seed_platform(engine: Engine, rng: random.Random) -> None:
    with engine.begin() as conn:
        noisy = p.create_user(conn, NOISY, "Ainfera AI")
        noisy_agents = [p.create_agent(conn, noisy, f"e2e-runner-{k}") for k in range(10)]
        hizrian = p.create_user(conn, "hizrianraz", "Hizrian Raz")
        own = [p.create_agent(conn, hizrian, name) for name in ("scout", "scribe")]
        others = []
        for k in range(25):
            uid = p.create_user(conn, f"tenant-{k}", None if k % 3 else f"Tenant {k}")
            others += [p.create_agent(conn, uid, f"t{k}-a{j}") for j in range(rng.randint(0, 3))]
        for _ in range(200):
            p.add_event(conn, rng.choice(noisy_agents), "e2e")
        for agent in own + others:
            for _ in range(rng.randint(0, 4)):
                p.add_event(conn, agent, created_at=datetime.now(UTC) - timedelta(hours=1))


def _figures(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "select (select count(*) from audit_events) as events,"
                " (select coalesce(max(seq), 0) from audit_events) as max_seq,"
                " (select count(*) from users) as users, (select count(*) from agents) as agents"
            )
        ).one()
    return dict(row._mapping)


class Watch:
    """Mid-stream invariants of every answer, checked while the writers run."""

    def __init__(self, engine: Engine, api) -> None:
        self.engine = engine
        self.api = api
        self.built = False
        self.reads = 0

    def check(self) -> None:
        with self.engine.connect() as conn:
            handles = list(conn.execute(text("select handle from users")).scalars())
        answers = [(h, *answer(self.api, h)) for h in handles]
        with self.engine.connect() as conn:  # read after the answers: they must all be in here
            committed = set(conn.execute(text("select id::text from audit_events")).scalars())
        for handle, status, body in answers:
            self.reads += 1
            if status == 503 and not self.built:
                continue  # no read model yet: the first build is under way
            assert status in (200, 404), (handle, status)  # 404: renamed or deleted meanwhile
            if body is not None:
                self.built = True
                assert_sane(body, committed)


def test_random_workload_matches_the_seed_sql(engine, settings, api, check_all) -> None:
    rng = random.Random(SEED)
    seed_platform(engine, rng)
    writers = [Workload(engine, SEED + k, f"w{k}", hold=0.06, rollback=0.12) for k in range(4)]
    watch = Watch(engine, api)
    started = time.monotonic()
    with LiveProjector(settings) as live:
        with writers_running([partial(w.run, 180, 0.05) for w in writers]) as threads:
            while any(t.is_alive() for t in threads):
                live.assert_alive()
                watch.check()
                time.sleep(0.2)
        writes_done = time.monotonic()
        converge = wait_until(lambda: mismatches(engine, api), "convergence", timeout=120)
        live.assert_alive()
    users = check_all()
    tally = sum((w.tally for w in writers), Counter())
    outcomes = sum((w.outcomes for w in writers), Counter())
    figures = _figures(engine)
    print(
        f"\ndifferential (seed {SEED}): {figures['events']} events (max seq "
        f"{figures['max_seq']}), {figures['users']} users, {figures['agents']} agents; "
        f"workload {writes_done - started:.1f}s; converged {converge:.2f}s after writes paused; "
        f"{users} dashboards equal to the SQL; {watch.reads} mid-stream reads checked"
    )
    print("  transactions:", dict(sorted(outcomes.items())))
    print("  operations:", dict(sorted(tally.items())))
    assert outcomes["committed"] > 100 and outcomes["rolled back"] and outcomes["held open"]
    assert tally["transfer"] and tally["swap_handles"] and tally["delete_agent"]


def _rebuild_with_scripts_main(settings, monkeypatch) -> None:
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    get_projector_settings.cache_clear()
    try:
        assert rebuild_script.main([]) == 0
    finally:
        get_projector_settings.cache_clear()


def test_rebuild_equals_incremental_projection(
    engine, db, rclient, settings, catch_up, api, check_all, monkeypatch
) -> None:
    catch_up()  # the read model starts empty; all that follows is incremental
    rng = random.Random(SEED + 100)
    seed_platform(engine, rng)
    workload = Workload(engine, SEED + 101, "r", hold=0.0, rollback=0.12)
    for _ in range(5):
        workload.run(25)
        catch_up()
    first_gen = int(rclient.get("rm:current") or 0)
    incremental, incremental_api = dump_live_generation(rclient), api_documents(engine, api)

    Projector(db, rclient, settings).rebuild()
    assert int(rclient.get("rm:current") or 0) != first_gen, "no new generation was swapped in"
    assert dump_live_generation(rclient) == incremental
    assert api_documents(engine, api) == incremental_api

    for _ in range(3):  # incremental again, on top of the rebuilt generation
        workload.run(25)
        catch_up()
    incremental, incremental_api = dump_live_generation(rclient), api_documents(engine, api)
    _rebuild_with_scripts_main(settings, monkeypatch)
    assert dump_live_generation(rclient) == incremental
    assert api_documents(engine, api) == incremental_api
    assert check_all() == len(incremental_api)
    assert workload.tally["transfer"] and workload.outcomes["committed"] > 100
