"""Operator commands (issue 5): verify, status and rebuild --dry-run, run as real processes.

verify must pass on a healthy system under live writes and name the user whose document was
corrupted; status must say what Redis and Postgres say; a dry run must leave Redis untouched.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable, Iterator

import orjson
import pytest
import redis
from sqlalchemy import Engine, text

from models import keys
from projector import readmodel
from scripts import platform_sim as p
from scripts.throwaway import free_port
from tests.procs import Proc, ProcGroup
from tests.test_faults import seed

USERS, AGENTS_PER_USER, EVENTS = 8, 2, 300


def wait_for(check: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.05)


def max_seq(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(text("select coalesce(max(seq), 0) from audit_events")).scalar_one()
        )


def caught_up(engine: Engine, rclient: redis.Redis) -> Callable[[], bool]:
    def check() -> bool:
        head = readmodel.head(rclient)
        return head is not None and head.height == max_seq(engine)

    return check


def run(procs: ProcGroup, script: str, *args: str) -> tuple[int | None, str]:
    proc = procs.script(script, *args)
    code = proc.wait(120)
    return code, proc.log()


@pytest.fixture
def live(engine: Engine, rclient: redis.Redis, procs: ProcGroup) -> Iterator[Proc]:
    """A seeded database with a projector running and caught up."""
    seed(engine, users=USERS, agents_per_user=AGENTS_PER_USER, events=EVENTS)
    projector = procs.projector(IDLE_POLL_SECONDS="0.1")
    wait_for(caught_up(engine, rclient), "the projector to catch up")
    yield projector


class Writer:
    """Events committed one transaction at a time while a script runs."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.stop = threading.Event()
        self.written = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = random.Random(5)
        with self.engine.connect() as conn:
            agents = list(conn.execute(text("select id from agents")).scalars())
        while not self.stop.is_set():
            with self.engine.begin() as conn:
                for _ in range(rng.randint(1, 4)):
                    p.add_event(conn, rng.choice(agents))
            self.written += 1
            self.stop.wait(0.01)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def corrupt(
    rclient: redis.Redis, engine: Engine, handle: str, change: Callable[[dict], None]
) -> None:
    with engine.connect() as conn:
        uid = conn.execute(
            text("select id from users where handle = :h"), {"h": handle}
        ).scalar_one()
    gen = int(rclient.get(keys.CURRENT) or 0)
    doc = orjson.loads(rclient.get(keys.user_doc(gen, uid)) or b"{}")
    change(doc)
    rclient.set(keys.user_doc(gen, uid), orjson.dumps(doc))


@pytest.mark.timeout(300)
def test_verify_passes_under_live_writes_and_names_a_corrupted_user(
    engine: Engine, rclient: redis.Redis, procs: ProcGroup, live: Proc
) -> None:
    with Writer(engine) as writer:
        code, out = run(procs, "scripts/verify.py", "--timeout", "60")
        assert writer.written > 0
    assert code == 0, out
    assert f"OK: {USERS} users checked" in out
    wait_for(caught_up(engine, rclient), "the writer's events applied")

    def drop_newest(doc: dict) -> None:
        doc["recent_events"].pop(0)

    def wrong_height(doc: dict) -> None:
        doc["chain_meta"]["owner_chain_height"] -= 1

    # A user mid-update is waited for, not reported: the horizon is held back (an open
    # transaction with an xid) while an event of Seed-1's is committed, so the projector cannot
    # apply it until the holder ends, and verify meets the difference first.
    with engine.connect() as holder:
        holder.execute(text("select pg_current_xact_id()"))
        with engine.begin() as conn:
            agent = conn.execute(
                text(
                    "select min(a.id) from agents a join users u on u.id = a.owner_id"
                    " where u.handle = 'Seed-1'"
                )
            ).scalar_one()
            p.add_event(conn, agent)
        verify = procs.script("scripts/verify.py", "--timeout", "60")
        assert verify.wait_for_log("Seed-1: differs from the SQL", 60), verify.log()
        holder.rollback()
    assert verify.wait(120) == 0, verify.log()
    assert f"OK: {USERS} users checked, 1 re-checked" in verify.log()

    corrupt(rclient, engine, "Seed-3", drop_newest)
    corrupt(rclient, engine, "Seed-6", wrong_height)
    gen = int(rclient.get(keys.CURRENT) or 0)
    rclient.set(keys.user_doc(gen, 999_999), b'{"handle":"ghost"}')  # a deletion never applied
    code, out = run(procs, "scripts/verify.py", "--timeout", "5")
    assert code == 1, out
    lines = [line for line in out.splitlines() if line.startswith("DRIFT ")]
    assert any(line.startswith("DRIFT Seed-3 recent_events (seqs)") for line in lines), out
    assert any(line.startswith("DRIFT Seed-6 chain_meta.owner_chain_height") for line in lines), out
    assert any(line.startswith("DRIFT (user id 999999) document") for line in lines), out
    assert {line.split()[1] for line in lines} == {"Seed-3", "Seed-6", "(user"}, out
    assert f"{USERS} users checked" in out and "3 with drift" in out

    # A sample: only the chosen users are looked at, the same ones for the same seed.
    code, out = run(procs, "scripts/verify.py", "--sample", "3", "--seed", "7")
    again = run(procs, "scripts/verify.py", "--sample", "3", "--seed", "7")
    assert "3 users checked" in out, out
    assert code == again[0] and code in (0, 1)
    drifted = {line.split()[1] for line in out.splitlines() if line.startswith("DRIFT ")}
    assert drifted == {
        line.split()[1] for line in again[1].splitlines() if line.startswith("DRIFT ")
    }
    assert drifted <= {"Seed-3", "Seed-6"}


@pytest.mark.timeout(180)
def test_status_shows_the_generation_leader_and_users(
    engine: Engine, rclient: redis.Redis, procs: ProcGroup, live: Proc
) -> None:
    def status() -> dict:
        code, out = run(procs, "scripts/status.py", "--json")
        assert code == 0, out
        return dict(orjson.loads(out[out.index("{") :]))

    # The heartbeat carries the horizon the projector has read past: then the lag is known.
    wait_for(lambda: status()["lag_seconds"] == 0, "a lag of 0 once caught up")
    got = status()
    assert got["generation"] == int(rclient.get(keys.CURRENT) or 0)
    assert got["global_chain_height"] == max_seq(engine)
    assert got["users"] == USERS
    assert got["leader"]["holder"] == f"{socket.gethostname()}:{live.pid}"
    assert got["leader"]["token"] == got["leader"]["latest_token"]
    assert got["leader"]["token"] == int(rclient.get(keys.LEADER_TOKEN) or 0)
    assert got["heartbeat_age_seconds"] is not None and got["heartbeat_age_seconds"] >= 0
    assert got["redis_used_memory"] == pytest.approx(
        int(rclient.info("memory")["used_memory"]), rel=0.5
    )
    code, table = run(procs, "scripts/status.py")
    assert code == 0, table
    assert f"generation {got['generation']}" in " ".join(table.split())
    assert f"{socket.gethostname()}:{live.pid}" in table

    # Postgres down: what Redis knows is still shown, what Postgres would say is unknown.
    dead = procs.script(
        "scripts/status.py", "--json", DATABASE_URL=f"postgresql://x@127.0.0.1:{free_port()}/x"
    )
    assert dead.wait(60) == 0, dead.log()
    blind = dict(orjson.loads(dead.log()[dead.log().index("{") :]))
    assert blind["generation"] == got["generation"] and blind["users"] == USERS
    assert blind["oldest_transaction_age_seconds"] is None and "Postgres unreachable" in dead.log()

    live.stop()
    rclient.delete(keys.HEARTBEAT, keys.LEADER)
    assert status()["leader"] is None and status()["heartbeat_age_seconds"] is None


def redis_contents(client: redis.Redis) -> dict[bytes, bytes | None]:
    return {key: client.dump(key) for key in client.scan_iter(count=1000)}


@pytest.mark.timeout(180)
def test_rebuild_dry_run_writes_nothing_and_its_estimate_holds(
    engine: Engine, rclient: redis.Redis, procs: ProcGroup
) -> None:
    seed(engine, users=USERS, agents_per_user=AGENTS_PER_USER, events=EVENTS)
    with engine.begin() as conn:  # an owner without agents, a handle the index leaves out
        p.create_user(conn, "no-agents")
        p.create_user(conn, "alice:{u1}")
    procs.catch_up()
    before = redis_contents(rclient)
    code, out = run(procs, "scripts/rebuild.py", "--dry-run")
    assert code == 0, out
    assert redis_contents(rclient) == before
    flat = " ".join(out.split())
    assert "current generation 1" in flat
    assert f"users {USERS + 2}" in flat
    assert f"agents {USERS * AGENTS_PER_USER}" in flat
    assert f"events below the horizon {EVENTS}" in flat
    # documents + agents hashes + indexed handles + global + agent-owner + floors (the seeded
    # owners have far more than 12 events each)
    estimate = (USERS + 2) + USERS + (USERS + 1) + 3
    assert f"estimated keys to write {estimate}" in flat
    old_keys = sum(1 for _ in rclient.scan_iter(match=keys.gen_pattern(1)))
    assert f"its keys (freed after the swap) {old_keys}" in flat

    code, out = run(procs, "scripts/rebuild.py")
    assert code == 0, out
    assert int(rclient.get(keys.CURRENT) or 0) == 2
    assert sum(1 for _ in rclient.scan_iter(match=keys.gen_pattern(2))) == estimate
    assert (
        f"{USERS + 2} users, {USERS * AGENTS_PER_USER} agents, {EVENTS} events covered;"
        f" {old_keys} old keys freed;" in out
    ), out
