"""Rebuild the whole read model from Postgres beside the live one, then swap it in atomically.

The API keeps serving the old generation until the swap; a running projector notices the swap
(its next write is fenced) and carries on from the new generation's position. ``--dry-run``
only reads: it tells what a rebuild would build and free, and writes nothing anywhere.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass

import redis
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from models import keys
from models.handles import is_valid_handle
from models.keys import TOP_N
from models.settings import get_projector_settings
from projector import logs, readmodel
from projector.db import Database, one_row
from projector.rebuild import collect_garbage, new_generation, snapshot_into, swap_in
from projector.records import Position
from projector.sink import Mode, connect
from projector.source import horizon
from projector.worker import Projector

_XID = "%(x)s::text::xid8"


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} owners/s", style="progress.data.speed")


@dataclass(frozen=True)
class Plan:
    horizon: int
    users: int
    owners_with_agents: int
    indexed_handles: int
    agents: int
    events: int

    @property
    def keys(self) -> int:
        # A document per user, an agents hash per owner, a handle key per valid handle, plus
        # the generation's global hash, (when any agent exists) its agent-owner hash and (taken
        # to exist once there are 12 events: some owner's top is then usually full) its floors.
        routing = 1 if self.agents else 0
        floors = 1 if self.events >= TOP_N else 0
        return self.users + self.owners_with_agents + self.indexed_handles + 1 + routing + floors


def plan(db: Database) -> Plan:
    """What a rebuild started now would read, from one snapshot, as the rebuild reads it."""
    with db.transaction(repeatable_read=True) as conn:
        h = horizon(conn)
        handles = [handle for (handle,) in conn.execute("select handle from users")]
        agents, owners = one_row(conn, "select count(*), count(distinct owner_id) from agents")
        (events,) = one_row(
            conn, f"select count(*) from audit_events where tx_id < {_XID}", {"x": h}
        )
    indexed = sum(1 for handle in handles if is_valid_handle(handle))
    return Plan(h, len(handles), int(owners), indexed, int(agents), int(events))


def generation_keys(client: redis.Redis, gen: int) -> int:
    return sum(1 for _ in client.scan_iter(match=keys.gen_pattern(gen), count=1000))


def dry_run(db: Database, client: redis.Redis, out: Console) -> None:
    head = readmodel.head(client)
    what = plan(db)
    table = Table(title="rebuild --dry-run: nothing written", title_justify="left", box=box.SIMPLE)
    table.show_header = False
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    if head is None:
        table.add_row("current generation", "none (the API answers 503)")
    else:
        table.add_row("current generation", str(head.gen))
        table.add_row("its position", readmodel.position_text(head.cursor))
        table.add_row("its keys (freed after the swap)", f"{generation_keys(client, head.gen):,}")
    table.add_row("next generation", str(int(client.get(keys.NEXT_GEN) or 0) + 1))
    table.add_row("snapshot horizon (xid)", str(what.horizon))
    table.add_row("users", f"{what.users:,}")
    table.add_row("agents", f"{what.agents:,}")
    table.add_row("events below the horizon", f"{what.events:,}")
    table.add_row("estimated keys to write", f"{what.keys:,}")
    out.print(table)


def _events_covered(db: Database, pos: Position) -> int:
    with db.transaction() as conn:
        query = f"select count(*) from audit_events where (tx_id, seq) <= ({_XID}, %(n)s)"
        return int(one_row(conn, query, {"x": pos.xid, "n": pos.n})[0])


def rebuild(db: Database, client: redis.Redis, out: Console) -> None:
    settings = get_projector_settings()
    started = time.monotonic()
    gen = new_generation(client)
    print(f"building generation {gen} from one Postgres snapshot", flush=True)
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("elapsed"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=out) as progress:
        task = progress.add_task("reading the snapshot", total=None)

        def owners_written(done: int, total: int) -> None:
            progress.update(task, description="owners", completed=done, total=total)

        snapshot_into(db, client, gen, progress=owners_written)
        catch_up = progress.add_task("catching up", total=None)
        Projector(db, client, settings, gen=gen, mode=Mode.BUILDING).run(
            threading.Event(), until_caught_up=True
        )
        progress.update(catch_up, total=1, completed=1)
        users = int(progress.tasks[0].total or 0)
    old = swap_in(client, gen)
    freed = collect_garbage(client)
    head = readmodel.head(client)
    agents = int(client.hlen(keys.agent_owner(gen)))
    events = 0 if head is None else _events_covered(db, head.cursor.events)
    position = "?" if head is None else readmodel.position_text(head.cursor)
    # One plain line that ends in the seconds: scripts/benchkit reads the time from there.
    print(
        f"generation {gen} is live (replaced {old or 'nothing'}) at position {position}:"
        f" {users:,} users, {agents:,} agents, {events:,} events covered;"
        f" {freed:,} old keys freed; {time.monotonic() - started:.2f}s",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/rebuild.py", description=__doc__)
    parser.add_argument(
        "--dry-run", action="store_true", help="report what a rebuild would do; write nothing"
    )
    args = parser.parse_args(argv)
    logs.setup(default_level="WARNING")  # the script's own output is the report
    settings = get_projector_settings()
    db = Database(settings.database_url)
    client = connect(settings.redis_url)
    out = Console()
    try:
        if args.dry_run:
            dry_run(db, client, out)
        else:
            rebuild(db, client, out)
    finally:
        db.close()
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
