"""The read model as the API serves it, read straight from Redis by the operator scripts.

scripts/verify.py judges what a browser would get: the user's document spliced with the
generation's shared tail, found through the handle index, all read in one MULTI so that the
document, the tail and the cursor belong together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from models import keys
from models.handles import handle_key, is_valid_handle
from projector.records import MAX_BIGINT, Cursor
from projector.render import DOC_SPLICE


@dataclass(frozen=True)
class Head:
    gen: int
    cursor: Cursor
    height: int
    projection: dict[str, Any]


@dataclass(frozen=True)
class ServedUser:
    head: Head
    body: dict[str, Any] | None  # the dashboard as served; None: no document
    indexed_as: int | None  # the user id the handle index names; None: not indexed


def parse_tail(tail: bytes) -> tuple[int, dict[str, Any]]:
    """(global chain height, projection object) of a generation's shared tail."""
    # The tail closes chain_meta and the body, so it parses once something opens them.
    body = orjson.loads(b'{"chain_meta":{"_":0' + tail)
    return int(body["chain_meta"]["global_chain_height"]), dict(body["projection"])


def position_text(cursor: Cursor) -> str:
    """The cursor as the API shows it (``xid:seq``); a rebuild's sentinel seq shown as ``*``."""
    n = cursor.events.n
    return f"{cursor.events.xid}:{'*' if n == MAX_BIGINT else n}"


def current_generation(client: redis.Redis) -> int | None:
    raw = client.get(keys.CURRENT)
    return None if raw is None else int(raw)


def head(client: redis.Redis) -> Head | None:
    """The served generation's cursor, height and projection; None without a read model."""
    found = _read(client, lambda gen: [])
    return None if found is None else _head(*found[:3])


def _read(
    client: redis.Redis, more: Callable[[int], list[str]]
) -> tuple[int, bytes | None, bytes | None, list[bytes | None]] | None:
    """(generation, cursor, tail, values of ``more(gen)``'s keys), read in one MULTI from the
    served generation; None without a read model. Retried if a rebuild swaps generations
    between finding the generation and reading it."""
    while True:
        gen = current_generation(client)
        if gen is None:
            return None
        pipe = client.pipeline(transaction=True)
        pipe.get(keys.CURRENT)
        pipe.hmget(keys.global_hash(gen), [keys.GLOBAL_POS, keys.GLOBAL_TAIL])
        for key in more(gen):
            pipe.get(key)
        now, (pos, tail), *values = pipe.execute()
        if now is not None and int(now) == gen:
            return gen, pos, tail, values


def _head(gen: int, pos: bytes | None, tail: bytes | None) -> Head | None:
    if pos is None or tail is None:
        return None
    height, projection = parse_tail(tail)
    return Head(gen, Cursor.decode(pos), height, projection)


def served_user(client: redis.Redis, user_id: int, handle: str) -> ServedUser | None:
    """One user's dashboard as served now; None without a read model."""
    valid = is_valid_handle(handle)

    def user_keys(gen: int) -> list[str]:
        doc = keys.user_doc(gen, user_id)
        return [doc, keys.handle(gen, handle_key(handle))] if valid else [doc]

    found = _read(client, user_keys)
    if found is None:
        return None
    gen, pos, tail, (doc, *indexed) = found
    top = _head(gen, pos, tail)
    if top is None:
        return None
    body = None
    if doc is not None and tail is not None and doc.endswith(DOC_SPLICE):
        body = orjson.loads(doc[: -len(DOC_SPLICE)] + tail)
    owner = indexed[0] if indexed else None
    return ServedUser(top, body, None if owner is None else int(owner))
