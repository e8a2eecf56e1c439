"""Leadership: one projector applies changes; any number stand by and take over.

The lease is a Postgres session advisory lock. Postgres already decides what the read model
must say, so it is also the natural judge of who writes it: the lock dies with its session,
so a leader that crashes or loses its database connection frees it at once, with no clock to
trust. A leader that is merely frozen (SIGSTOP, a long GC pause, a VM migration) would keep
its session, and with it the lock, for ever; ``idle_session_timeout`` turns the lock into a
lease: a keeper thread touches the session every third of the lease, and a session left idle
for a whole lease is ended by the server, which frees the lock for a standby.

A lease alone cannot stop a frozen leader from finishing a write it began before it froze.
So every acquisition also takes a fencing token from a Redis counter, and the batch write
(one Lua script) refuses a token that is not the latest: the new leader's first act makes
every older leader's writes no-ops (Kleppmann, "How to do distributed locking").
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import orjson
import psycopg
import redis

from models import keys
from projector.db import libpq_url

log = logging.getLogger("projector.leader")

# Any constant works; it only has to be the same in every projector of one database.
LOCK_KEY = 0x726D5F6C65616431  # "rm_lead1"
LEASE_APPLICATION_NAME = "projector-lease"


class Leadership:
    def __init__(self, database_url: str, client: redis.Redis, lease_seconds: float) -> None:
        self._dsn = libpq_url(database_url)
        self._client = client
        self._lease = lease_seconds
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._lost = threading.Event()
        self._keeper: threading.Thread | None = None
        self.token: int | None = None
        self.holder = f"{socket.gethostname()}:{os.getpid()}"

    def held(self) -> bool:
        return self._conn is not None and not self._lost.is_set()

    def try_acquire(self) -> bool:
        """Take the lease if it is free; True if this process now leads."""
        if self.held():
            return True
        self.release()
        timeout_ms = int(self._lease * 1000)
        conn = psycopg.connect(
            self._dsn,
            autocommit=True,
            connect_timeout=5,
            application_name=LEASE_APPLICATION_NAME,  # so operators can find it
            options=f"-c idle_session_timeout={timeout_ms}",
        )
        try:
            row = conn.execute("select pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
        except BaseException:
            conn.close()
            raise
        if row is None or not row[0]:
            conn.close()
            return False
        self._conn = conn
        self._lost.clear()
        self._keeper = threading.Thread(
            target=self._keep, args=(conn,), name="leader-keeper", daemon=True
        )
        self._keeper.start()
        self.new_token()
        log.info("leading (fencing token %d)", self.token)
        return True

    def new_token(self) -> int:
        """A fresh fencing token, newer than any other leader's; also published for operators."""
        token = int(self._client.incr(keys.LEADER_TOKEN))
        self.token = token
        info = {"holder": self.holder, "token": token, "since": time.time()}
        self._client.set(keys.LEADER, orjson.dumps(info))
        return token

    def confirm(self) -> bool:
        """Check the lease with a round trip now (not only at the keeper's next beat)."""
        conn = self._conn
        if conn is None or self._lost.is_set():
            return False
        try:
            conn.execute("select 1")
        except psycopg.Error:
            self._lost.set()
            return False
        return True

    def _keep(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        while not self._lost.wait(self._lease / 3):
            try:
                conn.execute("select 1")
            except psycopg.Error as exc:
                log.warning("lost the lease (%s); standing down", str(exc).strip() or exc)
                self._lost.set()

    def release(self) -> None:
        self._lost.set()
        keeper, self._keeper = self._keeper, None
        if keeper is not None and keeper is not threading.current_thread():
            keeper.join()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()  # ending the session frees the lock
        self.token = None
