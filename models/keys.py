"""Every Redis key name of the read model, and the size of the per-owner window.

Layout (``g`` is a generation, so a rebuild can be built beside the live model and swapped in
by flipping one pointer):

    rm:current                      -> generation the API serves (absent: no read model, 503)
    rm:next-gen                     -> counter handing out generation numbers
    rm:generations                  -> set of generations that may still have keys (for GC)
    rm:projector:heartbeat          -> the leading projector's last beat (expires)
    rm:leader:token                 -> fencing token of the latest leader (counter)
    rm:leader                       -> who leads: holder, token, since
    rm:g{g}:building                -> present while generation g is being built
    rm:g{g}:global                  -> hash: pos (cursor), height (global chain height), tail
    rm:g{g}:agent-owner             -> hash: agent id -> owner user id, the projector's routing
    rm:g{g}:floors                  -> hash: user id -> "created_at seq" of the 12th event of the
                                       user's top (full tops only); a hint for the projector
    rm:g{g}:h:{handle lowercased}   -> user id
    rm:g{g}:{u<id>}:doc             -> the user's prepared dashboard JSON (without global parts)
    rm:g{g}:{u<id>}:agents          -> hash: agent id -> agent name, the agents the user owns now

All of one user's keys carry the hash tag ``{u<id>}``, so a move to Redis Cluster keeps them in
one slot without changing the layout.
"""

from __future__ import annotations

TOP_N = 12

CURRENT = "rm:current"
NEXT_GEN = "rm:next-gen"
GENERATIONS = "rm:generations"
HEARTBEAT = "rm:projector:heartbeat"
# Leadership (projector/leader.py): the fencing-token counter every batch write checks, and who
# holds the lease, for operators.
LEADER_TOKEN = "rm:leader:token"
LEADER = "rm:leader"

GLOBAL_POS = "pos"
GLOBAL_HEIGHT = "height"
GLOBAL_TAIL = "tail"


def gen_prefix(gen: int) -> str:
    return f"rm:g{gen}:"


def gen_pattern(gen: int) -> str:
    return f"rm:g{gen}:*"


def building(gen: int) -> str:
    return f"rm:g{gen}:building"


def global_hash(gen: int) -> str:
    return f"rm:g{gen}:global"


def agent_owner(gen: int) -> str:
    return f"rm:g{gen}:agent-owner"


def floors(gen: int) -> str:
    return f"rm:g{gen}:floors"


def handle(gen: int, handle_lower: str) -> str:
    return f"rm:g{gen}:h:{handle_lower}"


def user_doc(gen: int, user_id: int) -> str:
    return f"rm:g{gen}:{{u{user_id}}}:doc"


def user_agents(gen: int, user_id: int) -> str:
    return f"rm:g{gen}:{{u{user_id}}}:agents"


# The API caches documents in-process and evicts them on Redis's own invalidation messages
# (client-side caching, broadcast mode), which cover every key under this prefix.
TRACKING_PREFIX = "rm:"
INVALIDATE_CHANNEL = "__redis__:invalidate"

# The API's read script builds keys from the generation it finds, inside Redis, so the read is
# one round trip and one atomic view; these templates keep the names defined here only.
LUA_HANDLE_TEMPLATE = "'rm:g' .. gen .. ':h:' .. ARGV[1]"
LUA_DOC_TEMPLATE = "'rm:g' .. gen .. ':{u' .. uid .. '}:doc'"
LUA_AGENTS_TEMPLATE = "'rm:g' .. gen .. ':{u' .. uid .. '}:agents'"
LUA_GLOBAL_TEMPLATE = "'rm:g' .. gen .. ':global'"
LUA_FLOORS_TEMPLATE = "'rm:g' .. gen .. ':floors'"
