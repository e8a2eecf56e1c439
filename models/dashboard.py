"""The public contract of ``GET /v1/users/{handle}/dashboard`` (pydantic v2).

The API serves bytes the projector prepared; these models document them in OpenAPI and let the
tests validate every answer.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict
from pydantic.config import JsonDict


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
    # Present, and true, only when a ?min_seq= wait ran out before the user's
    # owner_chain_height reached it (the header X-Projection-Stale: true says the same);
    # absent otherwise, so a plain answer is exactly the projector's bytes.
    stale: bool = False


DASHBOARD_EXAMPLE: JsonDict = {
    "handle": "hizrianraz",
    "display_name": "Hizrian Raz",
    "agent_count": 2,
    "recent_events": [
        {
            "id": "0b9f3c1e-6a51-4f7e-9d3a-2f1c5e8b7a90",
            "seq": 1000123,
            "event_type": "inference",
            "agent_id": 42,
            "agent_name": "support-bot",
            "model": "gpt-5",
            "provider": "openai",
            "hash": "9c1f0e5d8a3b2c4d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5",
            "prev_hash": "4a5b6c7d8e9f00112233445566778899aabbccddeeff00112233445566778899",
            "created_at": "2026-12-04T18:20:11.503Z",
        }
    ],
    "chain_meta": {
        "owner_chain_height": 1000123,
        "global_chain_height": 1000187,
        "latest_event_at": "2026-12-04T18:20:11.503Z",
    },
    "projection": {
        "generation": 3,
        "position": "88412:1000187",
        "applied_at": "2026-12-04T18:20:11.521Z",
        "committed_at": "2026-12-04T18:20:11.509Z",
    },
}


class Dashboard(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [DASHBOARD_EXAMPLE]})

    handle: str
    display_name: str | None
    agent_count: int
    recent_events: list[RecentEvent]
    chain_meta: ChainMeta
    projection: Projection


class Problem(BaseModel):
    detail: str


class ValidationIssue(BaseModel):
    type: str
    loc: list[str | int]
    msg: str
    input: str | int | float | bool | None = None  # the offending input, cut to 200 characters


class ValidationProblem(BaseModel):
    """A 422: what was wrong with the request (api/errors.py renders it)."""

    detail: list[ValidationIssue]
