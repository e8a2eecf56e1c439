"""Live writers: the platform's plain SQL (scripts/platform_sim.py) from several threads.

Events (some back-dated, some sharing an instant), bursts by the noisy tenant, transfers, agent
renames, handle changes, display names, new users and agents, deletions of agents without
events and of users without agents; some transactions roll back, some are held open while the
others commit. What Postgres refuses under that concurrency (a handle taken meanwhile, an agent
deleted meanwhile, a deadlock) and what fails while Postgres restarts are counted, not fatal.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg.errors
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from scripts import platform_sim as p
from scripts.soakkit.world import NOISY, OBSERVER

REFUSALS = (
    psycopg.errors.UniqueViolation,
    psycopg.errors.ForeignKeyViolation,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
)
HOLD = 0.02  # of transactions kept open a while after their writes
ROLLBACK = 0.05
REFRESH_EVERY = 40  # transactions between re-reads of the user and agent ids


def _outage(exc: DBAPIError) -> bool:
    """Postgres is restarting: the connection broke or the server refuses connections."""
    return (
        isinstance(exc, OperationalError | InterfaceError)
        or exc.connection_invalidated
        or isinstance(exc.orig, psycopg.OperationalError)
    )


class Writer:
    """One thread's random transactions; ``tag`` keeps its new names unique."""

    def __init__(self, engine: Engine, seed: int, tag: str, shared: Writers) -> None:
        self.engine = engine
        self.rng = random.Random(seed)
        self.tag = tag
        self.shared = shared
        self.n = 0
        self.users: list[int] = []
        self.agents: list[int] = []
        self.noisy_agents: list[int] = []
        self.ties = [datetime.now(UTC) + timedelta(seconds=s) for s in (-5, 30, 300)]
        self.ops: list[tuple[int, Callable[[Connection], int]]] = [
            (40, self.events),
            (3, self.burst),
            (8, self.transfer),
            (5, self.rename_agent),
            (4, self.rename_user),
            (3, self.display_name),
            (2, self.new_user),
            (3, self.new_agent),
            (2, self.delete_agent),
            (1, self.delete_user),
        ]

    def name(self, kind: str) -> str:
        self.n += 1
        return f"{kind}-{self.tag}-{self.n}"

    def when(self) -> datetime | None:
        r = self.rng.random()
        if r < 0.1:  # back-dated, from a minute to a week
            return datetime.now(UTC) - timedelta(seconds=self.rng.uniform(60, 7 * 86400))
        if r < 0.2:  # one of a few instants shared by many events
            return self.rng.choice(self.ties)
        return None  # now(): the transaction's start

    def refresh(self, conn: Connection) -> None:
        def ids(sql: str) -> list[int]:
            return list(conn.execute(text(sql), {"noisy": NOISY, "obs": OBSERVER}).scalars())

        self.users = ids("select id from users where handle <> :obs order by id")
        self.agents = ids("select id from agents order by id")
        self.noisy_agents = ids(
            "select a.id from agents a join users u on u.id = a.owner_id"
            " where u.handle = :noisy order by a.id"
        )

    # -- operations: each returns the number of events it wrote ---------------------------------
    def events(self, conn: Connection) -> int:
        count = self.rng.randint(1, 4)
        for _ in range(count):
            p.add_event(conn, self.rng.choice(self.agents), created_at=self.when())
        return count

    def burst(self, conn: Connection) -> int:
        agents = self.noisy_agents or self.agents
        count = self.rng.randint(20, 120)
        for _ in range(count):
            p.add_event(conn, self.rng.choice(agents), "e2e.test", created_at=self.when())
        return count

    def transfer(self, conn: Connection) -> int:
        p.transfer_agent(conn, self.rng.choice(self.agents), self.rng.choice(self.users))
        return 0

    def rename_agent(self, conn: Connection) -> int:
        p.rename_agent(conn, self.rng.choice(self.agents), self.name("agent"))
        return 0

    def rename_user(self, conn: Connection) -> int:
        user = self.rng.choice(self.users)
        old = conn.execute(text("select handle from users where id = :u"), {"u": user}).scalar()
        if old is None or old == NOISY:
            return 0  # deleted meanwhile; the noisy tenant keeps its name (bursts find it so)
        handle = self.name("h")
        p.rename_user(conn, user, handle.upper() if self.rng.random() < 0.3 else handle)
        self.shared.gone(str(old))
        return 0

    def display_name(self, conn: Connection) -> int:
        name = None if self.rng.random() < 0.3 else self.name("Display")
        p.set_display_name(conn, self.rng.choice(self.users), name)
        return 0

    def new_user(self, conn: Connection) -> int:
        uid = p.create_user(conn, self.name("user"), self.name("New User"))
        if self.rng.random() < 0.5:
            p.add_event(conn, p.create_agent(conn, uid, self.name("agent")), created_at=self.when())
            return 1
        return 0

    def new_agent(self, conn: Connection) -> int:
        p.create_agent(conn, self.rng.choice(self.users), self.name("agent"))
        return 0

    def delete_agent(self, conn: Connection) -> int:
        idle = conn.execute(
            text(
                "select a.id from agents a where not exists"
                " (select 1 from audit_events e where e.agent_id = a.id) order by a.id desc"
                " limit 20"
            )
        ).scalars()
        choices = list(idle)
        if choices:
            p.delete_agent(conn, self.rng.choice(choices))
        return 0

    def delete_user(self, conn: Connection) -> int:
        empty = conn.execute(
            text(
                "select u.id, u.handle from users u where not exists"
                " (select 1 from agents a where a.owner_id = u.id)"
                " and u.handle not in (:obs, :noisy) order by u.id desc limit 20"
            ),
            {"obs": OBSERVER, "noisy": NOISY},
        ).all()
        if empty:
            row = self.rng.choice(empty)
            p.delete_user(conn, row.id)
            self.shared.gone(row.handle)
        return 0

    # -- transactions ---------------------------------------------------------------------------
    def transaction(self) -> None:
        weights = [w for w, _ in self.ops]
        size = self.rng.choice((1, 1, 2))
        picks = self.rng.choices([op for _, op in self.ops], weights=weights, k=size)
        held = self.rng.random() < HOLD
        rolled = self.rng.random() < ROLLBACK
        try:
            with self.engine.connect() as conn:
                if not self.users or self.rng.randrange(REFRESH_EVERY) == 0:
                    self.refresh(conn)
                    conn.commit()
                tx = conn.begin()
                written = sum(op(conn) for op in picks)
                if held:
                    time.sleep(self.rng.uniform(0.3, 1.0))
                if rolled:
                    tx.rollback()
                    self.shared.count("rolled back")
                    return
                tx.commit()
            self.shared.count("committed", written)
        except DBAPIError as exc:
            if isinstance(exc.orig, REFUSALS):
                self.shared.count("refused by postgres")
                self.users = []  # stale ids, most likely
            elif _outage(exc):
                self.shared.count("failed: postgres unreachable")
                time.sleep(0.2)
            else:
                raise


class Writers:
    """``count`` writer threads; pause() waits until none is inside a transaction."""

    def __init__(self, engine: Engine, *, count: int, seed: int, pace_s: float) -> None:
        self.pace_s = pace_s
        self.outcomes: Counter[str] = Counter()
        self.events_committed = 0
        self.gone_handles: list[str] = []  # renamed away or deleted: must answer 404
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._run = threading.Event()
        self._stop = threading.Event()
        self._idle = [threading.Event() for _ in range(count)]
        self._writers = [Writer(engine, seed * 100 + k, f"w{k}", self) for k in range(count)]
        self._threads = [
            threading.Thread(target=self._loop, args=(k,), name=f"writer-{k}", daemon=True)
            for k in range(count)
        ]

    def count(self, outcome: str, events: int = 0) -> None:
        with self._lock:
            self.outcomes[outcome] += 1
            self.events_committed += events

    def gone(self, handle: str) -> None:
        with self._lock:
            if len(self.gone_handles) < 5000:
                self.gone_handles.append(handle)

    def start(self) -> None:
        self._run.set()
        for thread in self._threads:
            thread.start()

    def pause(self, timeout: float = 60.0) -> bool:
        self._run.clear()
        deadline = time.monotonic() + timeout
        for idle, thread in zip(self._idle, self._threads, strict=True):
            while thread.is_alive() and not idle.wait(0.1):
                if time.monotonic() > deadline:
                    return False
        return True

    def stop(self) -> None:
        self._stop.set()
        self._run.set()
        for thread in self._threads:
            thread.join(30)

    def _loop(self, k: int) -> None:
        writer = self._writers[k]
        try:
            while not self._stop.is_set():
                if not self._run.is_set():
                    self._idle[k].set()
                    self._run.wait()
                    continue
                self._idle[k].clear()
                if not self._run.is_set():  # paused between the two checks
                    continue
                writer.transaction()
                time.sleep(writer.rng.uniform(0, 2 * self.pace_s))
        except Exception as exc:  # a writer that breaks is a failure of the soak itself
            with self._lock:
                self.errors.append(f"{writer.tag}: {exc!r}"[:500])
        finally:
            self._idle[k].set()
