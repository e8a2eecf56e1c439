"""The worker loop: while not asked to stop, take a batch, fold it, apply it, heartbeat."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import TypeVar

import orjson
import redis

from models import keys
from models.settings import ProjectorSettings
from projector.db import Database
from projector.fold import FoldResult, Loaded, fold
from projector.leader import Leadership
from projector.metrics import Metrics
from projector.policy import (
    TRANSIENT_ERRORS,
    Backoff,
    BatchLimit,
    brief,
    is_statement_timeout,
)
from projector.rebuild import (
    BUILD_MARKER_TTL_SECONDS,
    collect_garbage,
    new_generation,
    snapshot_into,
    swap_in,
)
from projector.records import AgentRow, Cursor, OwnerView, Position
from projector.render import floor_of, render_tail
from projector.sink import Deposed, Fenced, Head, Mode, Sink
from projector.source import (
    Floors,
    candidates,
    fetch_agents,
    fetch_users,
    horizon_and_xmax,
    owner_windows,
    ranks_with_floors,
    read_batch,
)
from projector.wakeup import Wakeup

log = logging.getLogger("projector")

VIEW_CACHE_LIMIT = 200_000
_V = TypeVar("_V")


@dataclass(frozen=True)
class StepResult:
    applied: int
    horizon: int


class Projector:
    def __init__(
        self,
        db: Database,
        client: redis.Redis,
        settings: ProjectorSettings,
        *,
        gen: int | None = None,
        mode: Mode = Mode.LIVE,
        leadership: Leadership | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.db = db
        self.client = client
        self.sink = Sink(client)
        self.settings = settings
        self.mode = mode
        self.leadership = leadership
        self.metrics = metrics or Metrics()
        self._passed: int | None = None  # horizon of the last batch that found nothing to read
        self._standing_by = False
        self.head: Head | None = None
        self._fixed_gen = gen
        self._last_heartbeat = 0.0
        self._stop = threading.Event()
        self._target: int | None = None
        self.batch_limit = BatchLimit(settings.batch_size)
        self._view_cache: dict[int, OwnerView] = {}
        self._owner_cache: dict[int, int] = {}

    # -- one batch -------------------------------------------------------------------------
    def step(self) -> StepResult:
        head = self.head or self._load_head()
        self.head = head
        started = time.perf_counter()
        with self.db.transaction(repeatable_read=True) as conn:
            batch = read_batch(
                conn, head.cursor.events, head.cursor.changes, self.batch_limit.value
            )
            if not batch.size:
                return StepResult(0, batch.horizon)
            pg_at = time.perf_counter()
            log_agents = {ent for _, _, kind, ent in batch.changes if kind == "a"}
            log_users = {ent for _, _, kind, ent in batch.changes if kind == "u"}
            agents: dict[int, AgentRow | None] = {a: row for a, (row, _) in batch.agents.items()}
            agents.update(fetch_agents(conn, log_agents - agents.keys()))
            owners = {a.owner_id for a in agents.values() if a is not None}
            # A live batch is ranked without floors: no hint to look up (or check).
            hints = self._floor_hints(head.gen, owners) if ranks_with_floors(batch) else {}
            # Postgres ranks the slice while this thread loads state from Redis: the two
            # waits overlap, and the connection is left to the ranking until it is done.
            with ThreadPoolExecutor(max_workers=1) as pool:
                ranking = pool.submit(candidates, conn, batch, hints)
                try:
                    # Who owned each agent before this batch: the state load needs it, the
                    # ranking does not, so it is looked up while Postgres ranks.
                    believed = self._agent_owners(head.gen, agents)
                    views = self._views(head.gen, owners | set(believed.values()) | log_users)
                finally:
                    events = ranking.result()
            state_at = time.perf_counter()
            wrong = _wrong_hints(hints, views)
            if wrong:
                # The hint may only ever cost speed: rank again by the documents' own floors.
                log.warning("floors hint above the stored tops of %d owners", len(wrong))
                events = candidates(conn, batch, _floors(views))
            # User rows change only through the log; other owners need theirs only when
            # the read model has never seen them.
            users = fetch_users(conn, log_users | (owners - views.keys()))
        read_at = time.perf_counter()
        heights = {agent_id: height for agent_id, (_, height) in batch.agents.items()}
        result = fold(Loaded(views, believed, agents, users, head.height), events, heights)
        cursor = Cursor(
            batch.events_end or head.cursor.events,
            Position(batch.changes[-1][0], batch.changes[-1][1])
            if batch.changes
            else head.cursor.changes,
        )
        folded_at = time.perf_counter()
        self._recompute(result, cursor)
        recomputed_at = time.perf_counter()
        tail = render_tail(head.gen, cursor, result.global_height, batch.committed_at)
        token = self.leadership.token if self.leadership is not None else None
        self.sink.apply(head.gen, self.mode, head.cursor, cursor, result, tail, token)
        self.head = Head(head.gen, cursor, result.global_height)
        self._remember(result)
        done = time.perf_counter()
        self.metrics.batch_applied(
            batch.event_count, len(batch.changes), len(result.views), done - started, self.head
        )
        self.metrics.committed(batch.committed_at)
        # One set of figures for both the text line and LOG_FORMAT=json's fields.
        figures = {
            "events": batch.event_count,
            "candidates": len(events),
            "changes": len(batch.changes),
            "owners": len(result.views),
            "recomputed": len(result.recompute),
            "read_s": round(read_at - started, 6),
            "slice_s": round(pg_at - started, 6),
            "state_s": round(state_at - pg_at, 6),
            "fold_s": round(folded_at - read_at, 6),
            "recompute_s": round(recomputed_at - folded_at, 6),
            "write_s": round(done - recomputed_at, 6),
            "seq": cursor.events.n,
        }
        log.info(
            "batch: %(events)d events (%(candidates)d candidates), %(changes)d entity changes"
            " -> %(owners)d owners written, %(recomputed)d recomputed; read %(read_s).3fs"
            " (slice %(slice_s).3fs, state+rank %(state_s).3fs) fold %(fold_s).3fs"
            " recompute %(recompute_s).3fs write %(write_s).3fs; at seq %(seq)d",
            figures,
            extra={"fields": figures},
        )
        return StepResult(batch.size, batch.horizon)

    # The projector is the only writer of its generation (the fence in every write proves it),
    # so what it last wrote is what Redis holds: it keeps that in memory instead of reading
    # thousands of documents back for every batch. Any doubt (a fence, an error) forgets it.
    def _agent_owners(self, gen: int, agent_ids: Collection[int]) -> dict[int, int]:
        return _read_through(self._owner_cache, agent_ids, partial(self.sink.agent_owners, gen))

    def _floor_hints(self, gen: int, owners: Collection[int]) -> Floors:
        # Each owner's floor (the 12th event of their top) lets Postgres drop most of a big
        # slice before sorting it. The documents hold the floors, but loading them is what the
        # ranking overlaps with; so ask the cache, then the floors hash written with them.
        hints: Floors = {}
        missing = []
        for uid in owners:
            view = self._view_cache.get(uid)
            if view is None:
                missing.append(uid)
            elif (floor := floor_of(view.top)) is not None:
                hints[uid] = floor
        return hints | self.sink.floors(gen, missing)

    def _views(self, gen: int, user_ids: Collection[int]) -> dict[int, OwnerView]:
        return _read_through(self._view_cache, user_ids, partial(self.sink.views, gen))

    def _remember(self, result: FoldResult) -> None:
        if len(self._view_cache) > VIEW_CACHE_LIMIT:
            self._view_cache.clear()
        self._view_cache.update(result.views)
        for uid in result.deleted_users:
            self._view_cache.pop(uid, None)
        self._owner_cache.update(result.agent_owner_set)
        for agent_id in result.agent_owner_del:
            self._owner_cache.pop(agent_id, None)

    def _forget(self) -> None:
        self.head = None
        self._view_cache.clear()
        self._owner_cache.clear()

    def _recompute(self, result: FoldResult, cursor: Cursor) -> None:
        if not result.recompute:
            return
        wanted = {uid: list(result.views[uid].agents) for uid in result.recompute}
        with self.db.transaction() as conn:
            windows = owner_windows(conn, wanted, cursor.events)
        for uid, (top, height) in windows.items():
            result.views[uid].top = top
            result.views[uid].height = height

    # -- position and generations ----------------------------------------------------------
    def _load_head(self) -> Head:
        gen = self._fixed_gen if self._fixed_gen is not None else self.sink.current_generation()
        head = None if gen is None else self.sink.head(gen)
        if head is not None:
            self.metrics.position(head)
            return head
        if self.mode is Mode.BUILDING:
            raise Fenced("the generation being built lost its data")
        log.warning("no read model in Redis (never built, or Redis lost it): rebuilding")
        return self.rebuild()

    def rebuild(self) -> Head:
        """Build a new generation, catch it up, swap it in; this projector then follows it."""
        gen = new_generation(self.client)
        self.metrics.rebuild_progress(0, 0)  # a new rebuild: the last one's figures are done
        snapshot_into(self.db, self.client, gen, progress=self.metrics.rebuild_progress)
        builder = Projector(self.db, self.client, self.settings, gen=gen, mode=Mode.BUILDING)
        builder.run(self._stop, until_caught_up=True)
        old = swap_in(self.client, gen)
        log.info("generation %d is live (replaced %s)", gen, old)
        collect_garbage(self.client)
        head = self.sink.head(gen)
        if head is None:
            raise Fenced(f"generation {gen} vanished right after the swap")
        self._forget()
        self.head = head
        self.metrics.position(head)
        return head

    def _still_current(self) -> bool:
        if self.head is None:
            return False
        if self.mode is Mode.BUILDING:
            return bool(self.client.exists(keys.building(self.head.gen)))
        return self.sink.current_generation() == self.head.gen

    def heartbeat(self) -> None:
        if self.mode is Mode.BUILDING:
            if self._fixed_gen is not None:
                self.client.expire(keys.building(self._fixed_gen), BUILD_MARKER_TTL_SECONDS)
            return
        now = time.time()
        if now - self._last_heartbeat < 1.0:
            return
        self._last_heartbeat = now
        body: dict[str, object] = {"at": now}
        if self.head is not None:
            body |= {"gen": self.head.gen, "event_seq": self.head.cursor.events.n}
        if self._passed is not None:
            # For scripts/status.py: a commit below this horizon has been read, so no lag.
            body["horizon"] = self._passed
        self.client.set(keys.HEARTBEAT, orjson.dumps(body), ex=self.settings.heartbeat_ttl_seconds)

    # -- the loop --------------------------------------------------------------------------
    def run(self, stop: threading.Event, *, until_caught_up: bool = False) -> None:
        """Apply batches until ``stop`` is set (or, with ``until_caught_up``, until caught up)."""
        self._stop = stop
        self._target = None
        wakeup = None if until_caught_up else Wakeup(self.settings.database_url)
        backoff = Backoff(self.settings.max_backoff_seconds)
        try:
            while not stop.is_set():
                if not self._lead(stop, backoff):
                    continue
                outcome = self._attempt(until_caught_up, backoff)
                if outcome is _Outcome.DONE:
                    return
                if outcome is _Outcome.IDLE:
                    if wakeup is not None:
                        wakeup.wait(self.settings.idle_poll_seconds)
                    else:
                        stop.wait(0.02)
        finally:
            if wakeup is not None:
                wakeup.close()

    def _attempt(self, until_caught_up: bool, backoff: Backoff) -> _Outcome:
        """One pass of the loop, with every recoverable failure turned into "go again"."""
        try:
            outcome = self._once(until_caught_up)
        except Deposed as deposed:
            self.metrics.fenced("leader")
            self._stand_down(deposed)
            return _Outcome.BUSY
        except Fenced as fenced:
            if self.mode is Mode.BUILDING:
                raise
            self.metrics.fenced(str(fenced))
            log.warning("write fenced (%s); reloading position from Redis", fenced)
            self._forget()
            return _Outcome.BUSY
        except TRANSIENT_ERRORS as exc:
            self._forget()
            self._wait_out(exc, backoff)
            return _Outcome.BUSY
        backoff.reset()
        self.batch_limit.succeeded()
        return outcome

    def _wait_out(self, exc: BaseException, backoff: Backoff) -> None:
        # Nothing of the failed batch was applied (the write is all or nothing), so the
        # position in Redis is still where the batch started, and the batch is read again whole.
        self.metrics.store_error(exc)
        if is_statement_timeout(exc):
            limit = self.batch_limit.shrink()
            log.warning(
                "Postgres cancelled the batch (%s); retrying it whole, at most %d events",
                brief(exc),
                limit,
            )
            return
        delay = backoff.next()
        if isinstance(exc, redis.OutOfMemoryError):
            log.error(
                "Redis is out of memory (maxmemory, noeviction policy): it refused the write,"
                " nothing was applied; retrying in %.2fs",
                delay,
            )
        else:
            log.warning("store unreachable (%s); retrying in %.2fs", brief(exc), delay)
        self._stop.wait(delay)

    def _lead(self, stop: threading.Event, backoff: Backoff) -> bool:
        """True if this projector may write now; otherwise stand by for a while."""
        lead = self.leadership
        if lead is None or lead.held():
            return True
        try:
            if lead.try_acquire():
                self.metrics.leading(lead.token)
                self._standing_by = False
                self._forget()  # whatever the last leader wrote is news to this one
                return True
        except TRANSIENT_ERRORS as exc:
            # Postgres (or Redis) is down: not a reason to stand by, a reason to back off.
            self._wait_out(exc, backoff)
            return False
        self.metrics.standing_by()
        if not self._standing_by:
            log.info("standing by: another projector leads")
            self._standing_by = True
        stop.wait(self.settings.standby_poll_seconds)
        return False

    def _stand_down(self, deposed: Deposed) -> None:
        self._forget()
        lead = self.leadership
        if lead is not None and lead.confirm():
            # The lease is still ours, so no one else leads: Redis lost the token counter
            # (restarted empty). Take a fresh token and carry on.
            lead.new_token()
            self.metrics.leading(lead.token)
            log.warning("fencing token unknown to Redis; took a new one (%d)", lead.token)
            return
        log.warning("write refused (%s): another projector leads now; standing by", deposed)
        self.metrics.standing_by()
        if lead is not None:
            lead.release()

    def _once(self, until_caught_up: bool) -> _Outcome:
        if until_caught_up and self._target is None:
            self._target = self._start_target()
        step = self.step()
        self.heartbeat()
        if step.applied:
            return _Outcome.BUSY
        self._passed = step.horizon
        self.metrics.caught_up(step.horizon)
        if self._target is not None and step.horizon >= self._target:
            return _Outcome.DONE
        if not self._still_current():
            log.warning("generation %s is no longer served; reloading", self.head)
            self._forget()
            return _Outcome.BUSY
        return _Outcome.IDLE

    def _start_target(self) -> int:
        # Everything committed before now has an xid below the snapshot's xmax; once the
        # horizon has passed that, all of it has been read.
        with self.db.transaction() as conn:
            return horizon_and_xmax(conn)[1]


def _floors(views: dict[int, OwnerView]) -> Floors:
    return {uid: floor for uid, v in views.items() if (floor := floor_of(v.top)) is not None}


def _wrong_hints(hints: Floors, views: dict[int, OwnerView]) -> list[int]:
    """Owners whose hinted floor is above their stored top's: ranking by it may have dropped
    events that belong in their top. (A lower or missing hint only lets more through.)"""
    wrong = []
    for uid, hint in hints.items():
        view = views.get(uid)
        floor = None if view is None else floor_of(view.top)
        if floor is None or hint > floor:
            wrong.append(uid)
    return wrong


def _read_through(
    cache: dict[int, _V], ids: Collection[int], load: Callable[[list[int]], dict[int, _V]]
) -> dict[int, _V]:
    known = {i: cache[i] for i in ids if i in cache}
    fetched = load([i for i in ids if i not in known])
    cache.update(fetched)
    return known | fetched


class _Outcome(Enum):
    BUSY = "busy"  # more may be waiting: go again at once
    IDLE = "idle"  # caught up with the horizon: wait for a NOTIFY or the poll
    DONE = "done"  # --until-caught-up reached its target
