"""Compare the served read model with the SQL, user by user, while the system runs.

Each user's expected dashboard comes from the README's SQL (projector/oracle.py), read in one
snapshot together with the newest change that snapshot holds (the target). What is served is
read from Redis the way the API reads it. A user who differs may just be mid-update: the check
is repeated once the projector's cursor has passed the target, and only a difference that
stays, while the SQL for that user has not moved, is drift. A full run (no ``--sample``) also
looks for documents of users Postgres does not have. Exits 1 on drift, 0 otherwise.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import redis
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import NoResultFound

from models import keys
from models.handles import is_valid_handle
from models.settings import get_projector_settings
from projector import logs, readmodel
from projector.oracle import expected, normalise
from projector.records import Cursor, Position
from projector.sink import connect

# The newest change of each stream in the snapshot: once the projector's cursor is at or past
# both, everything the snapshot saw has been applied. Qualified names in ORDER BY: a bare
# ``tx_id`` would name the text output column, and sort every row instead of using the index.
_TARGET = """
select e.etx, e.eseq, c.ctx, c.cid from (select 1) one
left join lateral (select a.tx_id::text as etx, a.seq as eseq from audit_events a
    order by a.tx_id desc, a.seq desc limit 1) e on true
left join lateral (select p.tx_id::text as ctx, p.id as cid from projector_entity_changes p
    order by p.tx_id desc, p.id desc limit 1) c on true
"""
GLOBAL_FIELD = "global_chain_height"
_DOC_ID = re.compile(r"\{u(\d+)\}:doc$")


@dataclass(frozen=True)
class Truth:
    want: dict[str, Any] | None  # None: the user is gone
    target: Cursor


@dataclass(frozen=True)
class Drift:
    handle: str
    field: str
    expected: str
    served: str


def passed(cursor: Cursor, target: Cursor) -> bool:
    return cursor.events >= target.events and cursor.changes >= target.changes


class Verifier:
    def __init__(
        self,
        engine: Engine,
        client: redis.Redis,
        timeout: float,
        notice: Callable[[str], None] = print,
    ) -> None:
        self.engine = engine
        self.client = client
        self.timeout = timeout
        self.notice = notice
        self.rechecked = 0

    def truth(self, user_id: int) -> Truth:
        with self.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
            with conn.begin():
                target = self._target(conn)
                try:
                    want: dict[str, Any] | None = expected(conn, user_id)
                except NoResultFound:
                    want = None
        return Truth(want, target)

    @staticmethod
    def _target(conn: Connection) -> Cursor:
        r = conn.execute(text(_TARGET)).one()
        events = Position(int(r.etx), r.eseq) if r.etx is not None else Position()
        changes = Position(int(r.ctx), r.cid) if r.ctx is not None else Position()
        return Cursor(events, changes)

    def check(self, user_id: int, handle: str) -> list[Drift]:
        """Drift of one user: [] when the served dashboard agrees with the SQL."""
        truth = self.truth(user_id)
        served = readmodel.served_user(self.client, user_id, handle)
        found = compare(handle, user_id, truth.want, served)
        if not found:
            return []
        self.rechecked += 1
        self.notice(
            f"{handle}: differs from the SQL ({found[0].field}); waiting for the projector"
            f" to pass the snapshot, at most {self.timeout:g}s"
        )
        return self._settle(user_id, handle, truth)

    def _settle(self, user_id: int, handle: str, truth: Truth) -> list[Drift]:
        # Wait until the projector has applied all the snapshot saw, then look again; a
        # difference with the SQL unchanged since is drift, not lag.
        deadline = time.monotonic() + self.timeout
        while True:
            served = self._served_past(user_id, handle, truth.target, deadline)
            found = compare(handle, user_id, truth.want, served)
            if not found:
                return []
            later = self.truth(user_id)
            reached = served is not None and passed(served.head.cursor, truth.target)
            if (reached and later.want == truth.want) or time.monotonic() >= deadline:
                return found
            truth = later

    def _served_past(
        self, user_id: int, handle: str, target: Cursor, deadline: float
    ) -> readmodel.ServedUser | None:
        while True:
            served = readmodel.served_user(self.client, user_id, handle)
            if served is not None and passed(served.head.cursor, target):
                return served
            if time.monotonic() >= deadline:
                return served
            time.sleep(0.05)

    def check_global(self) -> list[Drift]:
        """The shared global height: at least the SQL's once the cursor passed its snapshot,
        and never above what Postgres holds after."""
        with self.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
            with conn.begin():
                target = self._target(conn)
                before = conn.execute(text("select coalesce(max(seq), 0) from audit_events"))
                low = int(before.scalar_one())
        head = self._head_past(target)
        with self.engine.connect() as conn:
            high = int(
                conn.execute(text("select coalesce(max(seq), 0) from audit_events")).one()[0]
            )
        if head is None:
            return [Drift("*", "read model", "present", "absent (rm:current unset)")]
        if low <= head.height <= high:
            return []
        return [Drift("*", GLOBAL_FIELD, f"between {low} and {high}", str(head.height))]

    def _head_past(self, target: Cursor) -> readmodel.Head | None:
        deadline = time.monotonic() + self.timeout
        head = readmodel.head(self.client)
        while head is not None and not passed(head.cursor, target):
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
            head = readmodel.head(self.client)
        return head

    def check_orphans(self) -> list[Drift]:
        """Documents of users Postgres does not have (a deletion that was never applied)."""
        suspects = self._orphans(None)
        if suspects:
            # A user created or deleted around the snapshot is no orphan: look again, against
            # a later snapshot the projector has passed.
            suspects = self._orphans(suspects)
        return [
            Drift(f"(user id {uid})", "document", "absent (no such user)", "present")
            for uid in sorted(suspects)
        ]

    def _orphans(self, among: set[int] | None) -> set[int]:
        with self.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
            with conn.begin():
                target = self._target(conn)
                known = set(conn.execute(text("select id from users")).scalars())
        head = self._head_past(target)
        if head is None:
            return set()
        if among is None:
            pattern = keys.user_doc(head.gen, 0).replace("{u0}", "{u*}")
            scanned = self.client.scan_iter(match=pattern, count=1000)
            found = {int(_DOC_ID.findall(k.decode())[0]) for k in scanned}
        else:
            found = {uid for uid in among if self.client.exists(keys.user_doc(head.gen, uid))}
        return found - known


def compare(
    handle: str,
    user_id: int,
    want: dict[str, Any] | None,
    served: readmodel.ServedUser | None,
) -> list[Drift]:
    if served is None:
        return [Drift(handle, "read model", "present", "absent (rm:current unset)")]
    if want is None:  # deleted since the list was read: nothing of theirs may be served
        if served.body is None:
            return []
        return [Drift(handle, "document", "absent (user deleted)", "present")]
    if served.body is None:
        return [Drift(handle, "document", "present", "absent")]
    got = normalise(served.body)
    drifts = differences(handle, want, got)
    if is_valid_handle(handle) and served.indexed_as != user_id:
        drifts.append(Drift(handle, "handle index", str(user_id), str(served.indexed_as)))
    return drifts


def differences(handle: str, want: dict[str, Any], got: dict[str, Any]) -> list[Drift]:
    """Field by field, the shared global height left to ``check_global``."""
    out: list[Drift] = []
    for key in ("handle", "display_name", "agent_count"):
        if want[key] != got[key]:
            out.append(Drift(handle, key, repr(want[key]), repr(got[key])))
    for key in ("owner_chain_height", "latest_event_at"):
        w, g = want["chain_meta"][key], got["chain_meta"][key]
        if w != g:
            out.append(Drift(handle, f"chain_meta.{key}", str(w), str(g)))
    out += _event_drift(handle, want["recent_events"], got["recent_events"])
    return out


def _event_drift(handle: str, want: list[dict[str, Any]], got: list[dict[str, Any]]) -> list[Drift]:
    ws, gs = [e["seq"] for e in want], [e["seq"] for e in got]
    if ws != gs:
        return [Drift(handle, "recent_events (seqs)", str(ws), str(gs))]
    out = []
    for a, b in zip(want, got, strict=True):
        for f in sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)):
            out.append(
                Drift(handle, f"recent_events[seq {a['seq']}].{f}", str(a.get(f)), str(b.get(f)))
            )
    return out


def users(engine: Engine, sample: int | None, seed: int | None) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        rows = [
            (r.id, r.handle) for r in conn.execute(text("select id, handle from users order by id"))
        ]
    if sample is not None and sample < len(rows):
        rows = sorted(random.Random(seed).sample(rows, sample))
    return rows


def report(console: Console, drifts: list[Drift]) -> None:
    table = Table(title=f"drift: {len(drifts)} field(s)", title_justify="left")
    for column in ("handle", "field", "expected (SQL)", "served (Redis)"):
        table.add_column(column, overflow="fold")
    for d in drifts:
        table.add_row(d.handle, d.field, d.expected, d.served)
    console.print(table)
    for d in drifts:  # also one plain line each, for grep and logs
        print(f"DRIFT {d.handle} {d.field}: expected {d.expected} served {d.served}")


def run(args: argparse.Namespace) -> int:
    settings = get_projector_settings()
    engine = create_engine(settings.database_url, pool_size=2, pool_pre_ping=True)
    client = connect(settings.redis_url)
    out = Console(width=120)
    bar = Console(stderr=True)
    started = time.monotonic()
    try:
        chosen = users(engine, args.sample, args.seed)
        drifts: list[Drift] = []
        columns = (
            TextColumn("verifying"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("users"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=bar) as progress:
            notice = partial(progress.console.print, soft_wrap=True)
            verifier = Verifier(engine, client, args.timeout, notice)
            task = progress.add_task("users", total=len(chosen))
            for user_id, handle in chosen:
                drifts += verifier.check(user_id, handle)
                progress.advance(task)
        drifts += verifier.check_global()
        if args.sample is None:
            drifts += verifier.check_orphans()
    finally:
        engine.dispose()
        client.close()
    drifted = sorted({d.handle for d in drifts})
    summary = (
        f"{len(chosen)} users checked, {verifier.rechecked} re-checked after waiting out the lag,"
        f" {len(drifted)} with drift; {time.monotonic() - started:.2f}s"
    )
    if drifts:
        report(out, drifts)
        out.print(f"[red]DRIFT[/red]: {summary} ({', '.join(drifted)})")
        return 1
    out.print(f"[green]OK[/green]: {summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/verify.py", description=__doc__)
    parser.add_argument("--sample", type=int, help="check this many random users, not all")
    parser.add_argument("--seed", type=int, help="seed of the random sample (repeatable runs)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for the projector to reach a mismatching user's snapshot",
    )
    args = parser.parse_args(argv)
    logs.setup(default_level="WARNING")  # the script's own output is the report
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
