"""One Redis round trip per dashboard, atomic: generation, handle, document and tail."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from models import keys

# Returns {status, body}: 0 no read model, 1 unknown handle, 2 found, 3 half-present user.
# The document and the tail are spliced here so the API never parses or re-serialises them.
_READ = f"""
local gen = redis.call('GET', KEYS[1])
if not gen then return {{0}} end
local uid = redis.call('GET', {keys.LUA_HANDLE_TEMPLATE})
if not uid then return {{1}} end
local doc = redis.call('GET', {keys.LUA_DOC_TEMPLATE})
local tail = redis.call('HGET', {keys.LUA_GLOBAL_TEMPLATE}, '{keys.GLOBAL_TAIL}')
if not doc or not tail then return {{3}} end
return {{2, string.sub(doc, 1, -3) .. tail}}
"""


@dataclass(frozen=True)
class Lookup:
    status: str  # "found", "unknown", "unavailable"
    body: bytes = b""


class DashboardStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self._script = client.register_script(_READ)

    async def dashboard(self, handle_lower: str) -> Lookup:
        reply = await self._script(keys=[keys.CURRENT], args=[handle_lower])
        code = int(reply[0])
        if code == 2:
            return Lookup("found", bytes(reply[1]))
        if code == 1:
            return Lookup("unknown")
        return Lookup("unavailable")
