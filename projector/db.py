"""The projector's Postgres: psycopg connections with the session settings its queries rely on.

The worker talks to psycopg directly. It runs a handful of hand-written statements, some with
planner settings of their own, on at most two connections at a time, so an engine and a pool
buy it nothing; and importing SQLAlchemy cost every start of the process 0.13 s (a tenth of
catching up on a 500k-event backlog). SQLAlchemy stays where it pays: the schema, the
scripts, the tests.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import IsolationLevel

# Why each setting:
# - plan_cache_mode: psycopg prepares a statement after its fifth run, and Postgres then
#   switches to a generic plan that cannot see the cursor's values. For the slice queries that
#   plan guesses a third of the table lies past the cursor and hash-joins a sequential scan of
#   every agent; measured 2.3 ms against 0.3 ms for the custom plan at 1M events, and the live
#   lag's p99 doubled at 20M. Planning each run costs a fraction of a millisecond.
# - work_mem: a backlog batch ranks half a million rows by owner; keep that sort in memory.
# - jit: the batch queries cross JIT's cost threshold, and compiling them took 10-40 ms per
#   query (more on a fresh session, which loads LLVM) for no measurable gain in running them.
APPLICATION_NAME = "projector"
SESSION_OPTIONS = "-c plan_cache_mode=force_custom_plan -c work_mem=256MB -c jit=off"
CONNECT_TIMEOUT_SECONDS = 5

Conn = psycopg.Connection[tuple[Any, ...]]


def one_row(conn: Conn, query: str, params: dict[str, Any] | None = None) -> tuple[Any, ...]:
    """The row of a query that always returns one (an aggregate, a function call)."""
    row = conn.execute(query, params).fetchone()
    assert row is not None, query
    return row


def libpq_url(url: str) -> str:
    """A DATABASE_URL as libpq takes it (settings normalise it to SQLAlchemy's dialect form)."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


class Database:
    """Connections to one database, the idle ones kept for the next transaction.

    A kept connection is checked with a round trip before it is handed out (Postgres may have
    restarted, or an operator ended the session, while it sat idle), and a connection that
    failed in use is closed rather than kept: the caller's retry then starts on a fresh one.
    """

    def __init__(self, url: str, *, keep: int = 2, application_name: str = APPLICATION_NAME):
        self.dsn = libpq_url(url)
        self._keep = keep
        self._application_name = application_name
        self._idle: list[Conn] = []
        self._lock = threading.Lock()

    def connect(self) -> Conn:
        return psycopg.connect(
            self.dsn,
            autocommit=True,  # transactions are explicit: see ``transaction``
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            options=SESSION_OPTIONS,
            application_name=self._application_name,
        )

    @contextmanager
    def transaction(self, *, repeatable_read: bool = False) -> Iterator[Conn]:
        """A connection inside one transaction, committed when the block ends without error."""
        conn = self._take()
        try:
            conn.isolation_level = IsolationLevel.REPEATABLE_READ if repeatable_read else None
            with conn.transaction():
                yield conn
        finally:
            # Committed, or rolled back by the block; a connection broken by a failure is not kept.
            self._give_back(conn)

    def _take(self) -> Conn:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self.connect()
            try:
                conn.execute("select 1")
                return conn
            except psycopg.Error:
                conn.close()

    def _give_back(self, conn: Conn) -> None:
        usable = not conn.closed and not conn.broken
        with self._lock:
            if usable and len(self._idle) < self._keep:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
