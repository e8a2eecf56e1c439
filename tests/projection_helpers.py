"""Helpers shared by the ordering, entity and differential tests (not fixtures: plain functions).

Everything expected comes from the seed SQL in tests/oracle.py or from the test's own scenario;
nothing here asks the code under test what the answer should be.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from typing import Any

import orjson
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Connection, Engine, text

from models import keys
from models.settings import ProjectorSettings
from projector.db import Database
from projector.worker import Projector
from tests.oracle import expected, normalise

DEADLINE_SECONDS = 90.0


class Worker(threading.Thread):
    """A thread that keeps its exception for the test to re-raise (filterwarnings=error)."""

    def __init__(self, target: Callable[[], None], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._fn = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._fn()
        except BaseException as exc:  # re-raised by finish()
            self.error = exc

    def finish(self, timeout: float = 60.0) -> None:
        self.join(timeout)
        assert not self.is_alive(), f"thread {self.name} did not stop within {timeout}s"
        if self.error is not None:
            raise self.error


class LiveProjector:
    """``Projector(...).run(stop)`` in a thread with its own Redis client, for a ``with`` block."""

    def __init__(self, settings: ProjectorSettings) -> None:
        self.stop = threading.Event()
        self.client = redis.Redis.from_url(settings.redis_url)
        self.db = Database(settings.database_url)
        self.projector = Projector(self.db, self.client, settings)
        self.thread = Worker(lambda: self.projector.run(self.stop), "live-projector")

    def __enter__(self) -> LiveProjector:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        try:
            self.thread.finish(60.0)
        finally:
            self.client.close()
            self.db.close()

    def assert_alive(self) -> None:
        if not self.thread.is_alive():
            self.thread.finish(0)
            raise AssertionError("the live projector stopped on its own")


@contextmanager
def writers_running(targets: list[Callable[[threading.Event], None]]) -> Iterator[list[Worker]]:
    """Start writer threads; on leaving, even on a failure, ask them to stop and join them."""
    stop = threading.Event()
    threads = [Worker(partial(target, stop), f"writer-{i}") for i, target in enumerate(targets)]
    for thread in threads:
        thread.start()
    try:
        yield threads
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    for thread in threads:
        thread.finish(0)


def drain(projector: Projector) -> int:
    """Apply every batch the projector can read now (up to the horizon); return events+changes."""
    total = 0
    while True:
        applied = projector.step().applied
        if not applied:
            return total
        total += applied


def wait_until(check: Callable[[], object], what: str, timeout: float = DEADLINE_SECONDS) -> float:
    """Poll ``check`` until it returns a falsy value (no mismatch); return seconds waited.

    ``check`` returns a description of what is still wrong, or something falsy when all is
    right, so a timeout reports the last difference seen.
    """
    started = time.monotonic()
    last: object = None
    while time.monotonic() - started < timeout:
        last = check()
        if not last:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"{what}: still wrong after {timeout}s: {last!r}"[:6000])


def wait_for(check: Callable[[], object], what: str, timeout: float = DEADLINE_SECONDS) -> float:
    """Poll ``check`` until it returns something truthy; return seconds waited."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"still waiting for {what}"
        time.sleep(0.02)
    return time.monotonic() - started


def all_agree(check_all: Callable[[], int]) -> Callable[[], str | None]:
    """For wait_until: None once every user's answer equals the SQL, else the last difference."""

    def check() -> str | None:
        try:
            check_all()
        except AssertionError as exc:
            return str(exc)
        return None

    return check


def answer(api: TestClient, handle: str) -> tuple[int, dict[str, Any] | None]:
    response = api.get(f"/v1/users/{handle}/dashboard")
    return response.status_code, response.json() if response.status_code == 200 else None


def mismatches(engine: Engine, api: TestClient, user_ids: Iterable[int] | None = None) -> list[Any]:
    """Users whose API answer differs from the seed SQL right now (empty list: all equal)."""
    wrong: list[Any] = []
    with engine.connect() as conn:
        rows = conn.execute(text("select id, handle from users order by id")).all()
        wanted = None if user_ids is None else set(user_ids)
        for row in rows:
            if wanted is not None and row.id not in wanted:
                continue
            status, body = answer(api, row.handle)
            want = expected(conn, row.id)
            if status != 200 or body is None:
                wrong.append((row.handle, status))
            elif normalise(body) != want:
                wrong.append((row.handle, difference(want, normalise(body))))
    return wrong


def difference(want: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    """The fields that differ, events shortened to their seqs when only the list differs."""
    out: dict[str, Any] = {}
    for key in want.keys() | got.keys():
        if want.get(key) == got.get(key):
            continue
        if key == "recent_events":
            w, g = want[key], got.get(key) or []
            if [e["seq"] for e in w] != [e["seq"] for e in g]:
                out["seqs"] = {"want": [e["seq"] for e in w], "got": [e["seq"] for e in g]}
                continue
        out[key] = {"want": want.get(key), "got": got.get(key)}
    return out


def seqs_shown(api: TestClient, handle: str) -> list[int]:
    status, body = answer(api, handle)
    assert status == 200 and body is not None, (handle, status)
    return [e["seq"] for e in body["recent_events"]]


def committed_seqs(conn: Connection, user_id: int | None = None) -> set[int]:
    if user_id is None:
        return set(conn.execute(text("select seq from audit_events")).scalars())
    return set(
        conn.execute(
            text(
                "select e.seq from audit_events e join agents a on a.id = e.agent_id"
                " where a.owner_id = :u"
            ),
            {"u": user_id},
        ).scalars()
    )


def take_xid(conn: Connection) -> int:
    """Give the connection's open transaction its transaction id now (xids are lazy)."""
    return int(conn.execute(text("select pg_current_xact_id()::text")).scalar_one())


def assert_sane(body: dict[str, Any], committed_ids: set[str]) -> None:
    """What must hold of any answer at any moment, even mid-stream."""
    events = body["recent_events"]
    seqs = [e["seq"] for e in events]
    assert len(seqs) == len(set(seqs)), f"an event shown twice: {seqs}"
    assert len(events) <= keys.TOP_N
    order = [(datetime.fromisoformat(e["created_at"]), e["seq"]) for e in events]
    assert order == sorted(order, reverse=True), f"not by created_at desc, seq desc: {order}"
    unknown = {e["id"] for e in events} - committed_ids
    assert not unknown, f"events shown that no committed transaction wrote: {unknown}"
    height = body["chain_meta"]["owner_chain_height"]
    assert all(s <= height for s in seqs), (seqs, height)


# -- the whole live generation, for rebuild == incremental ---------------------------------------
def dump_live_generation(client: redis.Redis) -> dict[str, Any]:
    """Every key of the served generation, generation number stripped from the names.

    The projection's own position (cursor and freshness tail) is left out: an incremental run
    and a rebuild stand at differently spelled positions of the same data. The global chain
    height is kept.
    """
    gen = int(client.get(keys.CURRENT) or 0)
    assert gen, "no generation is being served"
    prefix = keys.gen_prefix(gen)
    out: dict[str, Any] = {}
    for raw in client.scan_iter(match=keys.gen_pattern(gen), count=1000):
        name = raw.decode()
        short = name[len(prefix) :]
        kind = client.type(name).decode()
        if kind == "string":
            value: Any = client.get(name)
            out[short] = orjson.loads(value) if short.endswith(":doc") else value.decode()
        elif kind == "hash":
            fields = {k.decode(): v for k, v in client.hgetall(name).items()}
            if name == keys.global_hash(gen):
                fields = {keys.GLOBAL_HEIGHT: fields.get(keys.GLOBAL_HEIGHT)}
            out[short] = {k: v.decode() for k, v in fields.items() if v is not None}
        else:
            out[short] = f"<{kind}>"
    return out


def api_documents(engine: Engine, api: TestClient) -> dict[str, Any]:
    """Every user's API answer, without the ``projection`` freshness object."""
    docs: dict[str, Any] = {}
    with engine.connect() as conn:
        for row in conn.execute(text("select id, handle from users order by id")):
            status, body = answer(api, row.handle)
            assert status == 200 and body is not None, (row.handle, status)
            body.pop("projection", None)
            docs[row.handle] = body
    return docs
