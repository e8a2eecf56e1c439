"""The benchmark of issue 3: the projected read path beside the SQL it replaces, in one run.

    scripts/run bench [--events N] [--quick] [--rounds R] [--out DIR]
    .venv/bin/python scripts/bench.py [same options]

One throwaway Postgres and Redis on loopback, a platform-shaped data set (scripts/dataset.py),
and every figure of issue 3 measured in the same run, each a median over alternating rounds with
min and max:

1. generate N events; ``scripts/rebuild.py`` timed R times; Redis memory per user;
2. reads at N: wrk against the API, the seed's SQL read path (scripts/bench_seed_app.py) and a
   constant body of the same size (scripts/bench_const_app.py), for ainfera-ai and hizrianraz;
3. N more events, then the rebuild and the reads again at 2N;
4. backlog: events committed with the projector stopped, then ``python -m projector
   --until-caught-up`` timed (and its RSS sampled) beside a plain COPY of the same rows;
5. lag: two quiet owners written to at 100 events/s each over a 1,000 events/s background
   writer, from commit to the event showing in the API's answer.

Writes ``bench/RESULTS.md``, ``bench/results.json`` and ``bench/reads.png`` (overwritten).
Exits 1 when a correctness check failed (API errors, API and seed answers differing).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file, Python puts scripts/ on the path, not the repo
    sys.path.insert(0, str(ROOT))


from scripts.benchkit.report import write_outputs  # noqa: E402
from scripts.benchkit.run import run_all  # noqa: E402
from scripts.benchkit.world import STARTED, Plan, _clock, loud, say, throwaway_world  # noqa: E402


def parse_plan(argv: Sequence[str] | None) -> Plan:
    parser = argparse.ArgumentParser(
        prog="scripts/bench.py", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--events", type=int, help="events generated (default 1,000,000)")
    parser.add_argument("--quick", action="store_true", help="100,000 events, shorter rounds")
    parser.add_argument("--rounds", type=int, help="rounds per figure (default 3; quick 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench", help="output directory")
    args = parser.parse_args(argv)
    events = args.events or (100_000 if args.quick else 1_000_000)
    rounds = args.rounds or (2 if args.quick else 3)
    if events < 1 or rounds < 1:
        parser.error("--events and --rounds must be positive")
    shown = ["scripts/bench.py", *(argv if argv is not None else sys.argv[1:])]
    return Plan(events, rounds, args.quick, args.out.resolve(), shlex.join(shown))


def main(argv: Sequence[str] | None = None) -> int:
    plan = parse_plan(argv)
    if shutil.which("wrk") is None:
        print(
            "wrk is missing: apt-get install -y wrk (scripts/run bench installs it)",
            file=sys.stderr,
        )
        return 2
    say(f"{plan.events:,} then {2 * plan.events:,} events, {plan.rounds} rounds -> {plan.out}")
    log_dir = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    try:
        with throwaway_world(plan, log_dir) as world:
            results = run_all(world)
    except BaseException:
        print(f"\nlogs of the run kept in {log_dir}", file=sys.stderr)
        raise
    shutil.rmtree(log_dir, ignore_errors=True)
    write_outputs(results, plan.out)
    for failure in results.failures():
        loud(failure)
    if results.tracebacks:
        loud(f"tracebacks in subprocess logs: {results.tracebacks}")
    say(f"done in {_clock(time.monotonic() - STARTED)}")
    return 1 if results.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
