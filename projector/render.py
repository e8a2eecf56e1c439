"""The prepared bytes the API serves, and their way back into an OwnerView.

A user's document holds everything that is theirs. The parts every user shares (the global
chain height and the projection's position) live once in the generation's ``tail``; the API's
read script splices the two, so an event elsewhere in the chain never rewrites 5,000 documents.
The document ends with ``}}`` (closing chain_meta and the body) and the tail re-opens there.
"""

from __future__ import annotations

from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

import orjson

from models.keys import TOP_N
from projector.records import Cursor, Event, OwnerView, iso_utc

DOC_SPLICE = b"}}"
_event_fields = itemgetter(*Event._fields)
_tuple_new = tuple.__new__


def _event_json(e: Event, agent_name: str) -> dict[str, Any]:
    return {
        "id": e.id,
        "seq": e.seq,
        "event_type": e.event_type,
        "agent_id": e.agent_id,
        "agent_name": agent_name,
        "model": e.model,
        "provider": e.provider,
        "hash": e.hash,
        "prev_hash": e.prev_hash,
        "created_at": e.created_at,
    }


def render_doc(view: OwnerView) -> bytes:
    body = {
        "handle": view.handle,
        "display_name": view.display_name,
        "agent_count": len(view.agents),
        "recent_events": [_event_json(e, view.agents.get(e.agent_id, "")) for e in view.top],
        "chain_meta": {
            "owner_chain_height": view.height,
            "latest_event_at": view.top[0].created_at if view.top else None,
        },
    }
    doc = orjson.dumps(body)
    assert doc.endswith(DOC_SPLICE)
    return doc


def render_tail(
    gen: int,
    cursor: Cursor,
    global_height: int,
    committed_at: datetime | None = None,
    now: datetime | None = None,
) -> bytes:
    projection = {
        "generation": gen,
        # Opaque to clients: the event stream's cursor (transaction id, seq); a string, since
        # after a rebuild the seq part is a 64-bit sentinel no JavaScript number holds.
        "position": f"{cursor.events.xid}:{cursor.events.n}",
        "applied_at": iso_utc(now or datetime.now(UTC)),
        # When the newest change applied was committed in Postgres (None when Postgres does not
        # track commit timestamps, and right after a rebuild).
        "committed_at": None if committed_at is None else iso_utc(committed_at),
    }
    return (
        b',"global_chain_height":'
        + str(global_height).encode()
        + b'},"projection":'
        + orjson.dumps(projection)
        + b"}"
    )


def parse_doc(user_id: int, doc: bytes | str, agents: dict[int, str]) -> OwnerView:
    body = orjson.loads(doc)
    # tuple.__new__ skips the named tuple's Python-level __new__: 60k events in a cold backlog.
    top = [_tuple_new(Event, _event_fields(e)) for e in body["recent_events"]]
    return OwnerView(
        user_id=user_id,
        handle=body["handle"],
        display_name=body["display_name"],
        agents=agents,
        top=top,
        height=body["chain_meta"]["owner_chain_height"],
    )


def floor_of(top: list[Event]) -> tuple[str, int] | None:
    """The order key of the 12th event of a full top: no event older than it can enter."""
    return top[TOP_N - 1].order_key if len(top) >= TOP_N else None


def encode_floor(floor: tuple[str, int]) -> str:
    return f"{floor[0]} {floor[1]}"


def decode_floor(raw: bytes | str) -> tuple[str, int]:
    created_at, seq = (raw.decode() if isinstance(raw, bytes) else raw).split(" ")
    return created_at, int(seq)
