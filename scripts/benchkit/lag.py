"""Lag: commit to the event showing in the API's answer, under a background writer."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import orjson
import psycopg
from sqlalchemy import text

from scripts.benchkit.reads import Server, start_server
from scripts.benchkit.world import PYTHON, World, say, wait_for_quiet
from scripts.dataset import Shape

# -- lag ---------------------------------------------------------------------------------------
INSERT_EVENTS = """
insert into audit_events (id, agent_id, event_type, model, provider, hash, prev_hash)
select gen_random_uuid(), (%(agents)s::bigint[])[1 + floor(random() * %(n_agents)s)::int],
       %(type)s, 'gpt-5', 'openai', md5(random()::text) || md5(random()::text), null
from generate_series(1, %(per_commit)s)
returning seq
"""


class Writer(threading.Thread):
    """Commits ``per_commit`` events ``per_second`` times a second; notes when each committed."""

    def __init__(
        self,
        db_url: str,
        agents: list[int],
        per_commit: int,
        per_second: int,
        stop: threading.Event,
    ) -> None:
        super().__init__(daemon=True)
        self.db_url, self.stop, self.interval = db_url, stop, 1.0 / per_second
        self.params = {
            "agents": agents,
            "n_agents": len(agents),
            "type": "e2e.test" if per_commit > 1 else "inference",
            "per_commit": per_commit,
        }
        self.committed: dict[int, float] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.db_url, autocommit=True) as conn:
                due = time.monotonic()
                while not self.stop.is_set():
                    seqs = [row[0] for row in conn.execute(INSERT_EVENTS, self.params)]
                    at = time.monotonic()
                    self.committed.update((int(seq), at) for seq in seqs)
                    due += self.interval
                    self.stop.wait(max(0.0, due - time.monotonic()))
        except BaseException as exc:  # reported by the round, not lost in the thread
            self.error = exc


class Reader(threading.Thread):
    """Polls one dashboard in a tight loop; notes when each seq is first seen."""

    def __init__(self, url: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.stop = url, stop
        self.seen: dict[int, float] = {}
        self.requests = 0
        self.errors = 0

    def run(self) -> None:
        with httpx.Client(timeout=5) as http:
            while not self.stop.is_set():
                try:
                    answer = http.get(self.url)
                except httpx.HTTPError:
                    self.errors += 1
                    continue
                at = time.monotonic()
                self.requests += 1
                if answer.status_code != 200:
                    self.errors += 1
                    continue
                for event in orjson.loads(answer.content)["recent_events"]:
                    self.seen.setdefault(event["seq"], at)


@dataclass(frozen=True)
class QuietUser:
    user_id: int
    handle: str
    agent_id: int


@dataclass
class LagRound:
    round: int
    committed: int
    never_seen: int
    heavy_events: int
    reader_requests: int
    reader_errors: int
    lags_ms: list[float]

    @property
    def p50_ms(self) -> float:
        return percentile(self.lags_ms, 50)

    @property
    def p99_ms(self) -> float:
        return percentile(self.lags_ms, 99)

    @property
    def max_ms(self) -> float:
        return max(self.lags_ms, default=math.nan)


def percentile(values: Sequence[float], pct: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(pct / 100 * len(ordered)) - 1)]


def quiet_users(world: World) -> list[QuietUser]:
    query = text(
        "select u.id, u.handle, min(a.id) as agent_id from users u join agents a"
        " on a.owner_id = u.id where u.id > 2 group by u.id order by u.id limit 2"
    )
    with world.engine.connect() as conn:
        return [QuietUser(r.id, r.handle, r.agent_id) for r in conn.execute(query)]


def _drain(pairs: list[tuple[Writer, Reader]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(w.committed.keys() <= r.seen.keys() for w, r in pairs):
            return
        time.sleep(0.05)


def lag_round(world: World, rnd: int, api: Server, quiet: list[QuietUser]) -> LagRound:
    stop_writers, stop_readers = threading.Event(), threading.Event()
    heavy_agents = list(range(1, Shape().heavy_agents + 1))
    background = Writer(world.db_url, heavy_agents, 10, 100, stop_writers)
    pairs = [
        (
            Writer(world.db_url, [q.agent_id], 1, 100, stop_writers),
            Reader(api.url(q.handle), stop_readers),
        )
        for q in quiet
    ]
    threads: list[threading.Thread] = [background, *(t for pair in pairs for t in pair)]
    for thread in threads:
        thread.start()
    time.sleep(world.plan.lag_seconds)
    stop_writers.set()
    for writer in [background, *(w for w, _ in pairs)]:
        writer.join()
    _drain(pairs, timeout=2.0)
    stop_readers.set()
    for thread in threads:
        thread.join()
    return _lag_result(rnd, background, pairs)


def _lag_result(rnd: int, background: Writer, pairs: list[tuple[Writer, Reader]]) -> LagRound:
    for writer in [background, *(w for w, _ in pairs)]:
        if writer.error is not None:
            raise RuntimeError(f"a lag writer failed: {writer.error!r}")
    lags = [
        round((reader.seen[seq] - at) * 1000, 3)
        for writer, reader in pairs
        for seq, at in writer.committed.items()
        if seq in reader.seen
    ]
    committed = sum(len(w.committed) for w, _ in pairs)
    return LagRound(
        round=rnd,
        committed=committed,
        never_seen=committed - len(lags),
        heavy_events=len(background.committed),
        reader_requests=sum(r.requests for _, r in pairs),
        reader_errors=sum(r.errors for _, r in pairs),
        lags_ms=lags,
    )


def measure_lag(world: World) -> list[LagRound]:
    quiet = quiet_users(world)
    say(f"lag: quiet owners {[q.handle for q in quiet]}; starting the API and the projector")
    projector = world.procs.start("projector-live", [PYTHON, "-m", "projector"])
    api: Server | None = None
    try:
        api = start_server(world, "api", "api-lag")
        rounds = []
        for rnd in range(1, world.plan.rounds + 1):
            wait_for_quiet()
            found = lag_round(world, rnd, api, quiet)
            rounds.append(found)
            say(
                f"lag round {rnd}: {found.committed:,} quiet events, p50 {found.p50_ms:.1f} ms,"
                f" p99 {found.p99_ms:.1f} ms, max {found.max_ms:.1f} ms, never seen"
                f" {found.never_seen}; {found.heavy_events:,} background events;"
                f" {found.reader_requests:,} reads ({found.reader_errors} errors)"
            )
        return rounds
    finally:
        if api is not None:
            world.procs.stop(api.proc)
        world.procs.stop(projector)
