"""The read model's state at a glance: generation, position, lag, heartbeat, leader, Redis.

Reads only: Redis (the keys the projector publishes) and two cheap Postgres catalogue queries
(the newest commit, the oldest running transaction). ``--json`` prints the same as one object.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
import redis
from rich import box
from rich.console import Console
from rich.table import Table

from models import keys
from models.settings import get_projector_settings
from projector import logs, readmodel
from projector.db import libpq_url
from projector.metrics import POSTGRES_SAMPLE, lag_seconds
from projector.sink import connect


def _json_key(client: redis.Redis, key: str) -> dict[str, Any] | None:
    raw = client.get(key)
    return None if raw is None else dict(orjson.loads(raw))


def _users_in(client: redis.Redis, gen: int) -> int:
    # A SCAN, not a counter: it counts what is really there (O(keys), fine for an operator).
    pattern = keys.user_doc(gen, 0).replace("{u0}", "{u*}")
    return sum(1 for _ in client.scan_iter(match=pattern, count=1000))


def _postgres(database_url: str) -> tuple[tuple[int, datetime] | None, float | None]:
    """(newest commit, oldest transaction's age); (None, None) when Postgres cannot say."""
    dsn = libpq_url(database_url)
    try:
        with psycopg.connect(dsn, connect_timeout=5, application_name="projector-status") as conn:
            row = conn.execute(POSTGRES_SAMPLE).fetchone()
    except psycopg.Error as exc:
        # Status is most wanted when something is down: say so and show what Redis knows.
        print(f"Postgres unreachable: {str(exc).strip() or exc}", file=sys.stderr)
        return None, None
    assert row is not None
    xid, committed, oldest = row
    newest = None if xid is None or committed is None else (int(xid), committed)
    return newest, float(oldest or 0.0)


def collect(client: redis.Redis, database_url: str) -> dict[str, Any]:
    now = time.time()
    head = readmodel.head(client)
    beat = _json_key(client, keys.HEARTBEAT)
    leader = _json_key(client, keys.LEADER)
    memory = client.info("memory")
    newest, oldest = _postgres(database_url)
    applied = None
    if head is not None and head.projection.get("committed_at"):
        applied = datetime.fromisoformat(head.projection["committed_at"])
    horizon = None if beat is None else beat.get("horizon")
    token = client.get(keys.LEADER_TOKEN)
    return {
        "generation": None if head is None else head.gen,
        "position": None if head is None else readmodel.position_text(head.cursor),
        "global_chain_height": None if head is None else head.height,
        "applied_at": None if head is None else head.projection.get("applied_at"),
        "committed_at": None if applied is None else applied.isoformat(),
        "lag_seconds": lag_seconds(newest, applied, horizon),
        "oldest_transaction_age_seconds": oldest,
        "heartbeat_age_seconds": None if beat is None else round(now - float(beat["at"]), 3),
        "leader": None
        if leader is None
        else {
            "holder": leader["holder"],
            "token": leader["token"],
            "since": datetime.fromtimestamp(float(leader["since"]), UTC).isoformat(),
            "latest_token": None if token is None else int(token),
        },
        "redis_used_memory": int(memory["used_memory"]),
        "redis_used_memory_human": memory["used_memory_human"],
        "redis_maxmemory": int(memory.get("maxmemory", 0)),
        "users": None if head is None else _users_in(client, head.gen),
    }


def _seconds(value: float | None, missing: str) -> str:
    return missing if value is None else f"{value:.3f} s"


def table(status: dict[str, Any]) -> Table:
    out = Table(title="read model status", title_justify="left", show_header=False, box=box.SIMPLE)
    out.add_column(style="bold")
    out.add_column()
    gen = status["generation"]
    out.add_row(
        "generation", "none: no read model (the API answers 503)" if gen is None else str(gen)
    )
    out.add_row("position", str(status["position"]))
    out.add_row("global chain height", str(status["global_chain_height"]))
    out.add_row("applied at", str(status["applied_at"]))
    committed = status["committed_at"] or "- (no batch applied since the last rebuild)"
    out.add_row("newest change committed at", committed)
    out.add_row("lag", _seconds(status["lag_seconds"], "unknown (no commit time to compare)"))
    oldest = status["oldest_transaction_age_seconds"]
    out.add_row("oldest running transaction", _seconds(oldest, "unknown (Postgres unreachable)"))
    out.add_row("heartbeat age", _seconds(status["heartbeat_age_seconds"], "none: no projector"))
    leader = status["leader"]
    if leader is None:
        out.add_row("leader", "none")
    else:
        stale = "" if leader["token"] == leader["latest_token"] else " (not the latest token!)"
        out.add_row("leader", f"{leader['holder']}, token {leader['token']}{stale}")
        out.add_row("leading since", leader["since"])
    limit = status["redis_maxmemory"]
    memory = status["redis_used_memory_human"] + (f" of maxmemory {limit}" if limit else "")
    out.add_row("Redis used memory", memory)
    out.add_row("users in the read model", str(status["users"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/status.py", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    logs.setup(default_level="WARNING")  # the script's own output is the report
    settings = get_projector_settings()
    client = connect(settings.redis_url)
    try:
        status = collect(client, settings.database_url)
    except redis.RedisError as exc:
        print(f"Redis unreachable at {settings.redis_url}: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()
    if args.json:
        print(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode())
    else:
        Console(width=100).print(table(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
