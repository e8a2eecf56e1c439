"""Process-level faults (issue 2, "What it must survive", points 4 to 7).

The projector, the API and the rebuild run as real processes (tests/procs.py) against the
suite's real Postgres and Redis. Whatever a dashboard shows is judged against the seed SQL in
tests/oracle.py, never against something the code under test produced.
"""

from __future__ import annotations

import random
import re
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

from models import keys
from models.settings import ProjectorSettings
from scripts import platform_sim as p
from scripts.throwaway import PostgresServer, RedisServer
from tests.conftest import TEMPLATE_DB
from tests.oracle import expected, normalise
from tests.procs import Proc, ProcGroup, proc_group

BASE = datetime(2025, 3, 1, tzinfo=UTC)
WINDOW_S = 7200  # created_at falls in [BASE, BASE + 2h), at whole seconds: plenty of ties
CONVERGE_S = 90.0

Want = dict[str, dict[str, Any]]


# -- fixtures and the oracle ------------------------------------------------------------------
@pytest.fixture
def restartable_db(pg_server: PostgresServer) -> Iterator[str]:
    """Like conftest's db_url, but its teardown holds no pooled connection, so it survives a
    Postgres restart in the middle of the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_server.url(), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f"create database {name} template {TEMPLATE_DB}"))
    try:
        yield pg_server.url(name)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"drop database if exists {name} with (force)"))
        admin.dispose()


@pytest.fixture
def restartable_engine(restartable_db: str) -> Iterator[Engine]:
    engine = create_engine(
        ProjectorSettings(database_url=restartable_db).database_url, pool_pre_ping=True
    )
    yield engine
    engine.dispose()


@pytest.fixture
def restartable_procs(
    restartable_db: str, redis_server: RedisServer, rclient: redis.Redis, tmp_path: Path
) -> Iterator[ProcGroup]:
    yield from proc_group(tmp_path, restartable_db, redis_server.url)


def still_waiting(deadline: float, proc: Proc, what: str) -> None:
    """One tick of a wait: fail if ``proc`` died or the generous deadline has passed."""
    assert proc.alive(), (
        f"{proc.name} exited {proc.popen.returncode} waiting for {what}:\n{proc.log()}"
    )
    assert time.monotonic() < deadline, f"still waiting for {what}:\n{proc.log()[-3000:]}"


def oracle(engine: Engine) -> Want:
    """Every user's expected dashboard, from the seed SQL, keyed by handle."""
    with engine.connect() as conn:
        users = conn.execute(text("select id, handle from users order by id")).all()
        return {u.handle: expected(conn, u.id) for u in users}


def problem(http: httpx.Client, handle: str, want: dict[str, Any]) -> str | None:
    """None if the API answers 200 with exactly ``want``; otherwise what is wrong."""
    try:
        response = http.get(f"/v1/users/{handle}/dashboard")
    except httpx.HTTPError as exc:
        return f"{handle}: {exc!r}"
    if response.status_code != 200:
        return f"{handle}: {response.status_code} {response.text[:200]}"
    got = normalise(response.json())
    if got != want:
        return f"{handle}: wrong dashboard\n  got  {got}\n  want {want}"
    return None


def wait_right(http: httpx.Client, engine: Engine, want: Want | None = None) -> Want:
    """Poll until every user's answer equals the SQL (writes paused), then check all once more."""
    want = oracle(engine) if want is None else want
    pending = set(want)
    last: dict[str, str] = {}
    deadline = time.monotonic() + CONVERGE_S
    while pending:
        for handle in sorted(pending):
            found = problem(http, handle, want[handle])
            if found is None:
                pending.discard(handle)
            else:
                last[handle] = found
        if pending and time.monotonic() > deadline:
            shown = "\n".join(last[h] for h in sorted(pending)[:5])
            pytest.fail(f"{len(pending)} users still not right after {CONVERGE_S}s:\n{shown}")
        if pending:
            time.sleep(0.2)
    wrong = [f for h in want if (f := problem(http, h, want[h])) is not None]
    assert not wrong, "\n".join(wrong[:5])
    return want


def seed(engine: Engine, *, users: int, agents_per_user: int, events: int) -> None:
    """A bulk import by plain SQL, the way a platform migration would write it."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "insert into users (handle, display_name) select 'Seed-' || g,"
                " case when g % 3 = 0 then null else 'User ' || g end"
                " from generate_series(1, :n) g"
            ),
            {"n": users},
        )
        conn.execute(
            text(
                "insert into agents (owner_id, name) select u.id, 'agent-' || u.id || '-' || k"
                " from users u cross join generate_series(1, :k) k"
            ),
            {"k": agents_per_user},
        )
    bulk_events(engine, events)


def bulk_events(engine: Engine, events: int) -> None:
    """``events`` events on random agents, created_at random in the window, in one transaction."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "insert into audit_events (id, agent_id, event_type, model, provider, hash,"
                " prev_hash, created_at)"
                " select gen_random_uuid(), a.ids[1 + floor(random() * cardinality(a.ids))::int],"
                " (array['inference', 'tool_call', 'e2e_check'])[1 + floor(random() * 3)::int],"
                " case when g % 5 = 0 then null else 'gpt-5' end,"
                " case when g % 5 = 0 then null else 'openai' end,"
                " md5(g::text), case when g = 1 then null else md5((g - 1)::text) end,"
                " :base + make_interval(secs => floor(random() * :w))"
                " from (select array_agg(id order by id) as ids from agents) a,"
                " generate_series(1, :n) g"
            ),
            {"n": events, "base": BASE, "w": WINDOW_S},
        )


def some_time(rng: random.Random) -> datetime | None:
    """Now, or back-dated into the seed's window (where it may or may not reach the top 12)."""
    return None if rng.random() < 0.3 else BASE + timedelta(seconds=rng.randrange(WINDOW_S))


def write_more(engine: Engine, rng: random.Random, events: int = 60) -> None:
    """Events plus one of each entity change, each in its own transaction."""
    with engine.connect() as conn:
        agents = conn.execute(text("select id, owner_id from agents order by id")).all()
        users = conn.execute(text("select id from users order by id")).scalars().all()
    with engine.begin() as conn:
        for _ in range(events):
            p.add_event(conn, rng.choice(agents).id, created_at=some_time(rng))
    moved = rng.choice(agents)
    with engine.begin() as conn:
        p.transfer_agent(conn, moved.id, rng.choice([u for u in users if u != moved.owner_id]))
    with engine.begin() as conn:
        p.rename_agent(conn, rng.choice(agents).id, f"renamed-{uuid.uuid4().hex[:6]}")
    with engine.begin() as conn:
        p.rename_user(conn, rng.choice(users), f"Moved-{uuid.uuid4().hex[:8]}")
    with engine.begin() as conn:
        p.set_display_name(conn, rng.choice(users), f"Name {rng.randrange(1000)}")
    with engine.begin() as conn:
        uid = p.create_user(conn, f"late-{uuid.uuid4().hex[:8]}", "Late Comer")
        aid = p.create_agent(conn, uid, "late-agent")
        for _ in range(3):
            p.add_event(conn, aid, created_at=some_time(rng))


def retry_after_ok(response: httpx.Response) -> bool:
    value = response.headers.get("retry-after", "")
    return value.isdigit() and int(value) > 0


def assert_all_503(http: httpx.Client, handles: list[str]) -> None:
    for handle in handles:
        response = http.get(f"/v1/users/{handle}/dashboard")
        assert response.status_code == 503, (handle, response.status_code, response.text)
        assert retry_after_ok(response), (handle, dict(response.headers))


class Reader:
    """Threads reading every user's dashboard over HTTP until stopped, judging every answer.

    A 200 must equal ``want`` (writes are paused while a Reader runs); a 503 is allowed only
    when ``allow_503`` and must carry Retry-After; anything else is a violation.
    """

    def __init__(self, base_url: str, want: Want, *, allow_503: bool, threads: int = 2) -> None:
        self.base_url = base_url
        self.want = want
        self.allow_503 = allow_503
        self.statuses: Counter[int] = Counter()
        self.violations: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]

    @property
    def reads(self) -> int:
        with self._lock:
            return sum(self.statuses.values())

    def __enter__(self) -> Reader:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self, seed_: int) -> None:
        rng = random.Random(seed_)
        handles = list(self.want)
        with httpx.Client(base_url=self.base_url, timeout=30) as http:
            while not self._stop.is_set():
                rng.shuffle(handles)
                for handle in handles:
                    if self._stop.is_set():
                        return
                    self._judge(http, handle)

    def _judge(self, http: httpx.Client, handle: str) -> None:
        try:
            response = http.get(f"/v1/users/{handle}/dashboard")
            verdict = self._verdict(response, handle)
        except Exception as exc:  # a dropped connection or an unparsable body is a violation too
            with self._lock:
                self.statuses[-1] += 1
                self.violations.append(f"{handle}: {exc!r}")
            return
        with self._lock:
            self.statuses[response.status_code] += 1
            if verdict is not None:
                self.violations.append(verdict)

    def _verdict(self, response: httpx.Response, handle: str) -> str | None:
        if response.status_code == 200:
            got = normalise(response.json())
            return None if got == self.want[handle] else f"{handle}: wrong dashboard {got}"
        if response.status_code == 503 and self.allow_503:
            return None if retry_after_ok(response) else f"{handle}: 503 without Retry-After"
        return f"{handle}: {response.status_code} {response.text[:200]}"


# -- 4. SIGKILL at any point; SIGTERM ---------------------------------------------------------
class Stream:
    """Writer threads committing a few thousand events with entity changes mixed in."""

    def __init__(self, engine: Engine, users: list[int], agents: list[int], seed_: int) -> None:
        self.engine = engine
        self.users = users
        self.agents = agents
        self.seed = seed_
        self.gone_handles: list[str] = []  # renamed away or deleted: must answer 404
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self, writers: int, transactions: int, pace_s: float) -> None:
        for wid in range(writers):
            thread = threading.Thread(
                target=self._writer, args=(wid, transactions, pace_s), daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def join(self) -> None:
        for thread in self._threads:
            thread.join(120)

    def _writer(self, wid: int, transactions: int, pace_s: float) -> None:
        rng = random.Random(self.seed * 100 + wid)
        try:
            for _ in range(transactions):
                self._one(rng)
                time.sleep(rng.uniform(0, 2 * pace_s))
        except BaseException as exc:
            self.errors.append(exc)

    def _pick(self, rng: random.Random) -> tuple[int, int]:
        with self._lock:
            return rng.choice(self.users), rng.choice(self.agents)

    def _events(self, conn: Any, rng: random.Random) -> None:
        for _ in range(rng.randint(1, 8)):
            p.add_event(conn, self._pick(rng)[1], created_at=some_time(rng))

    def _one(self, rng: random.Random) -> None:
        roll = rng.random()
        user, agent = self._pick(rng)
        if roll < 0.03:  # rolled back: leaves a permanent gap in seq
            with self.engine.connect() as conn:
                tx = conn.begin()
                self._events(conn, rng)
                tx.rollback()
        elif roll < 0.05:
            with self.engine.begin() as conn:
                p.rename_agent(conn, agent, f"agent-{uuid.uuid4().hex[:6]}")
        elif roll < 0.07:
            with self.engine.begin() as conn:
                p.transfer_agent(conn, agent, user)
        elif roll < 0.09:
            self._rename_user(rng, user)
        elif roll < 0.10:
            with self.engine.begin() as conn:
                p.set_display_name(conn, user, rng.choice([None, f"Display {rng.randrange(99)}"]))
        elif roll < 0.11:
            self._newcomer()
        elif roll < 0.12:
            self._short_lived()
        elif roll < 0.13:  # holds a low seq open while the others commit higher ones
            with self.engine.begin() as conn:
                self._events(conn, rng)
                time.sleep(rng.uniform(0.3, 1.0))
        else:
            with self.engine.begin() as conn:
                self._events(conn, rng)

    def _rename_user(self, rng: random.Random, user: int) -> None:
        with self.engine.begin() as conn:
            old = conn.execute(text("select handle from users where id = :u"), {"u": user})
            old_handle = old.scalar_one()
            p.rename_user(conn, user, f"{rng.choice(['Re', 're', 'RE'])}-{uuid.uuid4().hex[:8]}")
        with self._lock:
            self.gone_handles.append(old_handle)

    def _newcomer(self) -> None:
        with self.engine.begin() as conn:
            uid = p.create_user(conn, f"new-{uuid.uuid4().hex[:8]}")
            aid = p.create_agent(conn, uid, "fresh")
        with self._lock:
            self.users.append(uid)
            self.agents.append(aid)

    def _short_lived(self) -> None:
        """A user with an agent that never has events: the agent is deleted, then the user."""
        handle = f"brief-{uuid.uuid4().hex[:8]}"
        with self.engine.begin() as conn:
            uid = p.create_user(conn, handle)
            aid = p.create_agent(conn, uid, "never-used")
        with self.engine.begin() as conn:
            p.delete_agent(conn, aid)
        with self.engine.begin() as conn:
            p.delete_user(conn, uid)
        with self._lock:
            self.gone_handles.append(handle)


def global_height(api: TestClient, handle: str) -> int | None:
    response = api.get(f"/v1/users/{handle}/dashboard")
    if response.status_code != 200:
        return None
    return int(response.json()["chain_meta"]["global_chain_height"])


def kill_during_rebuild(rclient: redis.Redis, procs: ProcGroup, env: dict[str, str]) -> None:
    """Start a projector on an empty Redis and SIGKILL it as soon as its rebuild has begun."""
    proc = procs.projector(**env)
    deadline = time.monotonic() + 60
    while not rclient.exists(keys.CURRENT):  # once it serves, the moment has passed
        gen = rclient.get(keys.NEXT_GEN)
        if gen is not None and rclient.exists(keys.building(int(gen))):
            break
        still_waiting(deadline, proc, "the rebuild to begin")
        time.sleep(0.001)
    proc.kill()


def wait_working(api: TestClient, proc: Proc, before: int, stream: Stream) -> None:
    """Until the served global height passes ``before`` (or the writers are done)."""
    deadline = time.monotonic() + 60
    while stream.running():
        height = global_height(api, "observer")
        if height is not None and height > before:
            return
        still_waiting(deadline, proc, "the served global height to move")
        time.sleep(0.02)


@pytest.mark.timeout(200)
def test_sigkill_at_random_moments_loses_and_duplicates_nothing(
    engine: Engine,
    rclient: redis.Redis,
    api: TestClient,
    check_all: Callable[[], int],
    procs: ProcGroup,
) -> None:
    rng = random.Random(20264)
    seed(engine, users=24, agents_per_user=2, events=300)
    with engine.begin() as conn:  # owns nothing and is never touched: watches global progress
        p.create_user(conn, "observer")
        users = conn.execute(text("select id from users where handle <> 'observer'")).scalars()
        stream_users = list(users)
        stream_agents = list(conn.execute(text("select id from agents")).scalars())
    env = {"BATCH_SIZE": "25", "IDLE_POLL_SECONDS": "0.2"}
    stream = Stream(engine, stream_users, stream_agents, seed_=7)
    stream.start(writers=4, transactions=150, pace_s=0.06)

    kill_during_rebuild(rclient, procs, env)
    heights: list[int | None] = []
    while stream.running():
        before = global_height(api, "observer") or -1
        proc = procs.projector(**env)
        if rng.random() < 0.3:  # anywhere: starting up, rebuilding, or at work
            time.sleep(rng.uniform(0, 1.5))
        else:  # once it is at work, however slowly this machine started it
            wait_working(api, proc, before, stream)
            time.sleep(rng.uniform(0, 1.0))
        assert proc.alive(), f"the projector died by itself:\n{proc.log()}"
        heights.append(global_height(api, "observer"))
        proc.kill()
    stream.join()
    assert not stream.errors, stream.errors

    # One more life that gets to serve, then dies at a random moment of its catching up.
    proc = procs.projector(**env)
    deadline = time.monotonic() + 60
    while global_height(api, "observer") is None:
        still_waiting(deadline, proc, "the last life to serve")
        time.sleep(0.05)
    time.sleep(rng.uniform(0, 0.5))
    proc.kill()
    progress = sorted({h for h in heights if h is not None})
    assert len(progress) >= 3, f"the killed projectors hardly ever made progress: {heights}"
    served = api.get("/v1/users/observer/dashboard").json()["projection"]["generation"]

    procs.catch_up(**env)

    after = api.get("/v1/users/observer/dashboard").json()["projection"]["generation"]
    assert after == served, "the final catch-up rebuilt instead of resuming the killed one's work"
    with engine.connect() as conn:
        total = conn.execute(text("select count(*) from audit_events")).scalar_one()
        held = {h.lower() for h in conn.execute(text("select handle from users")).scalars()}
    assert total >= 2000, total
    assert check_all() >= 24
    for handle in stream.gone_handles:
        if handle.lower() not in held:
            assert api.get(f"/v1/users/{handle}/dashboard").status_code == 404, handle
    print(f"{len(heights) + 2} kills, {total} events, progress seen at heights {progress}")


@pytest.mark.timeout(120)
def test_sigterm_finishes_the_batch_in_hand_and_exits_zero(
    engine: Engine, api: TestClient, check_all: Callable[[], int], procs: ProcGroup
) -> None:
    seed(engine, users=12, agents_per_user=2, events=50)
    env = {"BATCH_SIZE": "20", "IDLE_POLL_SECONDS": "0.2"}
    proc = procs.projector(**env)
    deadline = time.monotonic() + 60
    while global_height(api, "Seed-1") is None:
        still_waiting(deadline, proc, "the first dashboard")
        time.sleep(0.05)
    before = global_height(api, "Seed-1")
    # A backlog it works through 20 events at a time; SIGTERM lands somewhere in it.
    bulk_events(engine, 3000)
    while global_height(api, "Seed-1") == before:
        still_waiting(deadline, proc, "the backlog to start moving")
        time.sleep(0.01)
    proc.send(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.log()

    procs.catch_up(**env)
    assert check_all() == 12

    # Idle, then SIGTERM: exits 0 as well.
    idle = procs.projector(**env)
    time.sleep(2)
    assert idle.alive(), idle.log()
    idle.send(signal.SIGTERM)
    assert idle.wait(30) == 0, idle.log()
    assert check_all() == 12


# -- 5. Redis flushed or restarted empty ------------------------------------------------------
@pytest.mark.timeout(180)
def test_redis_flushall_answers_503_until_the_projector_rebuilds_by_itself(
    engine: Engine, rclient: redis.Redis, procs: ProcGroup
) -> None:
    rng = random.Random(5)
    seed(engine, users=30, agents_per_user=2, events=600)
    projector = procs.projector(IDLE_POLL_SECONDS="0.5")
    api = procs.api()
    with httpx.Client(base_url=api.base_url, timeout=30) as http:
        want = wait_right(http, engine)
        with Reader(api.base_url, want, allow_503=True) as reader:
            # Frozen, the projector cannot win the race: every user must answer 503 now.
            projector.send(signal.SIGSTOP)
            try:
                rclient.flushall()
                assert_all_503(http, list(want))
            finally:
                projector.send(signal.SIGCONT)
            wait_right(http, engine, want)
            # And flushed under a running projector.
            rclient.flushall()
            wait_right(http, engine, want)
        assert reader.violations == [], reader.violations[:5]
        assert reader.statuses[200] > len(want), reader.statuses
        assert projector.alive(), projector.log()
        # It carries on from the generation it rebuilt.
        write_more(engine, rng)
        wait_right(http, engine)
    assert projector.alive() and api.alive()


def serving(http: httpx.Client, handle: str, proc: Proc) -> None:
    deadline = time.monotonic() + 60
    while (status := http.get(f"/v1/users/{handle}/dashboard").status_code) != 200:
        still_waiting(deadline, proc, f"{handle} to answer 200 (now {status})")
        time.sleep(0.05)


@pytest.mark.timeout(180)
def test_redis_flushed_again_while_the_projector_rebuilds(
    engine: Engine, rclient: redis.Redis, procs: ProcGroup
) -> None:
    """Redis lost again in the middle of the recovery rebuild: the worker must build again, and
    never serve the half-built generation."""
    rng = random.Random(55)
    seed(engine, users=2000, agents_per_user=1, events=3000)  # a rebuild that takes a moment
    want = oracle(engine)
    projector = procs.projector(IDLE_POLL_SECONDS="0.2")
    api = procs.api()
    mid_build = 0
    with httpx.Client(base_url=api.base_url, timeout=30) as http:
        serving(http, "Seed-1", projector)
        with Reader(api.base_url, want, allow_503=True) as reader:
            for round_ in range(4):
                rclient.flushall()
                # A flush resets the generation counter: the rebuild's marker is generation 1's.
                # Even rounds flush as soon as the build has begun (it is reading Postgres), odd
                # rounds once its first writes have landed (part of the generation is written).
                deadline = time.monotonic() + 60
                while not (
                    rclient.exists(keys.CURRENT)
                    or (
                        rclient.exists(keys.building(1))
                        and (round_ % 2 == 0 or rclient.dbsize() > 100)
                    )
                ):
                    still_waiting(deadline, projector, "the rebuild to begin")
                    time.sleep(0.001)
                time.sleep(rng.uniform(0, 0.01))
                pipe = rclient.pipeline(transaction=True)
                pipe.exists(keys.building(1))
                pipe.flushall()
                mid_build += pipe.execute()[0]
                serving(http, "Seed-1", projector)
            wait_right(http, engine, want)
        assert reader.violations == [], reader.violations[:5]
    assert mid_build >= 2, "hardly any flush landed in the middle of a rebuild"
    assert projector.alive(), projector.log()


@pytest.mark.timeout(180)
def test_redis_restarted_empty_answers_503_then_recovers_by_itself(
    engine: Engine, redis_server: RedisServer, procs: ProcGroup
) -> None:
    rng = random.Random(6)
    seed(engine, users=30, agents_per_user=2, events=600)
    projector = procs.projector(IDLE_POLL_SECONDS="0.5")
    api = procs.api()
    with httpx.Client(base_url=api.base_url, timeout=30) as http:
        want = wait_right(http, engine)
        with Reader(api.base_url, want, allow_503=True) as reader:
            redis_server.stop()
            try:
                assert_all_503(http, list(want))
                time.sleep(1)
                assert_all_503(http, list(want)[:5])
            finally:
                redis_server.start()
            wait_right(http, engine, want)
        assert reader.violations == [], reader.violations[:5]
        assert reader.statuses[503] > 0 and reader.statuses[200] > 0, reader.statuses
        assert projector.alive(), projector.log()
        write_more(engine, rng)
        wait_right(http, engine)
    assert projector.alive() and api.alive()


# -- 6. Postgres or Redis unreachable for a while ---------------------------------------------
RETRY_RE = re.compile(r"unreachable.*?retrying in ([0-9.]+)\s*s", re.IGNORECASE)


def assert_waited_with_backoff(log: str, since: int) -> None:
    delays = [float(d) for d in RETRY_RE.findall(log[since:])]
    assert len(delays) >= 2, f"no 'unreachable ... retrying in' warnings:\n{log[since:][-3000:]}"
    assert max(delays) > min(delays), f"retry delays do not back off: {delays}"


@pytest.mark.timeout(180)
def test_postgres_down_the_api_keeps_serving_and_the_projector_waits(
    restartable_engine: Engine, pg_server: PostgresServer, restartable_procs: ProcGroup
) -> None:
    engine, procs = restartable_engine, restartable_procs
    rng = random.Random(61)
    seed(engine, users=30, agents_per_user=2, events=600)
    projector = procs.projector(IDLE_POLL_SECONDS="0.2")
    api = procs.api()
    with httpx.Client(base_url=api.base_url, timeout=30) as http:
        write_more(engine, rng)
        want = wait_right(http, engine)
        mark = len(projector.log())
        with Reader(api.base_url, want, allow_503=False) as reader:
            pg_server.stop()
            try:
                time.sleep(8)
                assert projector.alive(), projector.log()
            finally:
                pg_server.start()
            time.sleep(1)
        assert reader.violations == [], reader.violations[:5]
        assert reader.statuses[200] > len(want), reader.statuses
        assert_waited_with_backoff(projector.log(), mark)
        write_more(engine, rng)
        wait_right(http, engine)
    assert projector.alive(), projector.log()


@pytest.mark.timeout(180)
def test_redis_down_for_a_while_the_projector_waits_then_catches_up(
    engine: Engine, redis_server: RedisServer, procs: ProcGroup
) -> None:
    rng = random.Random(62)
    seed(engine, users=30, agents_per_user=2, events=600)
    projector = procs.projector(IDLE_POLL_SECONDS="0.2")
    api = procs.api()
    with httpx.Client(base_url=api.base_url, timeout=30) as http:
        want = wait_right(http, engine)
        mark = len(projector.log())
        redis_server.stop()
        try:
            write_more(engine, rng)  # the platform keeps writing meanwhile
            time.sleep(4)
            assert_all_503(http, list(want)[:5])
            write_more(engine, rng)
            time.sleep(4)
            assert projector.alive(), projector.log()
        finally:
            redis_server.start()
        assert_waited_with_backoff(projector.log(), mark)
        wait_right(http, engine)
    assert projector.alive(), projector.log()


# -- 7. A rebuild under read traffic ----------------------------------------------------------
def throttle(proc: Proc, frozen_s: float = 0.03, running_s: float = 0.003) -> None:
    """Run ``proc`` about a tenth of the time until it exits, as a loaded machine might: every
    intermediate state it leaves in Redis then stays there long enough for readers to see it."""
    while proc.alive():
        proc.send(signal.SIGSTOP)
        time.sleep(frozen_s)
        proc.send(signal.SIGCONT)
        time.sleep(running_s)


@pytest.mark.timeout(180)
def test_rebuild_under_read_traffic_every_read_is_right(
    engine: Engine, rclient: redis.Redis, procs: ProcGroup
) -> None:
    rng = random.Random(7)
    seed(engine, users=400, agents_per_user=2, events=4000)
    projector = procs.projector(IDLE_POLL_SECONDS="0.2")
    api = procs.api()
    with httpx.Client(base_url=api.base_url, timeout=30) as http:
        write_more(engine, rng)  # so the served generation holds incremental work too
        want = wait_right(http, engine)
        with Reader(api.base_url, want, allow_503=False, threads=3) as reader:
            while reader.reads < 50:
                time.sleep(0.01)
            building = keys.building(int(rclient.get(keys.NEXT_GEN) or 0) + 1)
            rebuild = procs.script("scripts/rebuild.py")
            deadline = time.monotonic() + 60
            while not rclient.exists(building):
                still_waiting(deadline, rebuild, "the rebuild to begin")
                time.sleep(0.001)
            started = reader.reads
            throttle(rebuild)  # from its snapshot to its exit: build, catch-up, swap, cleanup
            during = reader.reads - started
            procs.run(rebuild)
            time.sleep(1)
        assert reader.violations == [], reader.violations[:5]
        assert during > 50, f"only {during} reads overlapped the rebuild"
        assert set(reader.statuses) == {200}, reader.statuses
        assert projector.alive(), projector.log()
        # The running projector carries on from the rebuilt generation.
        write_more(engine, rng)
        wait_right(http, engine)
    assert projector.alive(), projector.log()
