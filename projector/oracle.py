"""The README's SQL: the truth every dashboard must equal once the projector has caught up.

Shared by the tests (tests/oracle.py), the soak and scripts/verify.py, so that an operator's
check of a running system and the test suite judge by the very same queries.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

RECENT = """
select e.id::text as id, e.seq, e.event_type, e.agent_id, a.name as agent_name, e.model,
       e.provider, e.hash, e.prev_hash, e.created_at
from audit_events e join agents a on a.id = e.agent_id
where a.owner_id = :user order by e.created_at desc, e.seq desc limit 12
"""
OWNER = """
select coalesce(max(e.seq), 0) from audit_events e join agents a on a.id = e.agent_id
where a.owner_id = :user
"""
GLOBAL = "select coalesce(max(seq), 0) from audit_events"


def expected(conn: Connection, user_id: int) -> dict[str, Any]:
    user = conn.execute(
        text("select handle, display_name from users where id = :u"), {"u": user_id}
    ).one()
    recent = [dict(r._mapping) for r in conn.execute(text(RECENT), {"user": user_id})]
    return {
        "handle": user.handle,
        "display_name": user.display_name,
        "agent_count": conn.execute(
            text("select count(*) from agents where owner_id = :u"), {"u": user_id}
        ).scalar_one(),
        "recent_events": recent,
        "chain_meta": {
            "owner_chain_height": conn.execute(text(OWNER), {"user": user_id}).scalar_one(),
            "global_chain_height": conn.execute(text(GLOBAL)).scalar_one(),
            "latest_event_at": recent[0]["created_at"] if recent else None,
        },
    }


def normalise(answer: dict[str, Any]) -> dict[str, Any]:
    """The API's JSON in the oracle's shape: times parsed, freshness fields left out."""
    events = [
        {**e, "created_at": datetime.fromisoformat(e["created_at"])}
        for e in answer["recent_events"]
    ]
    meta = answer["chain_meta"]
    latest = meta["latest_event_at"]
    return {
        "handle": answer["handle"],
        "display_name": answer["display_name"],
        "agent_count": answer["agent_count"],
        "recent_events": events,
        "chain_meta": {
            "owner_chain_height": meta["owner_chain_height"],
            "global_chain_height": meta["global_chain_height"],
            "latest_event_at": None if latest is None else datetime.fromisoformat(latest),
        },
    }
