"""The soak's progress line, and the handles its readers ask for."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from scripts.soakkit.world import World, say


class Ticker:
    """The progress line: in place once a second on a terminal, a new line every 30 s if not.
    Every third second it also calls ``refresh``."""

    def __init__(self, line: Callable[[], str], refresh: Callable[[], None]) -> None:
        self.line, self.refresh = line, refresh
        self.tty = sys.stdout.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ticker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.tty:
            print(flush=True)

    def _run(self) -> None:
        ticks = 0
        while not self._stop.wait(1.0):
            ticks += 1
            if ticks % 3 == 0:
                self.refresh()
            if self.tty:
                print(f"\r{self.line()[:200]:<200}", end="", flush=True)
            elif ticks % 30 == 0:
                say(self.line())


class Handles:
    """Current handles, re-read from Postgres on ``refresh`` (kept while Postgres is down)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.current: list[str] = []
        self.refresh()

    def refresh(self) -> None:
        try:
            with self.world.engine.connect() as conn:
                query = text("select handle from users order by id")
                self.current = list(conn.execute(query).scalars())
        except DBAPIError:
            pass

    def get(self) -> list[str]:
        return self.current
