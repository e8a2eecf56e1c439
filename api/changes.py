"""The change hub: one feed of Redis invalidations per API process, fanned out to any number of
waiters (``?min_seq=`` requests and ``/stream`` clients).

It opens no connection of its own. The cache's invalidation feed (api/cache.py, CLIENT TRACKING
BCAST PREFIX rm:) already receives a message naming every read-model key each write changed;
the cache calls ``ChangeHub.notify`` with that list, and with ``None`` on FLUSHALL and whenever
the feed goes down or comes back (messages may have been lost), which wakes every waiter so it
reads again. A waiter never polls Redis: it sleeps on an ``asyncio.Event`` until a message names
one of its keys.

Routing, from the key names of models/keys.py:
- ``rm:g{g}:{u<id>}:doc`` (and ``:agents``) wakes the waiters of user ``id``;
- ``rm:g{g}:h:<handle>`` wakes the waiters of that handle, who also resolve it again (a rename
  or a new user can move a handle to another id);
- ``rm:current`` (a rebuild's flip), FLUSHALL and feed reconnects wake everyone;
- ``rm:g{g}:global`` (the shared tail: global chain height, position) wakes the subscriptions
  that asked for it (streams), at most once per ``shared_interval`` seconds: the tail moves on
  every batch anywhere in the chain, and a thousand streams need not re-render for each one. A
  user's own change always wakes at once, and its answer carries the newest tail anyway.

A wake only sets a flag: a waiter that is busy (a slow SSE client) reads the latest state when
it is free again, so nothing queues up.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import TypeVar

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api.cache import DashboardCache
from api.store import DashboardStore, Lookup
from models import keys

MAX_WAIT_MS = 5000
# Concurrent Redis reads made for waiters: a wave of a thousand woken streams goes through this
# many at a time (the first refills the shared tail in the cache, the rest are served from
# memory), well under the client's connection pool.
READ_CONCURRENCY = 32

_USER_KEY = re.compile(rb"^rm:g\d+:\{u(\d+)\}:(?:doc|agents)$")
_HANDLE_KEY = re.compile(rb"^rm:g\d+:h:(.+)$")
_GLOBAL_KEY = re.compile(rb"^rm:g\d+:global$")
_CURRENT = keys.CURRENT.encode()
K = TypeVar("K", int, str)

# {0} no read model, {1} unknown handle, {2, uid}.
_RESOLVE = f"""#!lua flags=no-writes
local gen = redis.call('GET', KEYS[1])
if not gen then return {{0}} end
local uid = redis.call('GET', {keys.LUA_HANDLE_TEMPLATE})
if not uid then return {{1}} end
return {{2, uid}}
"""


@dataclass(eq=False)
class Subscription:
    """One waiter: woken (``changed`` set) when its user's or handle's keys change."""

    handle: str
    shared: bool
    uid: int | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when the handle may now name another user (or none): resolve it again.
    rebind: bool = True


def owner_height(body: bytes) -> int:
    return int(orjson.loads(body)["chain_meta"]["owner_chain_height"])


class ChangeHub:
    def __init__(
        self,
        client: aioredis.Redis,
        store: DashboardStore,
        cache: DashboardCache,
        shared_interval: float = 1.0,
    ) -> None:
        self.store = store
        self.shared_interval = shared_interval
        self._resolve = client.register_script(_RESOLVE)
        self._reads = asyncio.Semaphore(READ_CONCURRENCY)
        self._all: set[Subscription] = set()
        self._shared: set[Subscription] = set()
        self._by_user: dict[int, set[Subscription]] = {}
        self._by_handle: dict[str, set[Subscription]] = {}
        self._shared_last = float("-inf")
        self._shared_timer: asyncio.TimerHandle | None = None
        self.wakes = 0  # notifications that woke at least one waiter (for tests and metrics)
        self.closing = False  # the server is shutting down: streams end
        cache.listeners.append(self.notify)

    # -- subscriptions -------------------------------------------------------------------

    def subscribe(self, handle_lower: str, *, shared: bool) -> Subscription:
        sub = Subscription(handle_lower, shared)
        sub.changed.set()  # read once after subscribing: nothing between is missed
        self._all.add(sub)
        if shared:
            self._shared.add(sub)
        self._by_handle.setdefault(handle_lower, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._all.discard(sub)
        self._shared.discard(sub)
        _remove(self._by_handle, sub.handle, sub)
        if sub.uid is not None:
            _remove(self._by_user, sub.uid, sub)

    def __len__(self) -> int:
        return len(self._all)

    async def bind(self, sub: Subscription) -> str:
        """Resolve the subscription's handle to a user id; returns the lookup status."""
        sub.rebind = False
        try:
            reply = await self._resolve(keys=[keys.CURRENT], args=[sub.handle])
            code = int(reply[0])
            uid = int(reply[1]) if code == 2 else None
        except (RedisError, ValueError, TypeError, IndexError):
            sub.rebind = True
            return "unavailable"
        if uid != sub.uid:
            if sub.uid is not None:
                _remove(self._by_user, sub.uid, sub)
            sub.uid = uid
            if uid is not None:
                self._by_user.setdefault(uid, set()).add(sub)
        return ("unavailable", "unknown", "found")[code] if 0 <= code <= 2 else "unavailable"

    async def read(self, handle_lower: str) -> Lookup:
        """The dashboard as the plain route serves it; Redis errors read as unavailable."""
        async with self._reads:
            try:
                return await self.store.dashboard(handle_lower)
            except RedisError:
                return Lookup("unavailable")

    # -- read-your-writes ----------------------------------------------------------------

    async def wait_for_height(
        self, handle_lower: str, min_seq: int, wait_ms: int
    ) -> tuple[Lookup, bool]:
        """The dashboard once its owner_chain_height reaches ``min_seq``, or, when ``wait_ms``
        runs out first, what there is and True (stale). An unknown handle is waited for too
        (the writer's new user may not be projected yet); no read model answers at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(wait_ms, 0), MAX_WAIT_MS) / 1000
        sub = self.subscribe(handle_lower, shared=False)
        try:
            while True:
                sub.changed.clear()
                if sub.rebind:
                    await self.bind(sub)
                found = await self.read(handle_lower)
                if found.status == "unavailable":
                    return found, False
                if found.status == "found" and owner_height(found.body) >= min_seq:
                    return found, False
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return found, found.status == "found"
                try:
                    async with asyncio.timeout(remaining):
                        await sub.changed.wait()
                except TimeoutError:
                    # What it has: no change was announced since that read.
                    return found, found.status == "found"
        finally:
            self.unsubscribe(sub)

    # -- the feed's side -----------------------------------------------------------------

    def notify(self, changed: list[bytes] | None) -> None:
        """Called by the cache for every invalidation message (None: wake everyone)."""
        if changed is None:
            self._wake_all()
            return
        shared = False
        for key in changed:
            if (m := _USER_KEY.match(key)) is not None:
                self._wake(self._by_user.get(int(m[1])), rebind=False)
            elif (m := _HANDLE_KEY.match(key)) is not None:
                self._wake(self._by_handle.get(m[1].decode(errors="replace")), rebind=True)
            elif key == _CURRENT:
                self._wake_all()
                return
            elif _GLOBAL_KEY.match(key) is not None:
                shared = True
        if shared:
            self._shared_changed()

    def _wake(self, subs: set[Subscription] | None, *, rebind: bool) -> None:
        if not subs:
            return
        self.wakes += 1
        for sub in subs:
            sub.rebind = sub.rebind or rebind
            sub.changed.set()

    def _wake_all(self) -> None:
        self._wake(self._all, rebind=True)

    def _shared_changed(self) -> None:
        if self._shared_timer is not None:
            return  # a wake is already due: this change rides on it
        loop = asyncio.get_running_loop()
        due = self._shared_last + self.shared_interval - loop.time()
        if due <= 0:
            self._wake_shared()
        else:
            self._shared_timer = loop.call_later(due, self._wake_shared)

    def _wake_shared(self) -> None:
        self._shared_timer = None
        self._shared_last = asyncio.get_running_loop().time()
        self._wake(self._shared, rebind=False)

    def shut_down(self) -> None:
        """The server is stopping: wake everyone, and streams end (see api/live.py)."""
        self.closing = True
        self._wake_all()

    def close(self) -> None:
        if self._shared_timer is not None:
            self._shared_timer.cancel()
            self._shared_timer = None


def _remove(index: dict[K, set[Subscription]], k: K, sub: Subscription) -> None:
    subs = index.get(k)
    if subs is not None:
        subs.discard(sub)
        if not subs:
            del index[k]
