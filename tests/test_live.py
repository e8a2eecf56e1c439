"""Issue 5, live updates: ?min_seq= read-your-writes and the SSE stream, on a real uvicorn.

The API runs as a process (tests/procs.py); the read model is kept by the in-process projector
(``catch_up``) or a real ``python -m projector``. No timing is asserted: a wait that must end
is bounded by the client's read timeout, and a wait that must not end yet is shown by the
answer's content (not stale, the new event present).
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
import redis
from sqlalchemy import Engine

from api.cache import DashboardCache
from api.changes import ChangeHub
from api.live import event_id, mark_stale
from api.store import DashboardStore
from models import keys
from models.dashboard import Dashboard
from scripts import platform_sim as p
from tests.oracle import expected, normalise
from tests.procs import ApiProc, ProcGroup

READ_TIMEOUT = 20.0  # a stream that should deliver but does not fails here, not hangs
# Idle streams send a heartbeat this often in these tests, so a reader waiting for an event
# that never comes wakes up to notice its deadline.
HEARTBEAT = "1"


def _api(procs: ProcGroup, heartbeat: str = HEARTBEAT) -> ApiProc:
    procs.env["SSE_HEARTBEAT_SECONDS"] = heartbeat
    return procs.api()


@dataclass
class Event:
    name: str = "message"
    id: str | None = None
    data: str = ""
    comments: list[str] = field(default_factory=list)

    def json(self) -> dict[str, Any]:
        loaded: dict[str, Any] = orjson.loads(self.data)
        return loaded


class Stream:
    """A Server-Sent Events reader over one httpx streaming response."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.iter_lines()

    def next(self) -> Event:
        """The next dispatched event or comment block (a blank line ends each)."""
        event = Event()
        seen = False
        for line in self._lines:
            if line == "":
                if seen:
                    return event
                continue
            seen = True
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "":
                event.comments.append(value)
            elif name == "event":
                event.name = value
            elif name == "id":
                event.id = value
            elif name == "data":
                event.data = value if not event.data else event.data + "\n" + value
        raise AssertionError("the stream ended")

    def next_event(self) -> Event:
        """The next event with data, skipping heartbeat comments."""
        deadline = time.monotonic() + READ_TIMEOUT
        while time.monotonic() < deadline:
            event = self.next()
            if event.data or event.name == "gone":
                return event
        raise AssertionError(f"no event within {READ_TIMEOUT}s, only heartbeats")

    def until(self, predicate: Callable[[dict[str, Any]], bool]) -> Event:
        deadline = time.monotonic() + READ_TIMEOUT
        while time.monotonic() < deadline:
            event = self.next_event()
            if event.name == "dashboard" and predicate(event.json()):
                return event
        raise AssertionError(f"no such dashboard within {READ_TIMEOUT}s")


@contextmanager
def stream(api: ApiProc, handle: str, **headers: str) -> Iterator[Stream]:
    timeout = httpx.Timeout(10.0, read=READ_TIMEOUT)
    with (
        httpx.Client(base_url=api.base_url, timeout=timeout) as http,
        http.stream("GET", f"/v1/users/{handle}/dashboard/stream", headers=headers) as response,
    ):
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Stream(response)


def _seed(engine: Engine, handle: str = "writer") -> tuple[int, int, int]:
    with engine.begin() as conn:
        uid = p.create_user(conn, handle, "The Writer")
        agent = p.create_agent(conn, uid, "scribe")
        _, seq = p.add_event(conn, agent, model="claude-opus-4", provider="anthropic")
    return uid, agent, seq


def _add(engine: Engine, agent: int) -> int:
    with engine.begin() as conn:
        return p.add_event(conn, agent)[1]


def _oracle(engine: Engine, uid: int) -> dict[str, Any]:
    with engine.connect() as conn:
        return expected(conn, uid)


# -- ?min_seq= ---------------------------------------------------------------------------------


def test_min_seq_answer_waits_until_the_projector_applied_the_event(
    engine: Engine, catch_up: Callable[[], None], procs: ProcGroup
) -> None:
    uid, agent, _ = _seed(engine)
    catch_up()
    api = _api(procs)
    seq = _add(engine, agent)  # committed, not projected yet
    answer: dict[str, httpx.Response] = {}

    def ask() -> None:
        with httpx.Client(base_url=api.base_url, timeout=10) as http:
            answer["r"] = http.get(
                "/v1/users/writer/dashboard", params={"min_seq": seq, "wait_ms": 5000}
            )

    waiter = threading.Thread(target=ask)
    waiter.start()
    # The request is waiting, not answered stale: nothing has applied the event yet.
    waiter.join(0.5)
    assert waiter.is_alive()
    catch_up()
    waiter.join(10)
    response = answer["r"]
    assert response.status_code == 200
    body = response.json()
    assert body["recent_events"][0]["seq"] == seq
    assert body["chain_meta"]["owner_chain_height"] == seq
    assert "stale" not in body["projection"]
    assert "x-projection-stale" not in response.headers
    assert normalise(body) == _oracle(engine, uid)


def test_min_seq_timeout_answers_what_there_is_marked_stale(
    engine: Engine, catch_up: Callable[[], None], procs: ProcGroup
) -> None:
    _, agent, first = _seed(engine)
    catch_up()
    api = _api(procs)
    seq = _add(engine, agent)  # never projected in this test
    with httpx.Client(base_url=api.base_url, timeout=10) as http:
        stale = http.get("/v1/users/writer/dashboard", params={"min_seq": seq, "wait_ms": 200})
        plain = http.get("/v1/users/writer/dashboard")
        met = http.get("/v1/users/writer/dashboard", params={"min_seq": first, "wait_ms": 0})
    assert stale.status_code == 200
    assert stale.headers["x-projection-stale"] == "true"
    body = Dashboard.model_validate_json(stale.content)
    assert body.projection.stale is True
    assert body.chain_meta.owner_chain_height == first
    assert stale.json()["projection"]["stale"] is True
    # Without min_seq (or with one already met) the body is the projector's, with no stale key.
    for fresh in (plain, met):
        assert fresh.status_code == 200
        assert "stale" not in fresh.json()["projection"]
        assert "x-projection-stale" not in fresh.headers
        assert Dashboard.model_validate_json(fresh.content).projection.stale is False
    assert mark_stale(plain.content) == stale.content
    # The freshness headers of the plain answer, and an ETag of these bytes, not of those.
    assert stale.headers["x-projection-position"] == plain.headers["x-projection-position"]
    assert stale.headers["etag"] != plain.headers["etag"]


def test_min_seq_and_wait_ms_are_validated(
    engine: Engine, catch_up: Callable[[], None], procs: ProcGroup
) -> None:
    _seed(engine)
    catch_up()
    api = _api(procs)
    with httpx.Client(base_url=api.base_url, timeout=10) as http:
        for params in ({"min_seq": 1, "wait_ms": 5001}, {"min_seq": -1}, {"min_seq": "x"}):
            response = http.get("/v1/users/writer/dashboard", params=params)
            assert response.status_code == 422, params
            assert response.json()["detail"]
        assert (
            http.get("/v1/users/writer/dashboard", params={"min_seq": 1, "wait_ms": 5000})
        ).status_code == 200
        unknown = http.get("/v1/users/nobody/dashboard", params={"min_seq": 1, "wait_ms": 100})
        assert unknown.status_code == 404


def test_min_seq_waits_for_a_user_not_projected_yet(
    engine: Engine, catch_up: Callable[[], None], procs: ProcGroup
) -> None:
    _seed(engine)
    catch_up()  # a read model exists, without the new user
    api = _api(procs)
    uid, _, seq = _seed(engine, "newcomer")
    answer: dict[str, httpx.Response] = {}

    def ask() -> None:
        with httpx.Client(base_url=api.base_url, timeout=10) as http:
            answer["r"] = http.get(
                "/v1/users/newcomer/dashboard", params={"min_seq": seq, "wait_ms": 5000}
            )

    waiter = threading.Thread(target=ask)
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()  # not answered 404: the handle is waited for too
    catch_up()
    waiter.join(10)
    assert answer["r"].status_code == 200
    assert normalise(answer["r"].json()) == _oracle(engine, uid)


def test_min_seq_without_read_model_is_503(procs: ProcGroup) -> None:
    api = _api(procs)
    with httpx.Client(base_url=api.base_url, timeout=10) as http:
        response = http.get("/v1/users/writer/dashboard", params={"min_seq": 1, "wait_ms": 5000})
    assert response.status_code == 503
    assert response.headers["retry-after"]


# -- the stream --------------------------------------------------------------------------------


def test_stream_sends_the_current_dashboard_then_each_change(
    engine: Engine, procs: ProcGroup
) -> None:
    uid, agent, _ = _seed(engine)
    procs.catch_up()
    projector = procs.projector()  # live from here on
    api = _api(procs)
    with stream(api, "Writer") as events:
        first = events.next_event()
        assert first.name == "dashboard"
        assert first.id == event_id(first.data.encode())
        assert normalise(first.json()) == _oracle(engine, uid)
        for _ in range(3):
            seq = _add(engine, agent)
            got = events.until(lambda d, s=seq: d["chain_meta"]["owner_chain_height"] >= s)
            body = got.json()
            assert body["recent_events"][0]["seq"] == seq
            assert Dashboard.model_validate(body)
            assert got.id == event_id(got.data.encode())
    assert projector.alive()
    assert normalise(got.json()) == _oracle(engine, uid)


def test_reconnect_with_last_event_id_gets_the_current_state_at_once(
    engine: Engine, catch_up: Callable[[], None], procs: ProcGroup
) -> None:
    uid, agent, _ = _seed(engine)
    catch_up()
    api = _api(procs)
    with stream(api, "writer") as events:
        seen = events.next_event()
    assert seen.id
    seq = _add(engine, agent)
    catch_up()  # applied while the client was away
    with stream(api, "writer", **{"Last-Event-ID": seen.id}) as events:
        again = events.next_event()
    assert again.name == "dashboard"
    assert again.id != seen.id
    assert again.json()["recent_events"][0]["seq"] == seq
    assert normalise(again.json()) == _oracle(engine, uid)


def test_idle_stream_sends_heartbeat_comments(
    engine: Engine, catch_up: Callable[[], None], procs: ProcGroup
) -> None:
    _seed(engine)
    catch_up()
    api = _api(procs, heartbeat="0.2")
    with stream(api, "writer") as events:
        assert events.next().name == "dashboard"
        for _ in range(2):
            beat = events.next()
            assert beat.comments == ["heartbeat"]
            assert not beat.data


def test_stream_404_for_unknown_handle_and_503_without_read_model(
    engine: Engine, catch_up: Callable[[], None], procs: ProcGroup, rclient: redis.Redis
) -> None:
    api = _api(procs)
    with httpx.Client(base_url=api.base_url, timeout=10) as http:
        none_yet = http.get("/v1/users/writer/dashboard/stream")
        assert none_yet.status_code == 503
        assert none_yet.headers["retry-after"]
        assert none_yet.json()["detail"]
        _seed(engine)
        catch_up()
        unknown = http.get("/v1/users/nobody/dashboard/stream")
        assert unknown.status_code == 404
        assert unknown.headers["content-type"] == "application/json"
        assert unknown.json() == {"detail": "no user has this handle"}
        assert http.get("/v1/users/-bad/dashboard/stream").status_code == 422


def test_stream_says_gone_when_the_handle_stops_naming_a_user(
    engine: Engine, catch_up: Callable[[], None], procs: ProcGroup
) -> None:
    uid, _, _ = _seed(engine)
    catch_up()
    api = _api(procs)
    with stream(api, "writer") as events:
        events.next_event()
        with engine.begin() as conn:
            p.rename_user(conn, uid, "renamed")
        catch_up()
        assert events.next_event().name == "gone"
        with pytest.raises(AssertionError, match="ended"):
            events.next()


def test_flush_and_rebuild_wake_the_stream(
    engine: Engine, catch_up: Callable[[], None], procs: ProcGroup, rclient: redis.Redis
) -> None:
    uid, agent, _ = _seed(engine)
    catch_up()
    api = _api(procs)
    with stream(api, "writer") as events:
        first = events.next_event().json()
        rclient.flushall()  # the read model is gone: the stream waits, sending nothing wrong
        seq = _add(engine, agent)
        catch_up()  # rebuilds it from Postgres
        rebuilt = events.until(lambda d: d["chain_meta"]["owner_chain_height"] >= seq)
    assert first["recent_events"][0]["seq"] < seq
    assert normalise(rebuilt.json()) == _oracle(engine, uid)


def test_sigterm_ends_open_streams_and_the_api_exits(
    engine: Engine, catch_up: Callable[[], None], procs: ProcGroup
) -> None:
    """uvicorn's graceful shutdown waits for responses in progress; streams must end for it."""
    _seed(engine)
    catch_up()
    api = _api(procs)
    with stream(api, "writer") as events:
        assert events.next_event().name == "dashboard"
        api.send(signal.SIGTERM)
        deadline = time.monotonic() + READ_TIMEOUT
        with pytest.raises(AssertionError, match="ended"):
            while time.monotonic() < deadline:
                events.next()  # heartbeats, until the stream ends
            raise AssertionError("the stream is still open")
        # uvicorn re-raises the signal once it has shut down cleanly: killed by SIGTERM, then.
        assert api.wait(20) in (0, -signal.SIGTERM), api.log()
        assert "Finished server process" in api.log()


def test_many_streams_share_one_redis_subscription(
    engine: Engine, catch_up: Callable[[], None], procs: ProcGroup, rclient: redis.Redis
) -> None:
    _, agent, _ = _seed(engine)
    catch_up()
    api = _api(procs)

    def subscribers() -> int:
        return sum(1 for c in rclient.client_list() if int(c.get("sub", 0)) > 0)

    before = subscribers()

    async def watch(count: int) -> list[int]:
        limits = httpx.Limits(max_connections=count + 5)
        async with httpx.AsyncClient(base_url=api.base_url, limits=limits, timeout=20) as http:
            seen: list[int] = []

            async def one() -> None:
                path = "/v1/users/writer/dashboard/stream"
                async with http.stream("GET", path) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            height = orjson.loads(line[6:])["chain_meta"]["owner_chain_height"]
                            if height >= target:
                                seen.append(height)
                                return

            target = 1 << 62
            tasks = [asyncio.create_task(one()) for _ in range(count)]
            await asyncio.sleep(1.0)  # let them connect
            assert subscribers() == before  # 50 streams, still the one feed connection
            target = await asyncio.to_thread(_add, engine, agent)
            await asyncio.to_thread(catch_up)
            await asyncio.wait_for(asyncio.gather(*tasks), READ_TIMEOUT)
            return seen

    seen = asyncio.run(watch(50))
    assert len(seen) == 50
    assert before == 1


# -- the hub, without HTTP ---------------------------------------------------------------------


def _hub(shared_interval: float = 0.0) -> tuple[ChangeHub, DashboardCache]:
    client = redis.asyncio.Redis.from_url("redis://127.0.0.1:1/0")  # never connected here
    cache = DashboardCache()
    return ChangeHub(client, DashboardStore(client, cache), cache, shared_interval), cache


def test_hub_routes_each_key_to_its_waiters_only() -> None:
    async def scenario() -> None:
        hub, cache = _hub()
        alice = hub.subscribe("alice", shared=False)
        bob = hub.subscribe("bob", shared=True)
        for sub, uid in ((alice, 7), (bob, 8)):
            hub._by_user.setdefault(uid, set()).add(sub)
            sub.uid = uid
            sub.rebind = False
            sub.changed.clear()
        cache.invalidate([keys.user_doc(3, 7).encode()])
        assert alice.changed.is_set() and not bob.changed.is_set()
        assert not alice.rebind
        alice.changed.clear()
        cache.invalidate([keys.global_hash(3).encode()])  # the shared tail: streams only
        assert bob.changed.is_set() and not alice.changed.is_set()
        bob.changed.clear()
        cache.invalidate([keys.handle(3, "bob").encode()])
        assert bob.changed.is_set() and bob.rebind and not alice.changed.is_set()
        bob.changed.clear()
        for everything in (None, [keys.CURRENT.encode()]):
            cache.invalidate(everything)
            assert alice.changed.is_set() and bob.changed.is_set()
            alice.changed.clear()
            bob.changed.clear()
        cache.set_live(True)  # a reconnect: messages may have been missed
        assert alice.changed.is_set() and bob.changed.is_set()
        hub.unsubscribe(alice)
        hub.unsubscribe(bob)
        assert len(hub) == 0 and not hub._by_user and not hub._by_handle

    asyncio.run(scenario())


def test_hub_coalesces_bursts_of_shared_tail_changes() -> None:
    async def scenario() -> tuple[int, int]:
        hub, cache = _hub(shared_interval=0.2)
        sub = hub.subscribe("alice", shared=True)
        sub.changed.clear()
        cache.invalidate([keys.global_hash(3).encode()])  # the first wakes at once
        assert sub.changed.is_set()
        sub.changed.clear()
        before = hub.wakes
        for _ in range(100):
            cache.invalidate([keys.global_hash(3).encode()])
        assert not sub.changed.is_set()  # a burst rides on one later wake
        await asyncio.sleep(0.4)
        assert sub.changed.is_set()
        hub.close()
        return before, hub.wakes

    before, after = asyncio.run(scenario())
    assert after == before + 1
