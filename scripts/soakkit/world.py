"""The soak's world: its own throwaway Postgres and Redis, the seeded platform, its processes."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

from models.settings import ProjectorSettings
from projector.schema import init_schema
from scripts.throwaway import PostgresServer, RedisServer, start_postgres, start_redis
from tests.procs import ProcGroup

DB = "soak"
NOISY = "ainfera-ai"
HERO = "hizrianraz"
# Owns nothing and is never touched by the writers: its answer shows the global chain height,
# which is how the soak sees the projector catching up after each fault.
OBSERVER = "soak-observer"
STARTED = time.monotonic()


ROOT = Path(__file__).resolve().parents[2]


def code_state() -> str:
    """The commit soaked, and whether the code the processes run differed from it."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown (not a git checkout)"
    changed = git("status", "--porcelain", "--", "projector", "api", "models", "scripts")
    files = sorted({line.split(maxsplit=1)[1] for line in changed.splitlines() if line.strip()})
    return f"{head} in {ROOT}" + (f", with local changes to {', '.join(files)}" if files else "")


def clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


def say(line: str) -> None:
    clear = "\r\033[K" if sys.stdout.isatty() else ""  # over the progress line, if any
    print(f"{clear}[soak {clock(time.monotonic() - STARTED)}] {line}", flush=True)


@dataclass
class World:
    pg: PostgresServer
    redis_server: RedisServer
    engine: Engine
    procs: ProcGroup
    log_dir: Path
    seeded_events: int

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_server.url, socket_timeout=5)


def _create_database(pg: PostgresServer) -> None:
    admin = create_engine(pg.url(), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f"create database {DB}"))
        # The throwaway server runs with synchronous_commit=off (fast tests). An immediate
        # shutdown then forgets the last commits it acknowledged, which the projector may already
        # have shown: the soak would report a drift the product did not cause. A database-level
        # setting wins over the server's command line, for every session of this database.
        conn.execute(text(f"alter database {DB} set synchronous_commit = on"))
    admin.dispose()


SEED_SQL = [
    "select setseed(:s)",
    "insert into users (handle, display_name) values"
    " (:noisy, 'Ainfera AI'), (:hero, 'Hizrian Raz'), (:observer, 'Soak Observer')",
    "insert into users (handle, display_name) select 'tenant-' || g,"
    " case when g % 3 = 0 then null else 'Tenant ' || g end from generate_series(1, :users) g",
    "insert into agents (owner_id, name) select u.id, 'e2e-runner-' || k"
    " from users u, generate_series(1, 40) k where u.handle = :noisy",
    "insert into agents (owner_id, name) values"
    " ((select id from users where handle = :hero), 'scout'),"
    " ((select id from users where handle = :hero), 'scribe')",
    "insert into agents (owner_id, name) select u.id, 't' || u.id || '-a' || k"
    " from users u, generate_series(1, 4) k where u.handle like 'tenant-%' and random() < 0.5",
    # Events: 30% on the noisy tenant's agents, created_at over the last two days at whole
    # seconds (plenty of ties), a fifth without a model.
    "insert into audit_events (id, agent_id, event_type, model, provider, hash, prev_hash,"
    " created_at)"
    " select gen_random_uuid(),"
    " case when random() < 0.3 then n.ids[1 + floor(random() * cardinality(n.ids))::int]"
    " else o.ids[1 + floor(random() * cardinality(o.ids))::int] end,"
    " case when g % 3 = 0 then 'e2e.test' else 'inference' end,"
    " case when g % 5 = 0 then null else 'gpt-5' end,"
    " case when g % 5 = 0 then null else 'openai' end,"
    " md5(g::text), case when g = 1 then null else md5((g - 1)::text) end,"
    " date_trunc('second', now()) - make_interval(secs => floor(random() * 172800))"
    " from (select array_agg(a.id) as ids from agents a join users u on u.id = a.owner_id"
    "       where u.handle = :noisy) n,"
    " (select array_agg(a.id) as ids from agents a join users u on u.id = a.owner_id"
    "       where u.handle <> :noisy) o,"
    " generate_series(1, :events) g",
]


def seed(engine: Engine, *, users: int, events: int, seed_: int) -> None:
    params = {
        "s": (seed_ % 1000) / 1000,
        "noisy": NOISY,
        "hero": HERO,
        "observer": OBSERVER,
        "users": users,
        "events": events,
    }
    with engine.begin() as conn:
        for sql in SEED_SQL:
            conn.execute(text(sql), params)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("vacuum (analyze) users, agents, audit_events"))


def events_in(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("select count(*) from audit_events")).scalar_one())


@contextlib.contextmanager
def soak_world(log_dir: Path, *, users: int, events: int, seed_: int) -> Iterator[World]:
    """Start Postgres and Redis, create and seed the database; stop everything on leaving."""
    with contextlib.ExitStack() as stack:
        pg = start_postgres()
        stack.callback(pg.destroy)
        _create_database(pg)
        redis_server = start_redis()
        stack.callback(redis_server.destroy)
        url = ProjectorSettings(database_url=pg.url(DB)).database_url  # the psycopg 3 driver
        engine = create_engine(url, pool_pre_ping=True, pool_size=10)
        stack.callback(engine.dispose)
        init_schema(engine)
        seed(engine, users=users, events=events, seed_=seed_)
        procs = ProcGroup(log_dir, pg.url(DB), redis_server.url)
        stack.callback(procs.stop_all)
        yield World(pg, redis_server, engine, procs, log_dir, events_in(engine))
