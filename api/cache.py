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
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from models import keys

log = logging.getLogger("api.cache")

MAX_ENTRIES = 200_000


@dataclass(frozen=True)
class _Entry:
    prefix: bytes
    doc_key: bytes
    handle_key: bytes


class DashboardCache:
    def __init__(self) -> None:
        self.live = False
        self.epoch = 0
        self.tail: bytes | None = None
        self.tail_key: bytes | None = None
        self.gen: int | None = None
        self._docs: dict[str, _Entry] = {}
        self._by_key: dict[bytes, str] = {}

    def get(self, handle_lower: str) -> bytes | None:
        if not self.live or self.tail is None:
            return None
        entry = self._docs.get(handle_lower)
        return None if entry is None else entry.prefix + self.tail

    def put(
        self, epoch: int, handle_lower: str, gen: int, uid: int, prefix: bytes, tail: bytes
    ) -> None:
        if not self.live or epoch != self.epoch:
            return
        if self.gen != gen:
            self._clear()
            self.gen = gen
        if len(self._docs) >= MAX_ENTRIES:
            self._clear()
            self.gen = gen
        self.tail, self.tail_key = tail, keys.global_hash(gen).encode()
        entry = _Entry(
            prefix, keys.user_doc(gen, uid).encode(), keys.handle(gen, handle_lower).encode()
        )
        self._drop(handle_lower)
        self._docs[handle_lower] = entry
        self._by_key[entry.doc_key] = handle_lower
        self._by_key[entry.handle_key] = handle_lower

    def invalidate(self, changed: list[bytes] | None) -> None:
        self.epoch += 1
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

    def set_live(self, live: bool) -> None:
        self.epoch += 1
        self.live = live
        self._clear()

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


async def listen(redis_url: str, cache: DashboardCache, max_backoff: float = 2.0) -> None:
    """Feed Redis's invalidation messages to ``cache`` for ever, reconnecting with backoff."""
    backoff = 0.05
    while True:
        pool = aioredis.ConnectionPool.from_url(
            redis_url, protocol=2, socket_keepalive=True, socket_connect_timeout=2
        )
        conn = None
        try:
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            await conn.send_command("CLIENT", "ID")
            client_id = await conn.read_response()
            # Redirecting to itself lets one RESP2 connection both track and receive.
            await conn.send_command(
                "CLIENT",
                "TRACKING",
                "ON",
                "REDIRECT",
                client_id,
                "BCAST",
                "PREFIX",
                keys.TRACKING_PREFIX,
            )
            await conn.read_response()
            await conn.send_command("SUBSCRIBE", keys.INVALIDATE_CHANNEL)
            await conn.read_response()
            cache.set_live(True)
            backoff = 0.05
            while True:
                message = await conn.read_response(timeout=math.inf)  # idle is normal
                if isinstance(message, list) and message[0] == b"message":
                    cache.invalidate(message[2])
        except (RedisError, OSError) as exc:
            log.warning("cache invalidation feed lost (%s); serving from Redis meanwhile", exc)
        finally:
            cache.set_live(False)
            if conn is not None:
                await conn.disconnect()
            await pool.aclose()
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, max_backoff)
