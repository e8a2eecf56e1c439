"""init_db's contract: idempotent, upgrades an existing platform schema, append-only events."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from projector.db import Database
from projector.schema import PLATFORM_DDL, init_schema
from projector.worker import Projector
from scripts import platform_sim as p
from scripts.throwaway import PostgresServer


@pytest.fixture
def bare_db(pg_server: PostgresServer) -> str:
    """A database with nothing in it, not even the platform's tables."""
    name = "bare_upgrade_db"
    admin = create_engine(pg_server.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"drop database if exists {name} with (force)"))
        conn.execute(text(f"create database {name}"))
    admin.dispose()
    return pg_server.url(name).replace("postgresql://", "postgresql+psycopg://")


def test_init_is_idempotent(engine: Engine) -> None:
    init_schema(engine)
    init_schema(engine)
    with engine.connect() as conn:
        triggers = conn.execute(
            text("select count(*) from pg_trigger where tgname like 'projector_%'")
        ).scalar_one()
    assert triggers == 4


def test_events_are_append_only(engine: Engine) -> None:
    with engine.begin() as conn:
        agent = p.create_agent(conn, p.create_user(conn, "appender"), "a")
        p.add_event(conn, agent)
    for statement in (
        "update audit_events set event_type = 'forged'",
        "delete from audit_events",
        "truncate audit_events cascade",
    ):
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text(statement))
    with engine.connect() as conn:
        assert conn.execute(text("select event_type from audit_events")).scalar_one() == "inference"


def test_handles_are_unique_case_insensitively(engine: Engine) -> None:
    with engine.begin() as conn:
        p.create_user(conn, "CaseUser")
    with pytest.raises(IntegrityError), engine.begin() as conn:
        p.create_user(conn, "caseuser")


def test_upgrade_of_a_live_platform_schema_projects_existing_rows(
    bare_db: str, rclient, settings, api
) -> None:
    eng = create_engine(bare_db)
    try:
        with eng.begin() as conn:
            conn.connection.driver_connection.execute(PLATFORM_DDL)
            uid = p.create_user(conn, "legacy", "From before the projector")
            agent = p.create_agent(conn, uid, "old-agent")
            for _ in range(3):
                p.add_event(conn, agent)
        init_schema(eng)  # adds tx_id to rows that exist, triggers, indexes
        init_schema(eng)
        conf = settings.model_copy(update={"database_url": bare_db})
        database = Database(bare_db)
        try:
            Projector(database, rclient, conf).run(threading.Event(), until_caught_up=True)
        finally:
            database.close()
        body = api.get("/v1/users/legacy/dashboard").json()
        assert [e["agent_name"] for e in body["recent_events"]] == ["old-agent"] * 3
        assert body["chain_meta"]["owner_chain_height"] == 3
    finally:
        eng.dispose()


def test_orm_tables_match_the_ddl(engine: Engine) -> None:
    """models/tables.py (used for typed queries) and projector/schema.py (the DDL) agree."""
    from models.tables import Base

    query = text(
        "select column_name, is_nullable = 'YES' from information_schema.columns"
        " where table_name = :t"
    )
    with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            live = dict(conn.execute(query, {"t": table.name}).all())
            declared = {c.name: bool(c.nullable) for c in table.columns}
            assert live == declared, table.name
