"""The backlog: the projector catching up on events committed while it was stopped."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from scripts.benchkit.world import PYTHON, World, load_events, say, scalar, wait_for_quiet


# -- backlog -----------------------------------------------------------------------------------
@dataclass
class BacklogRound:
    round: int
    events: int
    copy_rows: int
    copy_seconds: float
    projector_seconds: float
    peak_rss_kib: int
    batch_seconds: float | None
    log: list[str]

    @property
    def copy_rate(self) -> float:
        return self.copy_rows / self.copy_seconds

    @property
    def projector_rate(self) -> float:
        return self.events / self.projector_seconds


def time_copy(db_url: str, after_seq: int) -> tuple[int, float]:
    """Rows and seconds to read every event past ``after_seq`` out of Postgres (text COPY)."""
    query = sql.SQL("copy (select * from audit_events where seq > {}) to stdout").format(
        sql.Literal(after_seq)
    )
    with psycopg.connect(db_url) as conn, conn.cursor() as cur:
        started = time.perf_counter()
        with cur.copy(query) as copy:
            for _chunk in copy:
                pass
        elapsed = time.perf_counter() - started
        return cur.rowcount, elapsed


def _vmrss_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(found.group(1)) if found else 0


def wait_sampling_rss(proc: subprocess.Popen[bytes], every: float = 0.05) -> int:
    """Wait for ``proc`` to exit, sampling its RSS every ``every`` s; the peak in KiB.

    The sampling runs on a thread and the wait blocks in waitpid, so the exit is seen at once:
    ``Popen.wait`` with a timeout polls with sleeps of up to 50 ms, which the projector's
    timing would otherwise include.
    """
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _vmrss_kib(proc.pid))
            done.wait(every)

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    sampler.start()
    proc.wait()
    done.set()
    sampler.join()
    return peak


_BATCH_TIMES = re.compile(r"read ([\d.]+)s .*fold ([\d.]+)s recompute ([\d.]+)s write ([\d.]+)s")


def batch_seconds(lines: list[str]) -> float | None:
    """Time inside batches, from the projector's own per-batch log lines (None if absent)."""
    times = [_BATCH_TIMES.search(line) for line in lines]
    found = [sum(float(g) for g in m.groups()) for m in times if m is not None]
    return sum(found) if found else None


def backlog_round(world: World, rnd: int) -> BacklogRound:
    count = world.plan.backlog_events
    before = scalar(world, "select coalesce(max(seq), 0) from audit_events")
    load_events(world, count, f"backlog {rnd}/{world.plan.rounds}")
    wait_for_quiet()
    rows, copy_seconds = time_copy(world.db_url, before)
    wait_for_quiet()
    name = f"projector-backlog-{rnd}"
    started = time.monotonic()
    proc = world.procs.start(name, [PYTHON, "-m", "projector", "--until-caught-up"])
    peak = wait_sampling_rss(proc)
    elapsed = time.monotonic() - started
    world.procs.check_exit(name, proc)
    log = [ln for ln in world.procs.log_path(name).read_text().splitlines() if " INFO " in ln]
    found = BacklogRound(rnd, count, rows, copy_seconds, elapsed, peak, batch_seconds(log), log)
    say(
        f"backlog round {rnd}: COPY {rows:,} rows in {copy_seconds:.2f}s"
        f" ({found.copy_rate:,.0f}/s); projector {elapsed:.2f}s ({found.projector_rate:,.0f}/s),"
        f" ratio {found.projector_rate / found.copy_rate:.2f}, peak RSS {peak / 1024:,.0f} MB"
    )
    return found


def measure_backlog(world: World) -> list[BacklogRound]:
    say(f"backlog: {world.plan.backlog_events:,} events per round, projector stopped")
    return [backlog_round(world, rnd) for rnd in range(1, world.plan.rounds + 1)]
