"""Plain records the projector moves between Postgres, the fold and Redis."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple

import orjson

MAX_BIGINT = 9_223_372_036_854_775_807


def iso_utc(ts: datetime) -> str:
    # One fixed shape (UTC, six fraction digits) so that string order is time order: the fold
    # sorts the stored top-12 by these strings without parsing them back.
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


@dataclass(frozen=True, order=True)
class Position:
    """Everything with (tx_id, n) <= (xid, n) in one stream has been applied."""

    xid: int = 0
    n: int = 0


@dataclass(frozen=True)
class Cursor:
    events: Position = Position()
    changes: Position = Position()

    def encode(self) -> str:
        return orjson.dumps(
            [self.events.xid, self.events.n, self.changes.xid, self.changes.n]
        ).decode()

    @classmethod
    def decode(cls, raw: str | bytes) -> Cursor:
        ex, en, cx, cn = orjson.loads(raw)
        return cls(Position(ex, en), Position(cx, cn))

    @classmethod
    def below(cls, horizon_xid: int) -> Cursor:
        """Everything written by transactions older than ``horizon_xid``."""
        pos = Position(horizon_xid - 1, MAX_BIGINT)
        return cls(pos, pos)


class Event(NamedTuple):
    # A tuple, not a dataclass: a backlog batch makes ~100k of these, straight from Postgres
    # rows and stored documents, and a tuple is built several times faster.
    id: str
    seq: int
    event_type: str
    agent_id: int
    model: str | None
    provider: str | None
    hash: str
    prev_hash: str | None
    created_at: str  # iso_utc

    @property
    def order_key(self) -> tuple[str, int]:
        return (self.created_at, self.seq)


class AgentRow(NamedTuple):
    # A tuple for the same reason as Event: a backlog's slice names ~20k agents.
    id: int
    owner_id: int
    name: str


@dataclass(frozen=True)
class UserRow:
    id: int
    handle: str
    display_name: str | None


@dataclass
class OwnerView:
    """One user's slice of the read model, as the projector holds it while folding."""

    user_id: int
    handle: str
    display_name: str | None
    agents: dict[int, str] = field(default_factory=dict)
    top: list[Event] = field(default_factory=list)
    height: int = 0
