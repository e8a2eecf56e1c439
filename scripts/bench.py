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
import contextlib
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import redis
from psycopg import sql
from sqlalchemy import Engine, create_engine, text

from projector.schema import init_schema

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file, Python puts scripts/ on the path, not the repo
    sys.path.insert(0, str(ROOT))

from scripts.bench_const_app import BODY_ENV  # noqa: E402
from scripts.dataset import Shape, add_events, create_people  # noqa: E402
from scripts.throwaway import (  # noqa: E402
    PostgresServer,
    RedisServer,
    free_port,
    start_postgres,
    start_redis,
)

PYTHON = sys.executable
HEAVY = "ainfera-ai"
LIGHT = "hizrianraz"
HANDLES = (HEAVY, LIGHT)
APPS = {
    "api": "api.main:app",
    "seed": "scripts.bench_seed_app:app",
    "const": "scripts.bench_const_app:app",
}
# One round of reads: the two paths alternate, the constant body once.
READ_TARGETS = (("api", HEAVY), ("seed", HEAVY), ("api", LIGHT), ("seed", LIGHT), ("const", HEAVY))
TEN_MILLION = 10_000_000
STARTED = time.monotonic()


# -- the plan ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    events: int
    rounds: int
    quick: bool
    out: Path
    command: str

    @property
    def wrk_seconds(self) -> int:
        return 3 if self.quick else 5

    @property
    def max_wrk_seconds(self) -> int:
        """The cap on a slow target's longer run (see ``seconds_for``)."""
        return 20 if self.quick else 60

    @property
    def backlog_events(self) -> int:
        return 50_000 if self.quick else 500_000

    @property
    def lag_seconds(self) -> float:
        return 4.0 if self.quick else 10.0

    @property
    def sizes(self) -> tuple[int, int]:
        return (self.events, 2 * self.events)


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


# -- printing ----------------------------------------------------------------------------------
def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def say(line: str) -> None:
    print(f"[bench {_clock(time.monotonic() - STARTED)}] {line}", flush=True)


def loud(line: str) -> None:
    print(f"\n!!!! {line}\n", flush=True)


class ProgressBar:
    """A plain-text bar updated in place with \\r: done/total, rate and ETA."""

    width = 30

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = done / elapsed
        eta = (total - done) / rate if rate else 0.0
        filled = self.width * done // max(total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        print(
            f"\r  {self.label} [{bar}] {done:>11,}/{total:,} {100 * done / max(total, 1):5.1f}%"
            f"  {rate:>9,.0f} ev/s  ETA {_clock(eta)}",
            end="\n" if done >= total else "",
            flush=True,
        )


# -- figures -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spread:
    """Median over rounds, with min and max."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        ordered = sorted(values)
        if not ordered:
            return cls(math.nan, math.nan, math.nan)
        return cls(statistics.median(ordered), ordered[0], ordered[-1])

    def show(self, fmt: str = ",.1f", unit: str = "") -> str:
        return f"{self.median:{fmt}}{unit} ({self.low:{fmt}}-{self.high:{fmt}})"


def ratios(top: Sequence[float], bottom: Sequence[float]) -> list[float]:
    return [a / b if b else math.inf for a, b in zip(top, bottom, strict=True)]


# -- processes ---------------------------------------------------------------------------------
class Processes:
    """Every subprocess of the run, each logging to its own file; teardown stops them all."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self._procs: list[subprocess.Popen[bytes]] = []

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def start(
        self, name: str, args: list[str], extra_env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with self.log_path(name).open("ab") as log:
            proc = subprocess.Popen(
                args,
                cwd=ROOT,
                env={**self.env, **(extra_env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._procs.append(proc)
        return proc

    def check_exit(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        if proc.returncode != 0:
            tail = self.log_path(name).read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name} exited {proc.returncode}:\n{tail}")

    def run_timed(self, name: str, args: list[str]) -> float:
        """Run to completion; the wall-clock seconds it took."""
        started = time.monotonic()
        proc = self.start(name, args)
        proc.wait()
        elapsed = time.monotonic() - started
        self.check_exit(name, proc)
        return elapsed

    @staticmethod
    def stop(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def stop_all(self) -> None:
        for proc in self._procs:
            self.stop(proc)


@dataclass
class World:
    """One run's throwaway servers, its engine and its subprocesses."""

    plan: Plan
    pg: PostgresServer
    redis_server: RedisServer
    engine: Engine
    procs: Processes

    @property
    def db_url(self) -> str:
        return self.pg.url()

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_server.url)


@contextlib.contextmanager
def throwaway_world(plan: Plan, log_dir: Path) -> Iterator[World]:
    with contextlib.ExitStack() as stack:
        say("starting a throwaway Postgres and Redis")
        pg = start_postgres()
        stack.callback(pg.destroy)
        redis_server = start_redis()
        stack.callback(redis_server.destroy)
        engine = create_engine(pg.url().replace("postgresql://", "postgresql+psycopg://", 1))
        stack.callback(engine.dispose)
        env = {
            **os.environ,
            "DATABASE_URL": pg.url(),
            "REDIS_URL": redis_server.url,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
            "LOG_LEVEL": "INFO",
        }
        procs = Processes(env, log_dir)
        stack.callback(procs.stop_all)
        yield World(plan, pg, redis_server, engine, procs)


# -- machine -----------------------------------------------------------------------------------
def _cpu_times() -> tuple[int, int]:
    """(total, idle) jiffies of all CPUs from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(values), values[3] + values[4]


def wait_for_quiet(max_busy: float = 0.15, window: float = 0.3, timeout: float = 60.0) -> None:
    """Wait until the machine is idle (e.g. a server still finishing abandoned requests)."""
    started = time.monotonic()
    while time.monotonic() < started + timeout:
        total0, idle0 = _cpu_times()
        time.sleep(window)
        total1, idle1 = _cpu_times()
        if total1 > total0 and 1 - (idle1 - idle0) / (total1 - total0) <= max_busy:
            if time.monotonic() - started > 5:
                say(f"waited {time.monotonic() - started:.0f}s for the machine to go quiet")
            return
    say(f"the machine stayed busy for {timeout:.0f}s; measuring anyway")


def _command_version(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    return (done.stdout + done.stderr).strip().splitlines()[0] if done.stdout + done.stderr else "?"


def git_state() -> str:
    """The commit measured, and whether the product's code differed from it."""
    git = ["git", "-C", str(ROOT)]
    head = _command_version([*git, "rev-parse", "--short", "HEAD"])
    product = ["projector", "api", "models", "scripts/rebuild.py", "scripts/dataset.py"]
    status = subprocess.run(
        [*git, "status", "--porcelain", "--", *product], capture_output=True, text=True, check=False
    ).stdout.split("\n")
    changed = sorted({line[3:] for line in status if line.strip()})
    return head + (f" with local changes to {', '.join(changed)}" if changed else "")


def machine_info(world: World) -> dict[str, str]:
    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    with world.engine.connect() as conn:
        pg_version = str(conn.execute(text("show server_version")).scalar_one())
    client = world.redis()
    redis_version = str(client.info("server")["redis_version"])
    client.close()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu.group(1).strip() if cpu else "?",
        "python": platform.python_version(),
        "postgres": pg_version,
        "redis": redis_version,
        "wrk": _command_version(["wrk", "-v"]),
        "git": git_state(),
        "command": world.plan.command,
    }


# -- data --------------------------------------------------------------------------------------
def load_events(world: World, count: int, label: str) -> None:
    bar = ProgressBar(label)
    bar(0, count)
    chunk = min(100_000, max(10_000, count // 20))
    add_events(world.engine, count, chunk=chunk, progress=bar)


def vacuum_analyze(world: World) -> None:
    started = time.monotonic()
    with world.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("vacuum (analyze) audit_events, agents, users"))
    say(f"vacuum analyze: {time.monotonic() - started:.1f}s")


def generate(world: World) -> None:
    say("schema, 5,000 users and 20,000 agents")
    init_schema(world.engine)
    create_people(world.engine)
    load_events(world, world.plan.events, "generate")
    vacuum_analyze(world)


def scalar(world: World, query: str) -> int:
    with world.engine.connect() as conn:
        return int(conn.execute(text(query)).scalar_one())


# -- rebuild and memory ------------------------------------------------------------------------
@dataclass
class RebuildAt:
    events: int
    seconds: list[float]  # wall clock of the subprocess
    reported: list[float | None]  # the time rebuild.py reports itself (no interpreter start-up)
    users: int
    used_memory: int
    empty_used_memory: int

    @property
    def per_user(self) -> float:
        return self.used_memory / self.users

    @property
    def net_per_user(self) -> float:
        return (self.used_memory - self.empty_used_memory) / self.users


def used_memory(client: redis.Redis) -> int:
    """``used_memory`` once the lazy frees of UNLINK (old generations) have settled."""
    deadline = time.monotonic() + 30
    while True:
        info: dict[str, Any] = client.info("memory")
        pending = int(info.get("lazyfree_pending_objects", 0))
        if pending == 0 or time.monotonic() > deadline:
            return int(info["used_memory"])
        time.sleep(0.05)


def _reported_seconds(log: str) -> float | None:
    found = re.findall(r"; ([\d.]+)s$", log, re.M)
    return float(found[-1]) if found else None


def measure_rebuilds(world: World, events: int, empty_used_memory: int) -> RebuildAt:
    seconds, reported = [], []
    for rnd in range(1, world.plan.rounds + 1):
        wait_for_quiet()
        name = f"rebuild-{events}-{rnd}"
        took = world.procs.run_timed(name, [PYTHON, str(ROOT / "scripts" / "rebuild.py")])
        seconds.append(took)
        reported.append(_reported_seconds(world.procs.log_path(name).read_text()))
        say(
            f"rebuild at {events:,} events, round {rnd}/{world.plan.rounds}: {took:.2f}s"
            f" (it reports {reported[-1]}s)"
        )
    client = world.redis()
    memory = used_memory(client)
    client.close()
    users = scalar(world, "select count(*) from users")
    found = RebuildAt(events, seconds, reported, users, memory, empty_used_memory)
    say(
        f"Redis used_memory {memory / 2**20:,.1f} MiB: {found.per_user / 1024:.2f} KiB per user"
        f" ({found.net_per_user / 1024:.2f} KiB net of an empty Redis)"
    )
    return found


# -- HTTP servers and wrk ----------------------------------------------------------------------
@dataclass(frozen=True)
class Server:
    app: str
    proc: subprocess.Popen[bytes]
    port: int

    def url(self, handle: str) -> str:
        return f"http://127.0.0.1:{self.port}/v1/users/{handle}/dashboard"


def _wait_ready(server: Server, procs: Processes, name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=30) as http:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                procs.check_exit(name, server.proc)
                raise RuntimeError(f"{name} exited 0 before serving")
            try:
                if http.get(server.url(LIGHT)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not answer 200 within {timeout:.0f}s")


def start_server(
    world: World, app: str, name: str, extra_env: dict[str, str] | None = None
) -> Server:
    port = free_port()
    args = [PYTHON, "-m", "uvicorn", APPS[app], "--host", "127.0.0.1", "--port", str(port)]
    args += ["--log-level", "warning", "--no-access-log"]
    server = Server(app, world.procs.start(name, args, extra_env), port)
    _wait_ready(server, world.procs, name)
    return server


def fast_loop_in_use(pid: int) -> dict[str, bool]:
    """Whether uvicorn really runs on uvloop and httptools: their libraries are mapped in."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {"uvloop": "uvloop/loop" in maps, "httptools": "httptools/parser" in maps}


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int


_TO_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _ms(value: str) -> float:
    found = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", value)
    if found is None:
        raise ValueError(f"not a wrk duration: {value!r}")
    return float(found.group(1)) * _TO_MS[found.group(2)]


def _int_after(pattern: str, output: str) -> int:
    found = re.search(pattern, output, re.M)
    return int(found.group(1)) if found else 0


def parse_wrk(output: str) -> WrkResult:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if rps is None or p50 is None or p99 is None:
        raise ValueError(f"unexpected wrk output:\n{output}")
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    requests = _int_after(r"(\d+) requests in", output)
    no_answer = requests == 0  # wrk prints 0.00us: there is no latency to speak of
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=math.nan if no_answer else _ms(p50.group(1)),
        p99_ms=math.nan if no_answer else _ms(p99.group(1)),
        requests=requests,
        non_2xx=_int_after(r"Non-2xx or 3xx responses: (\d+)", output),
        socket_errors=sum(int(n) for n in sockets.groups()) if sockets else 0,
    )


def run_wrk(url: str, seconds: int) -> WrkResult:
    args = ["wrk", "-t2", "-c16", f"-d{seconds}s", "--latency", "--timeout", "10s", url]
    done = subprocess.run(args, capture_output=True, text=True, check=True, timeout=seconds + 60)
    return parse_wrk(done.stdout)


# -- reads -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReadRun:
    round: int
    app: str
    handle: str
    seconds: int
    wrk: WrkResult
    redis_per_request: float | None = None  # commands Redis processed per answer (API only)


@dataclass
class ReadsAt:
    events: int
    body_bytes: int
    fair: dict[str, str]
    fast_loop: dict[str, dict[str, bool]]
    seconds: dict[str, int]  # "app handle" -> wrk duration
    runs: list[ReadRun] = field(default_factory=list)

    def series(self, app: str, handle: str, attr: str) -> list[float]:
        runs = sorted(
            (r for r in self.runs if r.app == app and r.handle == handle), key=lambda r: r.round
        )
        return [float(getattr(r.wrk, attr)) for r in runs]


def _comparable(body: bytes) -> dict[str, Any]:
    """An answer without its freshness field, times parsed (``Z`` and ``+00:00`` agree)."""
    doc: dict[str, Any] = orjson.loads(body)
    doc.pop("projection", None)
    for event in doc["recent_events"]:
        event["created_at"] = datetime.fromisoformat(event["created_at"])
    latest = doc["chain_meta"]["latest_event_at"]
    doc["chain_meta"]["latest_event_at"] = latest and datetime.fromisoformat(latest)
    return doc


def compare_answers(api: Server, seed: Server, handle: str) -> str:
    with httpx.Client(timeout=120) as http:
        ours, theirs = http.get(api.url(handle)), http.get(seed.url(handle))
    if ours.status_code != 200 or theirs.status_code != 200:
        return f"status: API {ours.status_code}, seed {theirs.status_code}"
    left, right = _comparable(ours.content), _comparable(theirs.content)
    differing = sorted(k for k in left.keys() | right.keys() if left.get(k) != right.get(k))
    return "identical" if not differing else "differ in " + ", ".join(differing)


def single_latency(server: Server, handle: str, tries: int = 2) -> float:
    """Seconds one answer takes with nothing else running (the best of ``tries``)."""
    took = []
    with httpx.Client(timeout=120) as http:
        for _ in range(tries):
            started = time.perf_counter()
            http.get(server.url(handle)).raise_for_status()
            took.append(time.perf_counter() - started)
    return min(took)


def seconds_for(plan: Plan, latency: float) -> int:
    """wrk's duration for a target: wrk drops the answers still in flight when it stops, so a
    slow target runs long enough for each of the 16 connections to complete several answers
    (with 16 at once on 2 cores, one takes ~12 times as long as alone), up to a cap."""
    return min(max(plan.wrk_seconds, math.ceil(100 * latency)), plan.max_wrk_seconds)


def start_read_servers(world: World, events: int) -> dict[str, Server]:
    servers = {"api": start_server(world, "api", f"api-{events}")}
    body = httpx.get(servers["api"].url(HEAVY), timeout=30).content
    body_path = world.procs.log_dir / f"const-body-{events}.json"
    body_path.write_bytes(body)
    servers["seed"] = start_server(world, "seed", f"seed-{events}")
    servers["const"] = start_server(world, "const", f"const-{events}", {BODY_ENV: str(body_path)})
    return servers


def _show_run(prefix: str, run: ReadRun) -> None:
    w = run.wrk
    extra = f"  non-2xx {w.non_2xx}" if w.non_2xx else ""
    extra += f"  socket errors {w.socket_errors}" if w.socket_errors else ""
    if run.redis_per_request is not None:
        extra += f"  Redis commands/answer {run.redis_per_request:.2f}"
    say(
        f"{prefix} {run.app:5} {run.handle:10} {w.rps:>10,.1f} req/s  p50 {w.p50_ms:8.2f} ms"
        f"  p99 {w.p99_ms:8.2f} ms{extra}"
    )


def _commands_processed(client: redis.Redis) -> int:
    return int(client.info("stats")["total_commands_processed"])


def read_run(world: World, server: Server, rnd: int, handle: str, seconds: int) -> ReadRun:
    """One wrk run; for the API, also how many Redis commands each answer cost."""
    client = world.redis()
    try:
        before = _commands_processed(client)
        result = run_wrk(server.url(handle), seconds)
        spent = _commands_processed(client) - before - 1  # less the INFO itself
    finally:
        client.close()
    per_request = spent / result.requests if server.app == "api" and result.requests else None
    return ReadRun(rnd, server.app, handle, seconds, result, per_request)


def read_rounds(world: World, servers: dict[str, Server], found: ReadsAt) -> None:
    for app, handle in READ_TARGETS:  # warm-up: caches, pools, the planner, the page cache
        wait_for_quiet()
        run_wrk(servers[app].url(handle), 1)
    for rnd in range(1, world.plan.rounds + 1):
        for app, handle in READ_TARGETS:
            wait_for_quiet()
            run = read_run(world, servers[app], rnd, handle, found.seconds[f"{app} {handle}"])
            found.runs.append(run)
            _show_run(f"reads at {found.events:,}, round {rnd}/{world.plan.rounds}:", run)
            if app == "api" and (run.wrk.non_2xx or run.wrk.socket_errors):
                loud(f"the API answered {run.wrk.non_2xx} non-2xx, {run.wrk.socket_errors} errors")


def check_servers(world: World, servers: dict[str, Server], events: int) -> ReadsAt:
    """The checks before timing: same answers, uvloop and httptools, durations per target."""
    fair = {h: compare_answers(servers["api"], servers["seed"], h) for h in HANDLES}
    say(f"API and seed answers (without projection): {fair}")
    for handle, verdict in fair.items():
        if verdict != "identical":
            loud(f"the API and the seed path disagree for {handle}: {verdict}")
    fast = {app: fast_loop_in_use(s.proc.pid) for app, s in servers.items()}
    say(f"uvloop and httptools loaded: {fast}")
    seconds = {f"{app} {h}": world.plan.wrk_seconds for app, h in READ_TARGETS}
    for handle in HANDLES:
        latency = single_latency(servers["seed"], handle)
        seconds[f"seed {handle}"] = seconds_for(world.plan, latency)
        say(f"seed path, one {handle} answer alone: {latency * 1000:,.1f} ms")
    say(f"wrk durations (s): {seconds}")
    body_bytes = len(httpx.get(servers["const"].url(HEAVY), timeout=30).content)
    return ReadsAt(events, body_bytes, fair, fast, seconds)


def measure_reads(world: World, events: int) -> ReadsAt:
    say(f"reads at {events:,} events: starting the API, the seed path and the constant body")
    servers: dict[str, Server] = {}
    try:
        servers = start_read_servers(world, events)
        found = check_servers(world, servers, events)
        read_rounds(world, servers, found)
        return found
    finally:
        for server in servers.values():
            world.procs.stop(server.proc)


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
    """Wait for ``proc`` to exit, sampling its RSS every ``every`` s; the peak in KiB."""
    peak = 0
    while True:
        peak = max(peak, _vmrss_kib(proc.pid))
        try:
            proc.wait(every)
            return peak
        except subprocess.TimeoutExpired:
            continue


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


# -- the run -----------------------------------------------------------------------------------
@dataclass
class Results:
    machine: dict[str, str]
    plan: dict[str, Any]
    empty_used_memory: int
    rebuilds: list[RebuildAt] = field(default_factory=list)
    reads: list[ReadsAt] = field(default_factory=list)
    backlog: list[BacklogRound] = field(default_factory=list)
    lag: list[LagRound] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    tracebacks: dict[str, int] = field(default_factory=dict)  # log file -> tracebacks in it

    def failures(self) -> list[str]:
        """Correctness failures that make the comparison meaningless (targets are not here)."""
        found = [
            f"API and seed disagree at {r.events:,} events for {handle}: {verdict}"
            for r in self.reads
            for handle, verdict in r.fair.items()
            if verdict != "identical"
        ]
        found += [
            f"API errors at {r.events:,} events, {run.handle}, round {run.round}:"
            f" {run.wrk.non_2xx} non-2xx, {run.wrk.socket_errors} socket errors"
            for r in self.reads
            for run in r.runs
            if run.app == "api" and (run.wrk.non_2xx or run.wrk.socket_errors)
        ]
        return found


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


# -- the report --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    figure: str
    measured: str
    target: str
    met: bool | None  # None: no target, or not measured

    @property
    def cells(self) -> list[str]:
        met = "-" if self.met is None else ("yes" if self.met else "**no**")
        return [self.figure, self.measured, self.target, met]


def at_least(figure: str, spread: Spread, limit: float, fmt: str, unit: str = "") -> Row:
    return Row(figure, spread.show(fmt, unit), f">= {limit:,g}{unit}", spread.median >= limit)


def at_most(figure: str, spread: Spread, limit: float, fmt: str, unit: str = "") -> Row:
    return Row(figure, spread.show(fmt, unit), f"<= {limit:,g}{unit}", spread.median <= limit)


def read_rows(reads: ReadsAt) -> list[Row]:
    def vs(handle: str, other: str, other_handle: str) -> Spread:
        api = reads.series("api", handle, "rps")
        return Spread.of(ratios(api, reads.series(other, other_handle, "rps")))

    at = f"{reads.events:,} events"
    return [
        at_least(
            f"{HEAVY} reads, API / seed SQL req/s, {at}",
            vs(HEAVY, "seed", HEAVY),
            1000,
            ",.0f",
            "x",
        ),
        at_least(
            f"{LIGHT} reads, API / seed SQL req/s, {at}", vs(LIGHT, "seed", LIGHT), 10, ",.0f", "x"
        ),
        at_least(
            f"{HEAVY} reads, API / constant body req/s, {at}", vs(HEAVY, "const", HEAVY), 0.8, ".2f"
        ),
        at_least(
            f"{LIGHT} reads, API / constant body req/s, {at}", vs(LIGHT, "const", HEAVY), 0.8, ".2f"
        ),
        *(
            at_most(
                f"{h} reads, API p99 at 16 connections, {at}",
                Spread.of(reads.series("api", h, "p99_ms")),
                5,
                ".2f",
                " ms",
            )
            for h in HANDLES
        ),
    ]


def backlog_rows(backlog: list[BacklogRound]) -> list[Row]:
    rate = Spread.of(b.projector_rate for b in backlog)
    vs_copy = Spread.of(b.projector_rate / b.copy_rate for b in backlog)
    rss = Spread.of(b.peak_rss_kib / 1024 for b in backlog)
    count = f"{backlog[0].events:,}" if backlog else "?"
    return [
        at_least(
            f"backlog of {count} events: projector events/s (wall clock)", rate, 100_000, ",.0f"
        ),
        at_least("backlog: projector rate / COPY read rate", vs_copy, 0.5, ".2f"),
        Row("projector peak RSS during the backlog", rss.show(",.0f", " MB"), "-", None),
    ]


def lag_rows(lag: list[LagRound]) -> list[Row]:
    never = sum(x.never_seen for x in lag)
    return [
        at_most("commit-to-dashboard lag p99", Spread.of(x.p99_ms for x in lag), 50, ".1f", " ms"),
        Row(
            "commit-to-dashboard lag p50",
            Spread.of(x.p50_ms for x in lag).show(".1f", " ms"),
            "-",
            None,
        ),
        Row(
            "commit-to-dashboard lag max",
            Spread.of(x.max_ms for x in lag).show(".1f", " ms"),
            "-",
            None,
        ),
        Row("quiet events never seen in the answer (all rounds)", str(never), "0", never == 0),
    ]


def _rebuild_shown(r: RebuildAt) -> str:
    shown = Spread.of(r.seconds).show(".2f", " s")
    reported = [x for x in r.reported if x is not None]
    if reported:
        shown += f"; by its own account {Spread.of(reported).show('.2f', ' s')}"
    return shown


def rebuild_rows(rebuilds: list[RebuildAt]) -> list[Row]:
    rows = [
        Row(f"rebuild at {r.events:,} events (wall clock)", _rebuild_shown(r), "-", None)
        for r in rebuilds
    ]
    if len(rebuilds) == 2:
        growth = Spread.of(ratios(rebuilds[1].seconds, rebuilds[0].seconds))
        rows.append(at_most("rebuild time at 2N / at N events", growth, 1.2, ".2f"))
    ten = [r for r in rebuilds if r.events == TEN_MILLION]
    if ten:
        rows.append(
            at_most("rebuild at 10,000,000 events", Spread.of(ten[0].seconds), 30, ".2f", " s")
        )
    else:
        rows.append(
            Row("rebuild at 10,000,000 events", "not measured (--events 10000000)", "<= 30 s", None)
        )
    for r in rebuilds:
        shown = f"{r.per_user / 1024:.2f} KiB ({r.net_per_user / 1024:.2f} KiB over an empty Redis)"
        rows.append(
            Row(
                f"Redis used_memory per user, {r.events:,} events",
                shown,
                "<= 8 KiB",
                r.per_user <= 8192,
            )
        )
    return rows


def _table(header: str, rows: Iterable[Sequence[object]]) -> list[str]:
    """A markdown table; ``header`` names the columns separated by ``|``."""
    columns = header.split("|")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _reads_row(reads: ReadsAt, app: str, handle: str) -> list[object]:
    runs = [x for x in reads.runs if x.app == app and x.handle == handle]
    rps, p50, p99 = (
        Spread.of(getattr(x.wrk, attr) for x in runs) for attr in ("rps", "p50_ms", "p99_ms")
    )
    costs = [x.redis_per_request for x in runs if x.redis_per_request is not None]
    return [
        f"{reads.events:,}",
        app,
        "(any)" if app == "const" else handle,
        reads.seconds[f"{app} {handle}"],
        rps.show(),
        p50.show(",.2f"),
        p99.show(",.2f"),
        sum(x.wrk.non_2xx for x in runs),
        sum(x.wrk.socket_errors for x in runs),
        Spread.of(costs).show(".2f") if costs else "-",
    ]


def reads_table(reads: list[ReadsAt]) -> list[str]:
    rows = [_reads_row(r, app, handle) for r in reads for app, handle in READ_TARGETS]
    header = (
        "events|app|handle|wrk s|req/s|p50 ms|p99 ms|non-2xx|socket errors|Redis commands/answer"
    )
    return _table(header, rows)


def backlog_table(backlog: list[BacklogRound]) -> list[str]:
    rows = [
        [b.round, f"{b.events:,}", f"{b.copy_seconds:.2f}", f"{b.copy_rate:,.0f}",
         f"{b.projector_seconds:.2f}",
         "-" if b.batch_seconds is None else f"{b.batch_seconds:.2f}",
         f"{b.projector_rate:,.0f}", f"{b.projector_rate / b.copy_rate:.2f}",
         f"{b.peak_rss_kib / 1024:,.0f}"]
        for b in backlog
    ]  # fmt: skip
    header = "round|events|COPY s|COPY rows/s|projector s (wall clock)|in its batches s (its log)"
    return _table(header + "|projector events/s|projector / COPY|peak RSS MB", rows)


def lag_table(lag: list[LagRound]) -> list[str]:
    rows = [
        [x.round, f"{x.committed:,}", f"{x.heavy_events:,}", f"{x.p50_ms:.1f}", f"{x.p99_ms:.1f}",
         f"{x.max_ms:.1f}", x.never_seen, f"{x.reader_requests:,}", x.reader_errors]
        for x in lag
    ]  # fmt: skip
    header = (
        "round|quiet events|background events|p50 ms|p99 ms|max ms|never seen|reads|read errors"
    )
    return _table(header, rows)


def checks_lines(results: Results) -> list[str]:
    lines = []
    for r in results.reads:
        at = f"{r.events:,} events"
        lines.append(f"- {at}: API vs seed answers, projection aside: {r.fair}")
        lines.append(f"- {at}: constant body {r.body_bytes:,} bytes (the API's {HEAVY} answer)")
        lines.append(f"- {at}: uvloop / httptools mapped into each server: {r.fast_loop}")
    shown = results.tracebacks or "none"
    lines.append(f"- tracebacks in the logs of the servers, rebuilds and projectors: {shown}")
    return lines


def render_markdown(results: Results) -> str:
    plan, m = results.plan, results.machine
    sizes = " then ".join(f"{r.events:,}" for r in results.rebuilds)
    targets = [row for reads in results.reads for row in read_rows(reads)]
    targets += backlog_rows(results.backlog) + lag_rows(results.lag)
    targets += rebuild_rows(results.rebuilds)
    failures = results.failures()
    durations = ", ".join(f"{k} {v:,.0f}s" for k, v in results.phase_seconds.items())
    lines = [
        "# Benchmark results (issue 3)",
        "",
        f"`{m['command']}`, {m['date']}, commit {m['git']}. Data: 5,000 users, 20,000 agents,"
        f" {sizes} events. {plan['rounds']} alternating rounds; every figure is the median"
        f" (min-max) over them. Reads: `wrk -t2 -c16 -d{plan['wrk_seconds']}s --latency"
        " --timeout 10s` on loopback; the seed path runs longer when its answers are slow (wrk"
        " drops the answers in flight when it stops), so that each connection completes several.",
        "",
    ]
    if failures:
        lines += ["**CORRECTNESS FAILURES:**", "", *(f"- {f}" for f in failures), ""]
    lines += ["## Against the targets", ""]
    lines += _table("figure|measured: median (min-max)|target|met", (r.cells for r in targets))
    lines += ["", "## Reads", "", "![reads](reads.png)", "", *reads_table(results.reads), ""]
    lines.append(
        "Redis commands/answer: commands Redis processed per API answer during the run (the"
        " calls inside a Lua script included); near 0 when the in-process cache answers."
    )
    lines += ["", "## Backlog", "", *backlog_table(results.backlog)]
    lines += ["", "## Lag", "", *lag_table(results.lag)]
    lines += ["", "## Checks", "", *checks_lines(results)]
    lines += ["", "## Machine", "", *_table("|", ([k, v] for k, v in m.items()))]
    return "\n".join([*lines, "", f"Phase durations: {durations}.", ""])


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    raise TypeError


def render_json(results: Results) -> bytes:
    body = {
        "machine": results.machine,
        "plan": results.plan,
        "empty_used_memory": results.empty_used_memory,
        "rebuilds": [
            {**vars(r), "per_user": r.per_user, "net_per_user": r.net_per_user}
            for r in results.rebuilds
        ],
        "reads": results.reads,
        "backlog": [
            {**vars(b), "copy_rate": b.copy_rate, "projector_rate": b.projector_rate}
            for b in results.backlog
        ],
        "lag": [
            {**vars(x), "p50_ms": x.p50_ms, "p99_ms": x.p99_ms, "max_ms": x.max_ms}
            for x in results.lag
        ],
        "phase_seconds": results.phase_seconds,
        "tracebacks": results.tracebacks,
        "failures": results.failures(),
    }
    return orjson.dumps(body, default=_json_default, option=orjson.OPT_INDENT_2)


def plot_reads(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r.events for r in results.reads]
    fig, (top, bottom) = plt.subplots(1, 2, figsize=(12, 5))
    lines = [
        ("api", HEAVY, "-o"),
        ("api", LIGHT, "-s"),
        ("seed", HEAVY, "--o"),
        ("seed", LIGHT, "--s"),
        ("const", HEAVY, ":^"),
    ]
    for app, handle, style in lines:
        label = "constant body" if app == "const" else f"{app} {handle}"
        for axis, attr in ((top, "rps"), (bottom, "p99_ms")):
            spreads = [Spread.of(r.series(app, handle, attr)) for r in results.reads]
            medians = [s.median for s in spreads]
            errors = [[s.median - s.low for s in spreads], [s.high - s.median for s in spreads]]
            axis.errorbar(sizes, medians, yerr=errors, fmt=style, capsize=4, label=label)
    for axis, title in ((top, "req/s (wrk -t2 -c16)"), (bottom, "p99 latency, ms")):
        axis.set_yscale("log")
        axis.set_xlabel("events in audit_events")
        axis.set_xticks(sizes, [f"{s / 1e6:g}M" for s in sizes])
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    top.legend(fontsize=8)
    fig.suptitle("Dashboard reads: projected API vs the seed's SQL path (median, min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(results: Results, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "RESULTS.md").write_text(render_markdown(results))
    (out / "results.json").write_bytes(render_json(results))
    plot_reads(results, out / "reads.png")
    say(f"wrote {out / 'RESULTS.md'}, {out / 'results.json'} and {out / 'reads.png'}")


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
