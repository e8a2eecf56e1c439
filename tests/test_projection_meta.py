"""The ``projection`` object: when the newest change it reflects was committed in Postgres."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from scripts import platform_sim as p


def db_now(engine: Engine) -> datetime:
    with engine.connect() as conn:
        now: datetime = conn.execute(text("select clock_timestamp()")).scalar_one()
        return now


def committed_at(api: TestClient, handle: str) -> datetime:
    body = api.get(f"/v1/users/{handle}/dashboard").json()
    return datetime.fromisoformat(body["projection"]["committed_at"])


def test_committed_at_is_the_commit_time_of_the_newest_change_applied(
    engine: Engine, catch_up: Callable[[], None], api: TestClient
) -> None:
    with engine.begin() as conn:
        owner = p.create_user(conn, "ann")
        agent = p.create_agent(conn, owner, "a1")
    catch_up()  # the first run builds the read model: no change applied by a batch yet
    assert api.get("/v1/users/ann/dashboard").json()["projection"]["committed_at"] is None

    before = db_now(engine)
    with engine.begin() as conn:
        p.add_event(conn, agent)
    after = db_now(engine)
    catch_up()
    second = committed_at(api, "ann")
    assert before <= second <= after, (before, second, after)

    before = db_now(engine)
    with engine.begin() as conn:  # an entity change alone moves it too
        p.rename_agent(conn, agent, "renamed")
    after = db_now(engine)
    catch_up()
    assert before <= committed_at(api, "ann") <= after
