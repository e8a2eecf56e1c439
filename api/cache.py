"""An in-process cache of prepared dashboards, kept exact by Redis's own invalidations.

Redis client-side caching in broadcast mode (``CLIENT TRACKING ... BCAST PREFIX rm:``) sends one
message per write naming every read-model key it changed, and a null message on FLUSHALL. The
cache holds each user's document and the generation's shared tail separately, so the frequent
change of the global chain height costs one refetch of the tail, not one per user.

Two races are closed here rather than hoped away:
- Ordering across connections: a read's reply can arrive after the invalidation of the very key
  it read. Every invalidation bumps ``epoch``; a read that saw the epoch move is served but not
  cached.
- Lost messages: while the listening connection is down nothing is cached or served from cache,
  and the cache is emptied when it comes back, since invalidations may have been missed.
- Messages not read yet: Redis sends a write's invalidations before the writer can act on its
  reply, but the event loop may not have read them when the next request arrives. A hit is
  served only if the feed's socket has no unread bytes (one FIONREAD), so an answer never
  predates a write whose client has already seen it complete.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import RedisError

from api.freshness import Served, Tail, parse_tail
from models import keys

log = logging.getLogger("api.cache")

MAX_ENTRIES = 200_000


@dataclass(slots=True)
class _Entry:
    prefix: bytes
    doc_key: bytes
    handle_key: bytes
    # The answer last built from this document, and the tail it was built with: rebuilt (bytes,
    # ETag, headers) only on the first hit after the tail changed.
    served: Served | None = None


class DashboardCache:
    def __init__(self) -> None:
        self.live = False
        self._unread: Callable[[], int] = lambda: 1
        self.epoch = 0
        self.tail: Tail | None = None
        self.tail_key: bytes | None = None
        self.gen: int | None = None
        self._docs: dict[str, _Entry] = {}
        self._by_key: dict[bytes, str] = {}
        self._last_tail: Tail | None = None  # the latest tail parsed, cached or not
        self.feed_connects = 0  # times the invalidation feed went live (metrics)
        # Called with every message's changed keys (None: everything may have changed, as on
        # FLUSHALL or when the feed drops or comes back); api/changes.py wakes its waiters.
        self.listeners: list[Callable[[list[bytes] | None], None]] = []

    def served(self, handle_lower: str) -> Served | None:
        """The cached answer for a handle (bytes, ETag, headers), or None: ask Redis."""
        tail = self.tail
        if not self.live or tail is None or self._unread():
            return None
        entry = self._docs.get(handle_lower)
        if entry is None:
            return None
        served = entry.served
        if served is None or served.tail is not tail:
            served = entry.served = Served.build(entry.prefix, tail)
        return served

    def get(self, handle_lower: str) -> bytes | None:
        served = self.served(handle_lower)
        return None if served is None else served.body

    def parse_tail(self, raw: bytes) -> Tail:
        """The tail's parsed form, parsed only when its bytes are new."""
        for known in (self.tail, self._last_tail):
            if known is not None and known.raw == raw:
                return known
        self._last_tail = parse_tail(raw)
        return self._last_tail

    def put(
        self, epoch: int, handle_lower: str, gen: int, uid: int, prefix: bytes, tail: bytes
    ) -> Served:
        """The answer a read from Redis makes; cached when no invalidation raced the read."""
        parsed = self.parse_tail(tail)
        served = Served.build(prefix, parsed)
        if not self.live or epoch != self.epoch:
            return served
        if self.gen != gen:
            self._clear()
            self.gen = gen
        if len(self._docs) >= MAX_ENTRIES:
            self._clear()
            self.gen = gen
        self.tail, self.tail_key = parsed, keys.global_hash(gen).encode()
        entry = _Entry(
            prefix,
            keys.user_doc(gen, uid).encode(),
            keys.handle(gen, handle_lower).encode(),
            served,
        )
        self._drop(handle_lower)
        self._docs[handle_lower] = entry
        self._by_key[entry.doc_key] = handle_lower
        self._by_key[entry.handle_key] = handle_lower
        return served

    def invalidate(self, changed: list[bytes] | None) -> None:
        self.epoch += 1
        for listener in self.listeners:
            listener(changed)
        if changed is None:  # FLUSHALL / FLUSHDB
            self._clear()
            return
        current = keys.CURRENT.encode()
        for key in changed:
            if key == current:
                self._clear()
                return
            if key == self.tail_key:
                self.tail = None
            handle = self._by_key.get(key)
            if handle is not None:
                self._drop(handle)

    def attach(self, unread: Callable[[], int]) -> None:
        """Go live, fed by a connection whose unread bytes ``unread`` counts."""
        self._unread = unread
        self.feed_connects += 1
        self.set_live(True)

    def set_live(self, live: bool) -> None:
        self.epoch += 1
        self.live = live
        self._clear()
        for listener in self.listeners:
            listener(None)

    def _drop(self, handle_lower: str) -> None:
        entry = self._docs.pop(handle_lower, None)
        if entry is not None:
            self._by_key.pop(entry.doc_key, None)
            self._by_key.pop(entry.handle_key, None)

    def _clear(self) -> None:
        self._docs.clear()
        self._by_key.clear()
        self.tail = self.tail_key = None
        self.gen = None

    def __len__(self) -> int:
        return len(self._docs)


class _Feed(asyncio.Protocol):
    """The invalidation connection, parsed in ``data_received`` itself: a message takes effect
    as soon as the event loop reads it, not when some task gets scheduled later."""

    def __init__(self, cache: DashboardCache) -> None:
        self.cache = cache
        self.reader = hiredis.Reader()
        self.replies: asyncio.Queue[object] = asyncio.Queue()
        self.closed = asyncio.get_running_loop().create_future()
        self.transport: asyncio.WriteTransport | None = None
        self._fd = -1  # looked up once: a hit checks it on every request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio's classes.
        self.transport = cast(asyncio.WriteTransport, transport)
        sock = transport.get_extra_info("socket")
        self._fd = -1 if sock is None else sock.fileno()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if isinstance(reply, list) and reply[:1] == [b"message"]:
                self.cache.invalidate(reply[2])
            else:
                self.replies.put_nowait(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fd = -1
        self.cache.set_live(False)
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, *args: str | int) -> None:
        assert self.transport is not None
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            raw = str(arg).encode()
            parts += [b"$%d\r\n" % len(raw), raw, b"\r\n"]
        self.transport.write(b"".join(parts))

    async def reply(self) -> object:
        reply = await asyncio.wait_for(self.replies.get(), timeout=5)
        if isinstance(reply, hiredis.ReplyError):
            raise RedisError(str(reply))
        return reply

    def pending_bytes(self) -> int:
        """Bytes Redis has sent that the event loop has not read yet (FIONREAD)."""
        if self._fd < 0:
            return 1
        buf = fcntl.ioctl(self._fd, termios.FIONREAD, b"\0\0\0\0")
        return int(struct.unpack("i", buf)[0])


async def _open_feed(redis_url: str, cache: DashboardCache) -> _Feed:
    url = urlsplit(redis_url)
    loop = asyncio.get_running_loop()
    feed = _Feed(cache)
    if url.scheme == "unix":
        connecting = loop.create_unix_connection(lambda: feed, url.path)
    else:
        host, port = url.hostname or "localhost", url.port or 6379
        connecting = loop.create_connection(
            lambda: feed, host, port, ssl=True if url.scheme == "rediss" else None
        )
    await asyncio.wait_for(connecting, timeout=2)
    try:
        await _handshake(feed, url.username, url.password)
    except BaseException:
        # Failed or cancelled (an app shut down right after start-up) before listen() holds
        # the feed: close the connection here, or its socket is left to the collector.
        if feed.transport is not None:
            feed.transport.close()
        raise
    return feed


async def _handshake(feed: _Feed, username: str | None, password: str | None) -> None:
    if password:
        feed.send("AUTH", *[unquote(p) for p in (username, password) if p])
        await feed.reply()
    feed.send("CLIENT", "ID")
    client_id = await feed.reply()
    assert isinstance(client_id, int)
    # Redirecting to itself lets one RESP2 connection both track and receive.
    feed.send(
        "CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST", "PREFIX", keys.TRACKING_PREFIX
    )
    await feed.reply()
    feed.send("SUBSCRIBE", keys.INVALIDATE_CHANNEL)
    await feed.reply()


async def listen(redis_url: str, cache: DashboardCache, max_backoff: float = 2.0) -> None:
    """Feed Redis's invalidation messages to ``cache`` for ever, reconnecting with backoff."""
    backoff = 0.05
    while True:
        feed: _Feed | None = None
        try:
            feed = await _open_feed(redis_url, cache)
            cache.attach(feed.pending_bytes)
            backoff = 0.05
            await feed.closed
            log.warning("cache invalidation feed closed; serving from Redis meanwhile")
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("cache invalidation feed lost (%s); serving from Redis meanwhile", exc)
        finally:
            cache.set_live(False)
            if feed is not None and feed.transport is not None:
                feed.transport.close()
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, max_backoff)
