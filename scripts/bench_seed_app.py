"""The seed's read path as it was written, for the benchmark: every request asks Postgres.

``DATABASE_URL=... uvicorn scripts.bench_seed_app:app``. The same route as the API, served by the
same FastAPI and uvicorn, but a sync route that runs the seed's SQL through SQLAlchemy (pool of
16) and builds the answer with the pydantic models of ``models/dashboard.py``. No projection
field: the seed had no read model. The indexes the query wants (agents by owner, events by agent
and time) are the ones ``init_schema`` creates.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, HTTPException, Path, Request
from pydantic import BaseModel, ConfigDict
from sqlalchemy import Connection, Engine, create_engine, text

from models.dashboard import ChainMeta, RecentEvent
from models.handles import HANDLE_PATTERN
from models.settings import ProjectorSettings

Handle = Annotated[str, Path(pattern=HANDLE_PATTERN)]

USER_SQL = text("select id, handle, display_name from users where lower(handle) = lower(:h)")
AGENTS_SQL = text("select id from agents where owner_id = :u")
RECENT_SQL = text(
    "select e.id::text as id, e.seq, e.event_type, e.agent_id, a.name as agent_name, e.model,"
    " e.provider, e.hash, e.prev_hash, e.created_at"
    " from audit_events e join agents a on a.id = e.agent_id"
    " where a.owner_id = :u order by e.created_at desc, e.seq desc limit 12"
)
OWNER_HEIGHT_SQL = text(
    "select coalesce(max(seq), 0) from audit_events where agent_id = any(cast(:ids as bigint[]))"
)
GLOBAL_HEIGHT_SQL = text("select coalesce(max(seq), 0) from audit_events")


class SeedDashboard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    handle: str
    display_name: str | None
    agent_count: int
    recent_events: list[RecentEvent]
    chain_meta: ChainMeta


def _dashboard(conn: Connection, handle: str) -> SeedDashboard | None:
    user = conn.execute(USER_SQL, {"h": handle}).one_or_none()
    if user is None:
        return None
    agent_ids: Sequence[int] = conn.execute(AGENTS_SQL, {"u": user.id}).scalars().all()
    recent = [RecentEvent(**row._mapping) for row in conn.execute(RECENT_SQL, {"u": user.id})]
    owner_height = conn.execute(OWNER_HEIGHT_SQL, {"ids": list(agent_ids)}).scalar_one()
    global_height = conn.execute(GLOBAL_HEIGHT_SQL).scalar_one()
    return SeedDashboard(
        handle=user.handle,
        display_name=user.display_name,
        agent_count=len(agent_ids),
        recent_events=recent,
        chain_meta=ChainMeta(
            owner_chain_height=owner_height,
            global_chain_height=global_height,
            latest_event_at=recent[0].created_at if recent else None,
        ),
    )


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # ProjectorSettings reads DATABASE_URL and picks the psycopg driver.
    url = ProjectorSettings().database_url
    app.state.engine = create_engine(url, pool_size=16, max_overflow=0)
    try:
        yield
    finally:
        app.state.engine.dispose()


app = FastAPI(title="seed read path (benchmark)", lifespan=_lifespan)


@app.get("/v1/users/{handle}/dashboard")
def dashboard(handle: Handle, request: Request) -> SeedDashboard:
    engine: Engine = request.app.state.engine
    with engine.connect() as conn:
        found = _dashboard(conn, handle)
    if found is None:
        raise HTTPException(status_code=404, detail="no user has this handle")
    return found
