"""Dashboards from Redis: the in-process cache first, else one atomic Lua round trip."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.responses import Response

from api.cache import DashboardCache
from api.freshness import Served
from models import keys

log = logging.getLogger("api.store")

# Returns {0} no read model, {1} unknown handle, {3} half-present user (a rebuild or a flush
# in progress), or {2, gen, uid, doc-without-its-closing, tail}: the API splices the last two.
# no-writes: it still answers when Redis is at maxmemory, and could run on a replica.
_READ = f"""#!lua flags=no-writes
local gen = redis.call('GET', KEYS[1])
if not gen then return {{0}} end
local uid = redis.call('GET', {keys.LUA_HANDLE_TEMPLATE})
if not uid then return {{1}} end
local doc = redis.call('GET', {keys.LUA_DOC_TEMPLATE})
local tail = redis.call('HGET', {keys.LUA_GLOBAL_TEMPLATE}, '{keys.GLOBAL_TAIL}')
if not doc or not tail then return {{3}} end
return {{2, gen, uid, string.sub(doc, 1, -3), tail}}
"""


# For /readyz: {current generation or '', 1 if its global hash exists else 0, heartbeat or ''}.
_READY = f"""#!lua flags=no-writes
local gen = redis.call('GET', KEYS[1])
local built = 0
if gen then built = redis.call('EXISTS', {keys.LUA_GLOBAL_TEMPLATE}) end
return {{gen or '', built, redis.call('GET', KEYS[2]) or ''}}
"""


@dataclass(frozen=True, slots=True)
class Lookup:
    status: str  # "found", "unknown", "unavailable"
    served: Served | None = None  # when found: the bytes, their ETag and headers

    @property
    def body(self) -> bytes:
        return b"" if self.served is None else self.served.body

    def response(self, if_none_match: str | None = None) -> Response:
        """The found answer: a 200, or a 304 when ``If-None-Match`` names it."""
        assert self.served is not None
        return self.served.response(if_none_match)


@dataclass(frozen=True, slots=True)
class Readiness:
    generation: bytes | None  # rm:current, None when unset
    built: bool  # the generation's global hash (cursor, tail) exists
    heartbeat: bytes | None  # rm:projector:heartbeat, None when absent (expired)


class DashboardStore:
    def __init__(self, client: aioredis.Redis, cache: DashboardCache) -> None:
        self.client = client
        self._script = client.register_script(_READ)
        self._ready = client.register_script(_READY)
        self.cache = cache
        # Plain counts, read by api/metrics.py at scrape time: nothing but an add per request.
        self.hits = 0
        self.misses = 0
        self.redis_errors = 0

    async def dashboard(self, handle_lower: str) -> Lookup:
        served = self.cache.served(handle_lower)
        if served is not None:
            self.hits += 1
            return Lookup("found", served)
        self.misses += 1
        epoch = self.cache.epoch
        try:
            reply = await self._script(keys=[keys.CURRENT], args=[handle_lower])
        except RedisError:
            self.redis_errors += 1
            raise
        try:
            code = int(reply[0])
            if code == 2:
                gen, uid = int(reply[1]), int(reply[2])
                prefix, tail = bytes(reply[3]), bytes(reply[4])
        except (ValueError, TypeError, IndexError):
            # Keys that are not what the projector writes (a generation or user id that is no
            # number): no read model this API can answer from, rather than a 500.
            log.warning("unreadable read model in Redis for handle %r", handle_lower[:64])
            return Lookup("unavailable")
        if code == 2:
            if not self.cache.parse_tail(tail).ok:
                log.warning("unreadable projection tail in Redis (generation %d)", gen)
                return Lookup("unavailable")
            return Lookup("found", self.cache.put(epoch, handle_lower, gen, uid, prefix, tail))
        if code == 1:
            return Lookup("unknown")
        return Lookup("unavailable")

    async def readiness(self) -> Readiness:
        """What /readyz needs, in one round trip (raises RedisError when Redis is unreachable)."""
        try:
            gen, built, beat = await self._ready(keys=[keys.CURRENT, keys.HEARTBEAT])
        except RedisError:
            self.redis_errors += 1
            raise
        return Readiness(bytes(gen) or None, int(built) == 1, bytes(beat) or None)
