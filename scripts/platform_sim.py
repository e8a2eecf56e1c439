"""A stand-in for the platform's own app: plain SQL writes of users, agents and audit events.

The demo, the tests and the benchmark all write through this, the way the platform does: the
projector is never called; it learns everything from Postgres.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

MODELS = [
    ("gpt-5", "openai"),
    ("claude-opus-4", "anthropic"),
    ("gemini-3-pro", "google"),
    (None, None),
]


def create_user(conn: Connection, handle: str, display_name: str | None = None) -> int:
    return int(
        conn.execute(
            text("insert into users (handle, display_name) values (:h, :d) returning id"),
            {"h": handle, "d": display_name},
        ).scalar_one()
    )


def create_agent(conn: Connection, owner_id: int, name: str) -> int:
    return int(
        conn.execute(
            text("insert into agents (owner_id, name) values (:o, :n) returning id"),
            {"o": owner_id, "n": name},
        ).scalar_one()
    )


def add_event(
    conn: Connection,
    agent_id: int,
    event_type: str = "inference",
    *,
    model: str | None = "gpt-5",
    provider: str | None = "openai",
    created_at: datetime | None = None,
    payload: str = "{}",
) -> tuple[str, int]:
    """Append one event; returns (id, seq). The hash chains to the previous event by seq."""
    event_id = str(uuid.uuid4())
    prev = conn.execute(text("select hash from audit_events order by seq desc limit 1")).scalar()
    digest = hashlib.sha256(f"{prev}|{event_id}|{agent_id}|{event_type}".encode()).hexdigest()
    params: dict[str, Any] = {
        "id": event_id,
        "a": agent_id,
        "t": event_type,
        "m": model,
        "p": provider,
        "h": digest,
        "ph": prev,
        "pl": payload,
        "c": created_at,
    }
    seq = conn.execute(
        text(
            "insert into audit_events (id, agent_id, event_type, model, provider, payload, hash,"
            " prev_hash, created_at) values (:id, :a, :t, :m, :p, cast(:pl as jsonb), :h, :ph,"
            " coalesce(:c, now())) returning seq"
        ),
        params,
    ).scalar_one()
    return event_id, int(seq)


def rename_agent(conn: Connection, agent_id: int, name: str) -> None:
    conn.execute(text("update agents set name = :n where id = :a"), {"n": name, "a": agent_id})


def transfer_agent(conn: Connection, agent_id: int, new_owner: int) -> None:
    conn.execute(
        text("update agents set owner_id = :o where id = :a"), {"o": new_owner, "a": agent_id}
    )


def rename_user(conn: Connection, user_id: int, handle: str) -> None:
    conn.execute(text("update users set handle = :h where id = :u"), {"h": handle, "u": user_id})


def set_display_name(conn: Connection, user_id: int, name: str | None) -> None:
    conn.execute(
        text("update users set display_name = :d where id = :u"), {"d": name, "u": user_id}
    )


def delete_agent(conn: Connection, agent_id: int) -> None:
    conn.execute(text("delete from agents where id = :a"), {"a": agent_id})


def delete_user(conn: Connection, user_id: int) -> None:
    conn.execute(text("delete from users where id = :u"), {"u": user_id})
