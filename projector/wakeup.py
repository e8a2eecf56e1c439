"""LISTEN/NOTIFY, so the idle worker wakes at a commit instead of sleeping out a poll."""

from __future__ import annotations

import logging
import time

import psycopg

from projector.db import libpq_url

log = logging.getLogger("projector.wakeup")


class Wakeup:
    def __init__(self, database_url: str) -> None:
        self._dsn = libpq_url(database_url)
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None

    def _connect(self) -> psycopg.Connection[tuple[object, ...]]:
        conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=5)
        conn.execute("listen projector")
        return conn

    def wait(self, timeout: float) -> None:
        """Return at the next NOTIFY, or after ``timeout`` seconds, whichever comes first."""
        started = time.monotonic()
        try:
            if self._conn is None:
                self._conn = self._connect()
            for _ in self._conn.notifies(timeout=timeout, stop_after=1):
                pass
        except psycopg.Error as exc:
            # The worker still polls without it; reconnect on the next wait.
            log.debug("listen connection lost: %s", exc)
            self.close()
            time.sleep(max(0.0, timeout - (time.monotonic() - started)))

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
