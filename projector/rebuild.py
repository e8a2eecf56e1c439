"""Build a whole generation of the read model from one Postgres snapshot, and swap it in.

The new generation is written beside the one being served (DESIGN-NOTES part 4). Its cost
follows the number of agents and owners: each agent's top-12 and max seq are one indexed probe,
never a scan of the event history. The snapshot's xmin becomes the new generation's cursor, so
the incremental projector carries on from exactly what the snapshot saw.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable

import redis
from redis.typing import EncodableT, FieldT

from models import keys
from models.handles import handle_key, is_valid_handle
from projector.db import Conn, Database, one_row
from projector.records import Cursor, OwnerView, UserRow
from projector.render import encode_floor, floor_of, render_doc, render_tail
from projector.sink import Fenced
from projector.source import horizon, owner_windows

log = logging.getLogger("projector.rebuild")

# A build that dies leaves its marker to expire; generations that are neither current nor
# marked as building are garbage and get collected by the next swap.
BUILD_MARKER_TTL_SECONDS = 120
_WRITE_CHUNK = 500

_SWAP = """#!lua
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
if old then return tonumber(old) end
return 0
"""

Progress = Callable[[int, int], None]


def new_generation(client: redis.Redis) -> int:
    gen = int(client.incr(keys.NEXT_GEN))
    client.set(keys.building(gen), b"1", ex=BUILD_MARKER_TTL_SECONDS)
    client.sadd(keys.GENERATIONS, gen)
    return gen


def snapshot_into(
    db: Database, client: redis.Redis, gen: int, progress: Progress | None = None
) -> Cursor:
    """Write generation ``gen`` from one consistent snapshot; return the cursor it stands at."""
    started = time.monotonic()
    with db.transaction(repeatable_read=True) as conn:
        h = horizon(conn)
        cursor = Cursor.below(h)
        users = [
            UserRow(*row) for row in conn.execute("select id, handle, display_name from users")
        ]
        agents_by_owner: dict[int, dict[int, str]] = defaultdict(dict)
        agent_owner: dict[int, int] = {}
        for agent_id, owner_id, name in conn.execute("select id, owner_id, name from agents"):
            agents_by_owner[owner_id][agent_id] = name
            agent_owner[agent_id] = owner_id
        windows = owner_windows(conn, agents_by_owner, cursor.events)
        global_height = _max_seq_below(conn, h)
    read_s = time.monotonic() - started
    for start in range(0, len(users), _WRITE_CHUNK):
        pipe = client.pipeline(transaction=False)
        floors: dict[FieldT, EncodableT] = {}
        for user in users[start : start + _WRITE_CHUNK]:
            top, height = windows.get(user.id, ([], 0))
            owned = agents_by_owner.get(user.id, {})
            view = OwnerView(user.id, user.handle, user.display_name, owned, top, height)
            pipe.set(keys.user_doc(gen, user.id), render_doc(view))
            floor = floor_of(top)
            if floor is not None:
                floors[str(user.id)] = encode_floor(floor)
            if owned:
                pipe.hset(
                    keys.user_agents(gen, user.id), mapping={str(a): n for a, n in owned.items()}
                )
            if is_valid_handle(user.handle):
                pipe.set(keys.handle(gen, handle_key(user.handle)), str(user.id))
        if floors:
            pipe.hset(keys.floors(gen), mapping=floors)
        pipe.expire(keys.building(gen), BUILD_MARKER_TTL_SECONDS)
        pipe.execute()
        if progress is not None:
            progress(min(start + _WRITE_CHUNK, len(users)), len(users))
    items = [(str(a), str(o)) for a, o in agent_owner.items()]
    for start in range(0, len(items), 5000):
        client.hset(keys.agent_owner(gen), mapping=dict(items[start : start + 5000]))
    client.hset(
        keys.global_hash(gen),
        mapping={
            keys.GLOBAL_POS: cursor.encode(),
            keys.GLOBAL_HEIGHT: global_height,
            keys.GLOBAL_TAIL: render_tail(gen, cursor, global_height),
        },
    )
    log.info(
        "generation %d built: %d users, %d agents, global height %d, read %.2fs, total %.2fs",
        gen,
        len(users),
        len(agent_owner),
        global_height,
        read_s,
        time.monotonic() - started,
    )
    return cursor


def _max_seq_below(conn: Conn, h: int) -> int:
    """The chain's height as seen by everything below the horizon ``h``."""
    query = "select coalesce(max(seq), 0) from audit_events where tx_id < %(h)s::text::xid8"
    return int(one_row(conn, query, {"h": h})[0])


def swap_in(client: redis.Redis, gen: int) -> int | None:
    """Make ``gen`` the served generation; return the one it replaced (None if there was none).

    Raises Fenced if the build marker is gone: Redis lost data during the build, so the
    generation may be incomplete and must never be served; the caller builds again.
    """
    old = int(client.eval(_SWAP, 2, keys.CURRENT, keys.building(gen), gen))
    if old < 0:
        raise Fenced(f"generation {gen} lost its build marker; not swapping it in")
    return old or None


def collect_garbage(client: redis.Redis) -> int:
    """Delete every generation that is neither served nor being built; return keys deleted."""
    current = client.get(keys.CURRENT)
    deleted = 0
    for raw in client.smembers(keys.GENERATIONS):
        gen = int(raw)
        if (current is not None and gen == int(current)) or client.exists(keys.building(gen)):
            continue
        batch: list[bytes] = []
        for key in client.scan_iter(match=keys.gen_pattern(gen), count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += int(client.unlink(*batch))
                batch = []
        if batch:
            deleted += int(client.unlink(*batch))
        client.srem(keys.GENERATIONS, gen)
    return deleted
