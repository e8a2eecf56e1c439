"""The platform's tables (SQLAlchemy 2.0), plus the columns and log table the projector adds.

Only the projector and the scripts import this module: the API never touches Postgres.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import UserDefinedType


class Xid8(UserDefinedType[int]):
    """Postgres ``xid8``: a 64-bit transaction id that never wraps around."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "xid8"


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    handle: Mapped[str] = mapped_column(Text)
    display_name: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (Index("users_handle_lower_key", func.lower(text("handle")), unique=True),)


class Agent(Base):
    __tablename__ = "agents"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    owner_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, Identity(always=False), unique=True)
    agent_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("agents.id"))
    event_type: Mapped[str] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(Text)
    provider: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    hash: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # Added by the projector: the writing transaction's id, so the projector can read only what
    # no running transaction can still add to (see projector/source.py).
    tx_id: Mapped[int] = mapped_column(Xid8, server_default=text("pg_current_xact_id()"))


class EntityChange(Base):
    """One row per insert, update or delete of a user or an agent, written by triggers."""

    __tablename__ = "projector_entity_changes"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    tx_id: Mapped[int] = mapped_column(Xid8, server_default=text("pg_current_xact_id()"))
    kind: Mapped[str] = mapped_column(String(1))  # 'u' user, 'a' agent
    entity_id: Mapped[int] = mapped_column(BigInteger)
