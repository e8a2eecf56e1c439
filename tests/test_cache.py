"""The API's in-process cache: exact by invalidation, never serving what Redis no longer has."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import pytest
import redis
import uvloop
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.cache import DashboardCache, listen
from models import keys
from scripts import platform_sim as p
from scripts.throwaway import RedisServer


def _live_cache(unread: list[int] | None = None) -> DashboardCache:
    """A cache fed by a (pretend) connection with ``unread[0]`` bytes not yet read."""
    pending = unread if unread is not None else [0]
    cache = DashboardCache()
    cache.attach(lambda: pending[0])
    return cache


def test_hit_splices_document_and_tail() -> None:
    cache = _live_cache()
    cache.put(cache.epoch, "alice", 3, 7, b'{"a":1', b"TAIL")
    assert cache.get("alice") == b'{"a":1TAIL'
    assert cache.get("bob") is None


def test_write_to_the_users_document_or_handle_evicts_it() -> None:
    for changed in (keys.user_doc(3, 7), keys.handle(3, "alice")):
        cache = _live_cache()
        cache.put(cache.epoch, "alice", 3, 7, b"doc", b"tail")
        cache.put(cache.epoch, "bob", 3, 8, b"doc", b"tail")
        cache.invalidate([changed.encode()])
        assert cache.get("alice") is None
        assert cache.get("bob") == b"doctail"


def test_tail_change_evicts_the_shared_tail_only() -> None:
    cache = _live_cache()
    cache.put(cache.epoch, "alice", 3, 7, b"doc", b"tail")
    cache.invalidate([keys.global_hash(3).encode()])
    assert cache.get("alice") is None
    cache.put(cache.epoch, "bob", 3, 8, b"doc2", b"tail2")
    assert cache.get("alice") == b"doctail2"


def test_flush_and_generation_swap_empty_the_cache() -> None:
    for changed in (None, [keys.CURRENT.encode()]):
        cache = _live_cache()
        cache.put(cache.epoch, "alice", 3, 7, b"doc", b"tail")
        cache.invalidate(changed)
        assert cache.get("alice") is None
        assert len(cache) == 0


def test_read_that_raced_an_invalidation_is_not_cached() -> None:
    cache = _live_cache()
    epoch = cache.epoch
    cache.invalidate([b"rm:g3:{u99}:doc"])  # arrives while the read is in flight
    cache.put(epoch, "alice", 3, 7, b"stale", b"tail")
    assert cache.get("alice") is None


def test_no_hit_while_the_feed_has_unread_bytes() -> None:
    unread = [0]
    cache = _live_cache(unread)
    cache.put(cache.epoch, "alice", 3, 7, b"doc", b"tail")
    unread[0] = 87  # an invalidation may be waiting in the socket
    assert cache.get("alice") is None
    unread[0] = 0
    assert cache.get("alice") == b"doctail"


def test_nothing_is_cached_without_the_invalidation_feed() -> None:
    cache = DashboardCache()
    cache.put(cache.epoch, "alice", 3, 7, b"doc", b"tail")
    assert cache.get("alice") is None
    cache.attach(lambda: 0)
    cache.put(cache.epoch, "alice", 3, 7, b"doc", b"tail")
    cache.set_live(False)  # the feed dropped: messages may be lost from here on
    assert cache.get("alice") is None


def _wait(predicate: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_cached_answers_follow_writes_and_flushes(
    engine: Engine, catch_up: Callable[[], None], api: TestClient, rclient: redis.Redis
) -> None:
    with engine.begin() as conn:
        uid = p.create_user(conn, "cached")
        agent = p.create_agent(conn, uid, "a")
        p.add_event(conn, agent)
    catch_up()
    store = api.app.state.store  # type: ignore[attr-defined]
    assert _wait(lambda: store.cache.live)
    first = api.get("/v1/users/cached/dashboard").json()
    assert len(store.cache) == 1  # the answer is now served from memory
    with engine.begin() as conn:
        _, seq = p.add_event(conn, agent)
    catch_up()
    # No waiting: once the write has returned, no answer may predate it.
    assert api.get("/v1/users/cached/dashboard").json()["recent_events"][0]["seq"] == seq
    assert first["recent_events"][0]["seq"] < seq
    rclient.flushall()
    assert api.get("/v1/users/cached/dashboard").status_code == 503
    assert len(store.cache) == 0


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_feed_goes_live_and_evicts_on_both_event_loops(
    loop: str, rclient: redis.Redis, redis_server: RedisServer
) -> None:
    """uvicorn runs on uvloop when it is installed, whose transports differ from asyncio's."""

    async def scenario() -> tuple[bool, bytes | None, bytes | None]:
        cache = DashboardCache()
        feed = asyncio.create_task(listen(redis_server.url, cache))
        try:
            for _ in range(200):
                if cache.live:
                    break
                await asyncio.sleep(0.01)
            cache.put(cache.epoch, "alice", 3, 7, b"doc", b"tail")
            hit = cache.get("alice")
            rclient.set(keys.user_doc(3, 7), b"changed")
            for _ in range(200):
                if cache.get("alice") is None:
                    break
                await asyncio.sleep(0.01)
            return cache.live, hit, cache.get("alice")
        finally:
            feed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feed

    run = uvloop.run if loop == "uvloop" else asyncio.run
    live, hit, after_write = run(scenario())
    assert live
    assert hit == b"doctail"
    assert after_write is None
