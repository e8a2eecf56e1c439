"""Soak: live writers, the projector, the API under read load, and a fault every few seconds.

    .venv/bin/python scripts/soak.py --minutes N [--seed S] [--fault-every SECONDS]
        [--faults kill,redis,postgres,rebuild] [--report PATH] [--json PATH] [--load-seconds 30]

On its own throwaway Postgres and Redis (scripts/throwaway.py): seeds a platform (a noisy tenant,
hundreds of users), then for N minutes runs writer threads (platform_sim's plain SQL: events,
bursts, transfers, renames, handle changes, deletions, rollbacks, held-open transactions), the
projector (``python -m projector``) and the API (``uvicorn api.main:app``) as real processes,
reader threads against the API, and every ``--fault-every`` seconds (jittered +-25%) the next
fault of the rotation: SIGKILL the projector and start a new one; kill Redis and restart it
empty (the projector must notice and rebuild by itself); stop Postgres (fast, then immediate,
alternately) and start it; run scripts/rebuild.py. Each fault must be recovered from: the API
catches up past everything committed when the fault was over. The run lasts at least one full
rotation.

Once the faults stop, the API takes ``--connections`` keep-alive connections for
``--load-seconds`` while the writers go on (scripts/soakkit/load.py): every answer must be a 200
(or a 404 for a handle renamed meanwhile) and the API's RSS must stay flat. Then the writers
pause; once every user's answer equals the SQL of tests/oracle.py (the convergence time is
reported), all of them are checked once more, and handles renamed away or deleted must answer
404. The projector's RSS is sampled every 0.5 s per process lifetime and must not grow (see
scripts/soakkit/rss.py and report.py for the method and the limits); reads must never get a 5xx
other than a 503, and a 503 only while Redis restarts.

``--corrupt-at-end`` changes one character of one served document after convergence, behind
the projector's back, to show the final check catches drift (the run must then exit 1).

Exits 0 only when everything held, 1 otherwise; prints the report, and writes it as markdown
with ``--report`` and as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import random
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file, Python puts scripts/ on the path, not the repo
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from scripts.soakkit import check  # noqa: E402
from scripts.soakkit.faults import KINDS, NONE, Injector  # noqa: E402
from scripts.soakkit.load import LoadResult, ensure_fds, hammer  # noqa: E402
from scripts.soakkit.progress import Handles, Ticker  # noqa: E402
from scripts.soakkit.readers import Readers  # noqa: E402
from scripts.soakkit.report import SoakResult, render, verdict, write_json, write_markdown  # noqa: E402
from scripts.soakkit.rss import Sampler, measure  # noqa: E402
from scripts.soakkit.world import (  # noqa: E402
    World,
    clock,
    code_state,
    events_in,
    say,
    soak_world,
)
from scripts.soakkit.writers import Writers  # noqa: E402

WARMUP_S = 5.0
PROJECTOR_ENV = {"IDLE_POLL_SECONDS": "0.2", "MAX_BACKOFF_SECONDS": "1.0"}
LOAD = "load"  # the read window of the connection load


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/soak.py",
        description=(__doc__ or "").split("\n\n")[0],
        epilog="See the module's docstring for what is checked.",
    )
    arg = parser.add_argument
    arg("--minutes", type=float, required=True, help="writers and faults run this long")
    arg("--seed", type=int, default=1, help="seeds the data, the writers and the faults")
    arg("--fault-every", type=float, default=8.0, help="seconds between faults (jittered)")
    arg(
        "--faults",
        default=",".join(KINDS),
        help=f"the rotation, in order (default {','.join(KINDS)}); without kill one projector"
        " lives through the whole soak, which makes its RSS series as long as the run",
    )
    arg("--users", type=int, default=300, help="users seeded (default 300)")
    arg("--events", type=int, default=20_000, help="events seeded (default 20,000)")
    arg("--writers", type=int, default=3)
    arg("--pace", type=float, default=0.05, help="mean pause between a writer's transactions")
    arg("--readers", type=int, default=4)
    arg("--read-rate", type=float, default=50.0, help="requests per second per reader")
    arg("--recovery-timeout", type=float, default=120.0)
    arg("--converge-timeout", type=float, default=120.0)
    arg("--load-seconds", type=float, default=30.0, help="0 skips the connection load")
    arg("--connections", type=int, default=500)
    arg("--report", type=Path, help="write the report as markdown here")
    arg("--json", type=Path, help="write the result as JSON here")
    arg("--log-dir", type=Path, help="process logs (default: a new /tmp/soak-* directory)")
    arg(
        "--corrupt-at-end",
        action="store_true",
        help="corrupt one served document after convergence: the run must find it and exit 1",
    )
    args = parser.parse_args(argv)
    if args.minutes < 0 or args.fault_every <= 0:
        parser.error("--minutes must be >= 0 and --fault-every > 0")
    args.faults = tuple(k.strip() for k in args.faults.split(",") if k.strip())
    if not args.faults or set(args.faults) - set(KINDS):
        parser.error(f"--faults takes a comma-separated list of {', '.join(KINDS)}")
    args.command = shlex.join(["scripts/soak.py", *(sys.argv[1:] if argv is None else argv)])
    return args


@dataclass
class Parts:
    """Everything that runs during the soak besides the processes the injector owns."""

    world: World
    args: argparse.Namespace
    injector: Injector
    handles: Handles
    writers: Writers
    readers: Readers
    sampler: Sampler
    started: float

    def line(self) -> str:
        faults = self.injector.faults
        kinds = " ".join(f"{k} {sum(f.kind == k for f in faults)}" for k in self.args.faults)
        failed = sum(not f.ok for f in faults)
        reads = " ".join(f"{s}:{n:,}" for s, n in sorted(self.readers.by_status().items()))
        rss = self.sampler.latest_mib("projector")
        return (
            f"[soak {clock(time.monotonic() - self.started)}/{clock(self.args.minutes * 60)}]"
            f" events +{self.writers.events_committed:,} | faults {kinds}"
            f"{f' FAILED {failed}' if failed else ''} | reads {reads or '-'}"
            f" | projector {f'{rss:.0f} MiB' if rss else '-'} | now: {self.injector.window}"
        )


def start(world: World, args: argparse.Namespace) -> Parts:
    rng = random.Random(args.seed)
    api = world.procs.api()
    started = time.monotonic()
    injector = Injector(
        world,
        api,
        PROJECTOR_ENV,
        rng=rng,
        recovery_timeout=args.recovery_timeout,
        started=started,
        kinds=args.faults,
    )
    say("the projector builds the first read model")
    if not injector.wait_served(args.recovery_timeout):
        raise RuntimeError("the first read model was never served")
    handles = Handles(world)
    readers = Readers(
        api.base_url,
        handles.get,
        lambda: injector.window,
        threads=args.readers,
        rate_per_thread=args.read_rate,
        seed=args.seed,
        started=started,
    )
    writers = Writers(world.engine, count=args.writers, seed=args.seed, pace_s=args.pace)
    parts = Parts(world, args, injector, handles, writers, readers, Sampler(injector.pids), started)
    for part in (writers, readers, parts.sampler):
        part.start()
    return parts


def faults(parts: Parts) -> float:
    """The fault rotation for ``--minutes`` (at least one of each kind); its length in s."""
    args = parts.args
    rng = random.Random(args.seed + 1)
    say(f"soaking for {args.minutes:g} min, a fault every ~{args.fault_every:g}s")
    began = time.monotonic()
    end = began + args.minutes * 60
    next_at = began + args.fault_every * rng.uniform(0.75, 1.25)
    while time.monotonic() < end or not parts.injector.covered():
        if time.monotonic() >= next_at:
            parts.injector.inject_next()
            next_at = time.monotonic() + args.fault_every * rng.uniform(0.75, 1.25)
        time.sleep(0.05)
    return time.monotonic() - began


def load(parts: Parts) -> tuple[LoadResult | None, float]:
    """The connection load, writers still on; and when it began (for the API's RSS series)."""
    began = parts.sampler.elapsed()
    args, api = parts.args, parts.injector.api
    if args.load_seconds <= 0:
        return None, began
    say(f"{args.connections} keep-alive connections for {args.load_seconds:g}s, writers on")
    paths = [f"/v1/users/{h}/dashboard" for h in parts.handles.get()[:50]]
    parts.injector.window = LOAD
    try:
        result = hammer(
            api.base_url,
            paths,
            connections=args.connections,
            seconds=args.load_seconds,
            pid=api.pid,
            ok=(200, 404),  # 404: a handle renamed away meanwhile
        )
    finally:
        parts.injector.window = NONE
    if not api.alive():
        parts.injector.unplanned_exits.append(f"the API exited ({api.popen.returncode})")
    return result, began


def finish(
    parts: Parts, soak_s: float, load_result: LoadResult | None, api_until: float
) -> SoakResult:
    """Writers pause; convergence; the final check of every user; the result."""
    args, world = parts.args, parts.world
    say("writers pause; waiting for every answer to equal the SQL")
    paused_at = time.monotonic()
    if not parts.writers.pause():
        parts.writers.errors.append("a writer did not pause within 60s")
    want = check.oracle(world.engine)
    with httpx.Client(base_url=parts.injector.api.base_url, timeout=10) as http:
        converged = check.converge(http, want, args.converge_timeout)
        converged_s = None if converged is None else time.monotonic() - paused_at
        corrupted = check.corrupt_one(world.redis(), want) if args.corrupt_at_end else None
        drift = check.drift(http, want)
        stale = check.stale_handles(http, parts.writers.gone_handles, want)
    say(f"converged in {converged_s:.2f}s" if converged_s is not None else "never converged")
    for part in (parts.readers, parts.sampler, parts.writers):
        part.stop()
    parts.injector.check_projector()
    parts.injector.close()
    reads: dict[str, dict[int, int]] = {}
    for (window, status), n in parts.readers.snapshot().items():
        reads.setdefault(window, {})[status] = n
    return SoakResult(
        command=args.command,
        seed=args.seed,
        soak_s=soak_s,
        seeded_events=world.seeded_events,
        events_written=events_in(world.engine) - world.seeded_events,
        users_at_end=len(want),
        writer_outcomes=dict(parts.writers.outcomes),
        writer_errors=parts.writers.errors,
        faults=parts.injector.faults,
        unplanned_exits=parts.injector.unplanned_exits,
        reads=reads,
        read_problems=parts.readers.problems,
        converged_s=converged_s,
        drift=drift,
        stale=stale,
        corrupted=corrupted,
        memory=measure(parts.sampler, WARMUP_S, api_until),
        load=load_result,
        log_dir=str(world.log_dir),
        code=code_state(),
        kinds=list(args.faults),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.load_seconds > 0:
        ensure_fds(args.connections)  # before the API starts: it inherits the limit
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    say(
        f"throwaway Postgres and Redis; {args.users} users, {args.events:,} events; logs in"
        f" {log_dir}"
    )
    with soak_world(log_dir, users=args.users, events=args.events, seed_=args.seed) as world:
        parts = start(world, args)
        ticker = Ticker(parts.line, parts.handles.refresh)
        ticker.start()
        try:
            soak_s = faults(parts)
            load_result, api_until = load(parts)
        finally:
            ticker.stop()
        result = finish(parts, soak_s, load_result, api_until)
    result.failures = verdict(result)
    print(render(result, full=len(result.faults) <= 24), flush=True)
    if args.report:
        write_markdown(result, args.report)
    if args.json:
        write_json(result, args.json)
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
