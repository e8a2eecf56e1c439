"""Every measurement of the run, in order."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from scripts.benchkit.backlog import measure_backlog
from scripts.benchkit.lag import measure_lag
from scripts.benchkit.reads import measure_reads
from scripts.benchkit.rebuild import measure_rebuilds, used_memory
from scripts.benchkit.report import Results
from scripts.benchkit.world import (
    World,
    generate,
    git_state,
    load_events,
    loud,
    machine_info,
    vacuum_analyze,
)


@contextlib.contextmanager
def phase(results: Results, name: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    results.phase_seconds[name] = round(time.monotonic() - started, 1)


def run_all(world: World) -> Results:
    plan = world.plan
    client = world.redis()
    results = Results(
        machine_info(world),
        {
            "events": plan.events,
            "rounds": plan.rounds,
            "quick": plan.quick,
            "wrk_seconds": plan.wrk_seconds,
            "max_wrk_seconds": plan.max_wrk_seconds,
            "backlog_events": plan.backlog_events,
            "lag_seconds": plan.lag_seconds,
        },
        used_memory(client),
    )
    client.close()
    for size in plan.sizes:
        with phase(results, f"load to {size:,}"):
            if size == plan.events:
                generate(world)
            else:
                load_events(world, size - plan.events, "load   ")
                vacuum_analyze(world)
        with phase(results, f"rebuild at {size:,}"):
            results.rebuilds.append(measure_rebuilds(world, size, results.empty_used_memory))
        with phase(results, f"reads at {size:,}"):
            results.reads.append(measure_reads(world, size))
    with phase(results, "backlog"):
        results.backlog = measure_backlog(world)
    with phase(results, "lag"):
        results.lag = measure_lag(world)
    results.tracebacks = count_tracebacks(world.procs.log_dir)
    if git_state() != results.machine["git"]:
        results.machine["git at the end"] = git_state()
        loud(f"the code changed during the run: {results.machine['git']} -> {git_state()}")
    return results


def count_tracebacks(log_dir: Path) -> dict[str, int]:
    """Tracebacks the subprocesses logged (e.g. a server's background task dying)."""
    counts = {
        log.name: log.read_text(errors="replace").count("Traceback")
        for log in log_dir.glob("*.log")
    }
    return {name: n for name, n in sorted(counts.items()) if n}
