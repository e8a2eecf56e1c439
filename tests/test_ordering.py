"""Issue 2, points 1 and 3: commits out of seq order, rolled-back gaps, created_at order and ties.

A transaction's id is taken at its first write, its seq at each insert. To make a transaction
commit a higher seq than one still open *and* be readable while that one is open, the scenarios
give the "early" transactions their id first (``take_xid``), then let the holder insert (lowest
seq), then let the early ones insert and commit (higher seqs). While the holder is open the
seed SQL does not see its event either, so the dashboard must equal the SQL at every quiet
moment, before and after the holder commits.
"""

from __future__ import annotations

import random
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from functools import partial

from sqlalchemy import Connection, Engine, text

from projector.worker import Projector
from scripts import platform_sim as p
from tests.projection_helpers import (
    LiveProjector,
    answer,
    assert_sane,
    committed_seqs,
    drain,
    mismatches,
    seqs_shown,
    take_xid,
    wait_until,
    writers_running,
)

T0 = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
MICRO = timedelta(microseconds=1)


@dataclass
class Pair:
    slow: int
    slow_agent: int
    busy: int
    busy_agent: int


def _pair(engine: Engine) -> Pair:
    with engine.begin() as conn:
        slow = p.create_user(conn, "slowpoke", "Slow Poke")
        slow_agent = p.create_agent(conn, slow, "tortoise")
        busy = p.create_user(conn, "busybee")
        busy_agent = p.create_agent(conn, busy, "hare")
    return Pair(slow, slow_agent, busy, busy_agent)


def _committed_ids(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(text("select id::text from audit_events")).scalars())


def _open(stack: ExitStack, engine: Engine, n: int) -> list[Connection]:
    conns = [stack.enter_context(engine.connect()) for _ in range(n)]
    for conn in conns:
        conn.begin()
    return conns


def _commit_early(early: list[Connection], pair: Pair) -> list[int]:
    """Each early transaction writes one event per user and commits; returns slowpoke's seqs."""
    slow_seqs = []
    for i, conn in enumerate(early):
        slow_seqs.append(p.add_event(conn, pair.slow_agent, f"early-{i}")[1])
        p.add_event(conn, pair.busy_agent, f"early-{i}")
        conn.commit()
    return slow_seqs


def test_low_seq_held_open_while_higher_seqs_commit_live_projector(
    engine, settings, api, check_all
) -> None:
    pair = _pair(engine)
    with LiveProjector(settings) as live, ExitStack() as stack:
        wait_until(lambda: mismatches(engine, api), "first build")
        early = _open(stack, engine, 3)
        for conn in early:
            take_xid(conn)
        holder = stack.enter_context(engine.connect())
        holder_tx = holder.begin()
        held_seq = p.add_event(holder, pair.slow_agent, "held")[1]
        early_seqs = _commit_early(early, pair)
        assert min(early_seqs) > held_seq  # the scenario: higher seqs commit first

        wait_until(lambda: mismatches(engine, api), "events committed around the open one")
        assert sorted(seqs_shown(api, "slowpoke")) == sorted(early_seqs)

        # A transaction younger than the holder commits; the holder stays open for seconds.
        with engine.begin() as conn:
            young_seq = p.add_event(conn, pair.slow_agent, "young")[1]
        until = time.monotonic() + 2.0
        while time.monotonic() < until:
            live.assert_alive()
            status, body = answer(api, "slowpoke")
            assert status == 200 and body is not None
            assert_sane(body, _committed_ids(engine))
            assert held_seq not in [e["seq"] for e in body["recent_events"]]
            time.sleep(0.1)

        holder_tx.commit()
        wait_until(lambda: mismatches(engine, api), "after the held transaction committed")
        assert sorted(seqs_shown(api, "slowpoke")) == sorted([held_seq, young_seq, *early_seqs])
    assert check_all() == 2


def test_low_seq_held_open_stepwise_projector(
    engine, db, rclient, settings, catch_up, api, check_all
) -> None:
    pair = _pair(engine)
    with engine.begin() as conn:
        before = p.add_event(conn, pair.slow_agent, "before")[1]
    catch_up()
    projector = Projector(db, rclient, settings)
    with ExitStack() as stack:
        early = _open(stack, engine, 2)
        for conn in early:
            take_xid(conn)
        holder = stack.enter_context(engine.connect())
        holder_tx = holder.begin()
        held_seq = p.add_event(holder, pair.slow_agent, "held")[1]
        early_seqs = _commit_early(early, pair)
        assert min(early_seqs) > held_seq

        drain(projector)  # everything readable while the holder is open
        assert not mismatches(engine, api)
        assert sorted(seqs_shown(api, "slowpoke")) == sorted([before, *early_seqs])

        with engine.begin() as conn:  # younger than the holder, committed before it
            young = p.add_event(conn, pair.slow_agent, "young")[1]
        drain(projector)
        shown = seqs_shown(api, "slowpoke")
        assert held_seq not in shown and {before, *early_seqs} <= set(shown)

        holder_tx.commit()
        drain(projector)
        assert not mismatches(engine, api)
        everything = [before, held_seq, young, *early_seqs]
        assert sorted(seqs_shown(api, "slowpoke")) == sorted(everything)
    with engine.begin() as conn:
        after = p.add_event(conn, pair.slow_agent, "after")[1]
    catch_up()
    assert sorted(seqs_shown(api, "slowpoke")) == sorted([*everything, after])
    assert check_all() == 2


def test_rolled_back_transactions_leave_permanent_gaps(engine, settings, api, check_all) -> None:
    with engine.begin() as conn:
        gappy = p.create_user(conn, "gappy", "Gappy")
        one = p.create_agent(conn, gappy, "one")
        two = p.create_agent(conn, gappy, "two")
        other = p.create_user(conn, "other")
    committed: list[int] = []
    rolled: list[int] = []
    with LiveProjector(settings) as live:
        for i in range(6):
            with engine.connect() as conn:
                tx = conn.begin()
                seq = p.add_event(conn, one, f"try-{i}")[1]
                if i % 2:
                    tx.rollback()
                    rolled.append(seq)
                else:
                    tx.commit()
                    committed.append(seq)
        with engine.connect() as conn, conn.begin() as tx:
            # Entity changes that never happened, with an event that never happened.
            p.rename_agent(conn, one, "renamed")
            p.rename_user(conn, gappy, "gone")
            p.set_display_name(conn, gappy, "Gone")
            p.transfer_agent(conn, two, other)
            rolled.append(p.add_event(conn, two, "moved")[1])
            tx.rollback()
        with engine.connect() as hold:
            # A long transaction holds the horizon back, then rolls back: no NOTIFY comes.
            hold_tx = hold.begin()
            rolled.append(p.add_event(hold, one, "held")[1])
            with engine.begin() as conn:
                committed.append(p.add_event(conn, two, "young")[1])
            time.sleep(1.5)
            live.assert_alive()
            hold_tx.rollback()
        wait_until(lambda: mismatches(engine, api), "after the rollbacks")

    with engine.connect() as conn:
        assert committed_seqs(conn) == set(committed)  # the rolled-back seqs are gaps for ever
    assert max(committed) > max(rolled)
    assert set(seqs_shown(api, "gappy")) == set(committed)
    status, body = answer(api, "GAPPY")
    assert status == 200 and body is not None
    assert (body["display_name"], body["agent_count"]) == ("Gappy", 2)
    assert {e["agent_name"] for e in body["recent_events"]} == {"one", "two"}
    assert answer(api, "gone")[0] == 404
    assert seqs_shown(api, "other") == []
    assert check_all() == 2


def _plan_transactions(rng: random.Random, agents_of: dict[int, list[int]]) -> list[list[int]]:
    # Every user gets exactly 12 planned events, so every committed event is in some top 12.
    slots = [rng.choice(agents) for agents in agents_of.values() for _ in range(12)]
    rng.shuffle(slots)
    plan: list[list[int]] = []
    while slots:
        size = rng.randint(1, 3)
        plan.append(slots[:size])
        slots = slots[size:]
    return plan


def test_concurrent_writers_commit_out_of_seq_order(engine, settings, api, check_all) -> None:
    rng = random.Random(20251)
    with engine.begin() as conn:
        agents_of = {}
        for u in range(8):
            uid = p.create_user(conn, f"writer-{u}")
            agents_of[uid] = [p.create_agent(conn, uid, f"w{u}-a{k}") for k in range(2)]
    plan = _plan_transactions(rng, agents_of)
    commits: list[tuple[int, int]] = []  # (min seq, max seq) in commit order
    lock = threading.Lock()

    def writer(index: int, stop: threading.Event) -> None:
        wrng = random.Random(index)
        for txn in plan[index::4]:
            if stop.is_set():
                return
            with engine.connect() as conn:
                tx = conn.begin()
                seqs = [p.add_event(conn, agent, f"t{index}")[1] for agent in txn]
                time.sleep(wrng.uniform(0, 0.25))
                if wrng.random() < 0.15:
                    tx.rollback()
                    continue
                with lock:
                    tx.commit()
                    commits.append((min(seqs), max(seqs)))

    with LiveProjector(settings) as live:
        with writers_running([partial(writer, i) for i in range(4)]) as threads:
            while any(t.is_alive() for t in threads):
                live.assert_alive()
                _assert_all_sane(engine, api)
                time.sleep(0.1)
        wait_until(lambda: mismatches(engine, api), "after the writers stopped")

    # The scenario happened: some transaction committed after one holding a higher seq.
    assert any(
        later[0] < earlier[1] for i, earlier in enumerate(commits) for later in commits[i + 1 :]
    )
    shown = [s for u in range(8) for s in seqs_shown(api, f"writer-{u}")]
    with engine.connect() as conn:
        every = committed_seqs(conn)
    assert len(shown) == len(set(shown)), "an event shown twice"
    assert set(shown) == every, f"skipped: {sorted(every - set(shown))}"
    assert check_all() == 8


def _assert_all_sane(engine: Engine, api) -> None:
    with engine.connect() as conn:
        handles = list(conn.execute(text("select handle from users")).scalars())
    for handle in handles:
        status, body = answer(api, handle)
        if status == 503:
            continue  # the first build has not happened yet
        assert status == 200 and body is not None, (handle, status)
        assert_sane(body, _committed_ids(engine))


# -- point 3: created_at order ------------------------------------------------------------------
def _minutes(n: float) -> datetime:
    return T0 + timedelta(minutes=n)


def test_backdated_events_never_displace_newer_ones(engine, catch_up, api, check_all) -> None:
    with engine.begin() as conn:
        keeper = p.create_user(conn, "timekeeper")
        clock = p.create_agent(conn, keeper, "clock")
        sparse = p.create_user(conn, "sparse")
        few = p.create_agent(conn, sparse, "few")
        w = [p.add_event(conn, clock, created_at=_minutes(i))[1] for i in range(12)]
        s = [p.add_event(conn, few, created_at=_minutes(60 * i))[1] for i in range(3)]
    catch_up()
    assert seqs_shown(api, "timekeeper") == w[::-1]

    with engine.begin() as conn:
        old = p.add_event(conn, clock, "late-report", created_at=T0 - timedelta(days=30))[1]
        sparse_old = p.add_event(conn, few, created_at=T0 - timedelta(days=30))[1]
    catch_up()
    assert seqs_shown(api, "timekeeper") == w[::-1]  # not displaced by a higher seq
    body = answer(api, "timekeeper")[1]
    assert body is not None
    assert body["chain_meta"]["owner_chain_height"] == old
    assert datetime.fromisoformat(body["chain_meta"]["latest_event_at"]) == _minutes(11)
    assert seqs_shown(api, "sparse") == [s[2], s[1], s[0], sparse_old]
    assert check_all() == 2

    with engine.begin() as conn:  # back-dated into the middle of the window
        mid = p.add_event(conn, clock, created_at=_minutes(5.5))[1]
    catch_up()
    assert seqs_shown(api, "timekeeper") == [*w[:5:-1], mid, *w[5:0:-1]]

    with engine.begin() as conn:  # newer on top, older again ignored, in one batch
        new = p.add_event(conn, clock, created_at=T0 + timedelta(days=1))[1]
        p.add_event(conn, clock, created_at=T0 - timedelta(days=1))
        ist = timezone(timedelta(hours=5, minutes=30))  # same instant order in any offset
        newest = p.add_event(conn, clock, created_at=(T0 + timedelta(days=2)).astimezone(ist))[1]
    catch_up()
    assert seqs_shown(api, "timekeeper") == [newest, new, *w[:5:-1], mid, *w[5:2:-1]]
    assert check_all() == 2


def test_equal_created_at_ordered_by_seq_desc(
    engine, db, rclient, settings, catch_up, api, check_all
) -> None:
    with engine.begin() as conn:
        tied = p.create_user(conn, "tied")
        agents = [p.create_agent(conn, tied, f"twin-{k}") for k in range(3)]
        same = p.create_user(conn, "same-tx")
        solo = p.create_agent(conn, same, "solo")
    seqs: list[int] = []
    with engine.begin() as conn:
        seqs += [p.add_event(conn, agents[i % 3], created_at=T0)[1] for i in range(6)]
        # No created_at: now() is the transaction's start, so these three tie as well.
        same_tx = [p.add_event(conn, solo)[1] for _ in range(3)]
    catch_up()
    assert seqs_shown(api, "tied") == sorted(seqs, reverse=True)
    assert seqs_shown(api, "same-tx") == same_tx[::-1]
    for batch in (6, 3):
        with engine.begin() as conn:
            seqs += [p.add_event(conn, agents[i % 3], created_at=T0)[1] for i in range(batch)]
    catch_up()
    assert seqs_shown(api, "tied") == sorted(seqs, reverse=True)[:12]

    with engine.begin() as conn:  # one microsecond either side of the tie
        up = p.add_event(conn, agents[2], created_at=T0 + MICRO)[1]
        p.add_event(conn, agents[0], created_at=T0 - MICRO)
    catch_up()
    assert seqs_shown(api, "tied") == [up, *sorted(seqs, reverse=True)[:11]]
    assert check_all() == 2

    # A tie whose lower seq commits last, applied batch by batch.
    projector = Projector(db, rclient, settings)
    later = T0 + 2 * MICRO
    with ExitStack() as stack:
        early = _open(stack, engine, 1)[0]
        take_xid(early)
        holder = _open(stack, engine, 1)[0]
        held = p.add_event(holder, agents[1], created_at=later)[1]
        early_seqs = [p.add_event(early, agents[k], created_at=later)[1] for k in (0, 2)]
        early.commit()
        drain(projector)
        assert seqs_shown(api, "tied")[:3] == [*early_seqs[::-1], up]
        holder.commit()
        drain(projector)
    assert seqs_shown(api, "tied")[:4] == [*early_seqs[::-1], held, up]
    assert check_all() == 2
