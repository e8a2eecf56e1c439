"""Real PostgreSQL and Redis, started by the suite itself on loopback; clean state per test."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

from api.main import create_app
from models.settings import ProjectorSettings, RedisSettings
from projector.db import Database
from projector.schema import init_schema
from projector.worker import Projector
from scripts.throwaway import PostgresServer, RedisServer, start_postgres, start_redis
from tests.oracle import expected, normalise
from tests.procs import ProcGroup, proc_group

TEMPLATE_DB = "projector_template"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    server = start_postgres()
    try:
        admin = create_engine(server.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f"create database {TEMPLATE_DB}"))
        admin.dispose()
        template = create_engine(server.url(TEMPLATE_DB))
        init_schema(template)
        template.dispose()
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = start_redis()
    yield server
    server.destroy()


@pytest.fixture
def db_url(pg_server: PostgresServer) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    # No pooled connection: a test may restart the server, and teardown must still work.
    admin = create_engine(pg_server.url(), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f"create database {name} template {TEMPLATE_DB}"))
    yield pg_server.url(name)
    with admin.connect() as conn:
        conn.execute(text(f"drop database if exists {name} with (force)"))
    admin.dispose()


@pytest.fixture
def settings(db_url: str, redis_server: RedisServer) -> ProjectorSettings:
    return ProjectorSettings(
        database_url=db_url, redis_url=redis_server.url, idle_poll_seconds=0.1, batch_size=500
    )


@pytest.fixture
def engine(settings: ProjectorSettings) -> Iterator[Engine]:
    eng = create_engine(settings.database_url, pool_size=10, pool_pre_ping=True)
    yield eng
    eng.dispose()


@pytest.fixture
def db(settings: ProjectorSettings) -> Iterator[Database]:
    """The projector's own way into Postgres (psycopg connections with its session settings)."""
    database = Database(settings.database_url)
    yield database
    database.close()


@pytest.fixture
def rclient(redis_server: RedisServer) -> Iterator[redis.Redis]:
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()  # a test may have left it stopped
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def catch_up(db: Database, rclient: redis.Redis, settings: ProjectorSettings) -> Callable[[], None]:
    """Run the projector in-process until it has applied everything committed so far."""

    def run() -> None:
        Projector(db, rclient, settings).run(threading.Event(), until_caught_up=True)

    return run


@pytest.fixture
def api(settings: ProjectorSettings, rclient: redis.Redis) -> Iterator[TestClient]:
    app = create_app(RedisSettings(redis_url=settings.redis_url))
    with TestClient(app) as client:
        yield client


@pytest.fixture
def check_all(engine: Engine, api: TestClient) -> Callable[[], int]:
    """Compare every user's API answer with the seed SQL; return how many users were checked."""

    def run() -> int:
        with engine.connect() as conn:
            users = conn.execute(text("select id, handle from users order by id")).all()
            for user in users:
                response = api.get(f"/v1/users/{user.handle}/dashboard")
                assert response.status_code == 200, (user.handle, response.text)
                want: dict[str, Any] = expected(conn, user.id)
                assert normalise(response.json()) == want, user.handle
        return len(users)

    return run


@pytest.fixture
def procs(
    db_url: str, redis_server: RedisServer, rclient: redis.Redis, tmp_path: Path
) -> Iterator[ProcGroup]:
    """Real processes (the projector, the API, scripts) against this test's database."""
    yield from proc_group(tmp_path, db_url, redis_server.url)
