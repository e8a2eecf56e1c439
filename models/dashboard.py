"""The public contract of ``GET /v1/users/{handle}/dashboard`` (pydantic v2).

The API serves bytes the projector prepared; these models document them in OpenAPI and let the
tests validate every answer.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict


class RecentEvent(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    id: str
    seq: int
    event_type: str
    agent_id: int
    agent_name: str
    model: str | None
    provider: str | None
    hash: str
    prev_hash: str | None
    created_at: datetime


class ChainMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    owner_chain_height: int
    global_chain_height: int
    latest_event_at: datetime | None


class Projection(BaseModel):
    """How fresh the answer is: the generation served and the projector's cursor (opaque)."""

    generation: int
    position: str
    applied_at: datetime
    # Commit time of the newest change applied; null without Postgres's track_commit_timestamp.
    committed_at: datetime | None = None


class Dashboard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    handle: str
    display_name: str | None
    agent_count: int
    recent_events: list[RecentEvent]
    chain_meta: ChainMeta
    projection: Projection


class Problem(BaseModel):
    detail: str
