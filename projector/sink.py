"""Redis I/O of the projector: load the state a batch needs, apply a batch atomically.

The batch's updates and the new cursor go to Redis in one Lua script, so a crash leaves either
the whole batch with its cursor or neither (DESIGN-NOTES part 3). The script also fences: it
refuses to write unless its generation is still the one being served (or still being built) and
the stored cursor is the one this batch started from. A rebuild that swapped generations, a
Redis that lost its data, or another writer that moved on all make the write a no-op, and the
projector reloads its position instead of writing stale state over newer state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Any

import redis
from redis._parsers.encoders import Encoder

from models import keys
from projector.fold import FoldResult
from projector.records import Cursor, OwnerView
from projector.render import decode_floor, encode_floor, floor_of, parse_doc, render_doc


class Mode(Enum):
    LIVE = "live"  # writing the generation the API serves
    BUILDING = "building"  # catching up a generation a rebuild has not swapped in yet


class Fenced(Exception):
    """The write was refused: the generation or the cursor is not what this writer holds."""


class Deposed(Fenced):
    """The write was refused: another projector took the lead since this one's token."""


@dataclass(frozen=True)
class Head:
    gen: int
    cursor: Cursor
    height: int


# The shebang (Redis 7) makes Redis refuse the whole script up front when it is at maxmemory,
# instead of failing at the first write inside it and leaving the batch half applied.
_APPLY = f"""#!lua
local gen = ARGV[1]
local floors = {keys.LUA_FLOORS_TEMPLATE}
if ARGV[2] == 'live' then
    if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'generation' end
elseif redis.call('EXISTS', KEYS[3]) == 0 then
    return 'building'
end
if ARGV[7] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[7] then return 'leader' end
if redis.call('HGET', KEYS[2], 'pos') ~= ARGV[3] then return 'position' end
local i = 8
while i <= #ARGV do
    local op = ARGV[i]
    if op == 'U' then
        -- A user's document and, in the same step, its floors hint ('' when the top is short).
        local uid = ARGV[i + 1]
        redis.call('SET', {keys.LUA_DOC_TEMPLATE}, ARGV[i + 2])
        if ARGV[i + 3] == '' then
            redis.call('HDEL', floors, uid)
        else
            redis.call('HSET', floors, uid, ARGV[i + 3])
        end
        i = i + 4
    elseif op == 'S' then
        redis.call('SET', ARGV[i + 1], ARGV[i + 2]); i = i + 3
    elseif op == 'D' then
        redis.call('DEL', ARGV[i + 1]); i = i + 2
    elseif op == 'X' then
        if redis.call('GET', ARGV[i + 1]) == ARGV[i + 2] then redis.call('DEL', ARGV[i + 1]) end
        i = i + 3
    elseif op == 'H' then
        redis.call('HSET', ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]); i = i + 4
    elseif op == 'R' then
        redis.call('HDEL', ARGV[i + 1], ARGV[i + 2]); i = i + 3
    else
        return redis.error_reply('unknown op ' .. op)
    end
end
redis.call('HSET', KEYS[2], 'pos', ARGV[4], 'height', ARGV[5], 'tail', ARGV[6])
return 'ok'
"""


# Per owner, its agents hash as a flat list. The key names are built in Redis from the owners'
# ids: a cold backlog batch loads 5,000 owners, and encoding the names in Python cost as much as
# Redis reading them. Only the small hashes go through Lua: see Sink.views for the documents.
_LOAD_AGENTS = f"""#!lua flags=no-writes
local gen = ARGV[1]
local out = {{}}
for i = 2, #ARGV do
    local uid = ARGV[i]
    out[i - 1] = redis.call('HGETALL', {keys.LUA_AGENTS_TEMPLATE})
end
return out
"""


_LOAD_CHUNK = 500  # documents per MGET: ~2.3 MB


class Later:
    """A command argument made only when the packer reaches it.

    A backlog batch's one write carries 5,000 documents (23 MB). Rendered up front, all of them
    and their packed copy (another 23 MB) were fresh memory, which this machine's kernel zeroes
    and maps page by page: most of the command's 0.4-0.5 s of kernel time went to such memory.
    Rendered as the packer reaches them, each piece is sent and freed before the next is made,
    and its memory serves the next.
    """

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], bytes]) -> None:
        self.make = make


class RespPacker:
    """RESP framing that copies each byte once, in pieces sent as they are made.

    redis-py sends what ``pack`` yields piece by piece, so a large command (a backlog batch is
    one script call of ~20k arguments and ~23 MB of documents) is never whole in memory: pieces
    of 64 KB come from, and go back to, the heap. hiredis's packer copies large values several
    times (10x slower on 20 MB); redis-py's own re-formats its growing buffer with ``%`` for
    every argument under 6 KB, which a document is (0.19 s of a 500k backlog's batch).
    """

    CHUNK = 64 * 1024

    def __init__(self, encode: Callable[[Any], bytes | memoryview]) -> None:
        self.encode = encode

    def pack(self, *args: Any) -> Iterator[bytes | memoryview]:
        # As redis-py does: a command name with a space ("CONFIG GET") is several arguments.
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        parts: list[bytes | memoryview] = [b"*%d\r\n" % len(args)]
        size = 0
        for value in args:
            arg = value.make() if type(value) is Later else self.encode(value)
            if len(arg) > self.CHUNK:  # sent as it is, not copied
                yield b"".join((*parts, b"$%d\r\n" % len(arg)))
                yield arg
                parts, size = [b"\r\n"], 0
                continue
            parts += (b"$%d\r\n" % len(arg), arg, b"\r\n")
            size += len(arg)
            if size > self.CHUNK:
                yield b"".join(parts)
                parts, size = [], 0
        yield b"".join(parts)


def connect(url: str) -> redis.Redis:
    """The projector's Redis client, with the packer above for its large commands."""
    encoder = Encoder("utf-8", "strict", False)  # type: ignore[no-untyped-call]
    return redis.Redis.from_url(
        url,
        socket_timeout=30,
        socket_connect_timeout=5,
        command_packer=RespPacker(encoder.encode),
    )


class Sink:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._apply = client.register_script(_APPLY)
        self._load_agents = client.register_script(_LOAD_AGENTS)
        # Only this module's packer makes Later arguments; another client gets them made here.
        packer = client.connection_pool.connection_kwargs.get("command_packer")
        self._packs_later = isinstance(packer, RespPacker)

    def current_generation(self) -> int | None:
        raw = self.r.get(keys.CURRENT)
        return None if raw is None else int(raw)

    def head(self, gen: int) -> Head | None:
        pos, height = self.r.hmget(keys.global_hash(gen), [keys.GLOBAL_POS, keys.GLOBAL_HEIGHT])
        if pos is None:
            return None
        return Head(gen, Cursor.decode(pos), int(height or 0))

    def agent_owners(self, gen: int, agent_ids: list[int]) -> dict[int, int]:
        if not agent_ids:
            return {}
        raw = self.r.hmget(keys.agent_owner(gen), [str(a) for a in agent_ids])
        return {a: int(o) for a, o in zip(agent_ids, raw, strict=True) if o is not None}

    def floors(self, gen: int, user_ids: list[int]) -> dict[int, tuple[str, int]]:
        """The floors hint of these users (those with a full top); see worker.step."""
        if not user_ids:
            return {}
        raw = self.r.hmget(keys.floors(gen), [str(u) for u in user_ids])
        return {u: decode_floor(f) for u, f in zip(user_ids, raw, strict=True) if f is not None}

    def views(self, gen: int, user_ids: list[int]) -> dict[int, OwnerView]:
        if not user_ids:
            return {}
        # A few calls, not a pipeline of two commands per owner (redis-py's per-command cost
        # dominated that). The documents come by MGET: a Lua script returning them copied each
        # one into a Lua string and out again, 65-170 ms in Redis for 5,000 owners against
        # 13-19 ms. In chunks, parsed as they come: each chunk's documents are freed before the
        # next arrives, whose buffers then reuse their memory (fresh memory is what costs here:
        # see Later). Nothing else writes this generation meanwhile (the writes are fenced), so
        # the reads agree without a transaction.
        agents = self._load_agents(args=[gen, *user_ids])
        out: dict[int, OwnerView] = {}
        for start in range(0, len(user_ids), _LOAD_CHUNK):
            chunk = user_ids[start : start + _LOAD_CHUNK]
            docs = self.r.mget([keys.user_doc(gen, uid) for uid in chunk])
            owned_of = agents[start : start + _LOAD_CHUNK]
            for uid, doc, owned in zip(chunk, docs, owned_of, strict=True):
                if doc:
                    names = {int(owned[j]): owned[j + 1].decode() for j in range(0, len(owned), 2)}
                    out[uid] = parse_doc(uid, doc, names)
        return out

    def apply(
        self,
        gen: int,
        mode: Mode,
        expected: Cursor,
        new: Cursor,
        result: FoldResult,
        tail: bytes,
        token: int | None = None,
    ) -> None:
        """Write one batch; ``token``, when given, must be the latest leader's fencing token."""
        args: list[str | bytes | int | Later] = [
            gen,
            mode.value,
            expected.encode(),
            new.encode(),
            result.global_height,
            tail,
            "" if token is None else token,
            *batch_ops(gen, result),
        ]
        if not self._packs_later:
            args = [arg.make() if type(arg) is Later else arg for arg in args]
        outcome = self._apply(
            keys=[keys.CURRENT, keys.global_hash(gen), keys.building(gen), keys.LEADER_TOKEN],
            args=args,  # type: ignore[arg-type]  # Later: this client's packer makes them
        )
        if outcome == b"leader":
            raise Deposed("a newer leader holds the fencing token")
        if outcome != b"ok":
            raise Fenced(outcome.decode())


def batch_ops(gen: int, result: FoldResult) -> list[str | bytes | int | Later]:
    return [*_user_ops(gen, result), *_agent_ops(gen, result)]


def _user_ops(gen: int, result: FoldResult) -> list[str | bytes | int | Later]:
    ops: list[str | bytes | int | Later] = []
    for uid in result.deleted_users:
        ops += ["D", keys.user_doc(gen, uid), "D", keys.user_agents(gen, uid)]
        ops += ["R", keys.floors(gen), str(uid)]
    for move in result.handle_moves:
        # Release only if it still points here: another user may have claimed it since, in an
        # order the log does not show (DELIF), and a case-only change keeps the same key.
        if move.old is not None and move.old != move.new:
            ops += ["X", keys.handle(gen, move.old), str(move.user_id)]
        if move.new is not None:
            ops += ["S", keys.handle(gen, move.new), str(move.user_id)]
    for uid, view in result.views.items():
        # The floors hint moves with the document, in the same atomic write. One op of four
        # arguments, key names built in Redis: a backlog batch writes 5,000 of these, and each
        # argument costs packing in Python and a Lua string in Redis.
        floor = floor_of(view.top)
        doc = Later(partial(render_doc, view))
        ops += ("U", uid, doc, "" if floor is None else encode_floor(floor))
    return ops


def _agent_ops(gen: int, result: FoldResult) -> list[str | bytes | int]:
    ops: list[str | bytes | int] = []
    for (uid, agent_id), name in result.owned_set.items():
        ops += ["H", keys.user_agents(gen, uid), str(agent_id), name]
    for uid, agent_id in result.owned_del:
        if uid not in result.deleted_users:
            ops += ["R", keys.user_agents(gen, uid), str(agent_id)]
    for agent_id, owner in result.agent_owner_set.items():
        ops += ["H", keys.agent_owner(gen), str(agent_id), str(owner)]
    for agent_id in result.agent_owner_del:
        ops += ["R", keys.agent_owner(gen), str(agent_id)]
    return ops
