"""Dashboards from Redis: the in-process cache first, else one atomic Lua round trip."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis.asyncio as aioredis

from api.cache import DashboardCache
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


@dataclass(frozen=True)
class Lookup:
    status: str  # "found", "unknown", "unavailable"
    body: bytes = b""


class DashboardStore:
    def __init__(self, client: aioredis.Redis, cache: DashboardCache) -> None:
        self._script = client.register_script(_READ)
        self.cache = cache

    async def dashboard(self, handle_lower: str) -> Lookup:
        cached = self.cache.get(handle_lower)
        if cached is not None:
            return Lookup("found", cached)
        epoch = self.cache.epoch
        reply = await self._script(keys=[keys.CURRENT], args=[handle_lower])
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
            self.cache.put(epoch, handle_lower, gen, uid, prefix, tail)
            return Lookup("found", prefix + tail)
        if code == 1:
            return Lookup("unknown")
        return Lookup("unavailable")
