"""The run's world: its plan, printing, subprocesses, throwaway servers, machine and data."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import redis
from sqlalchemy import Engine, create_engine, text

from projector.schema import init_schema
from scripts.dataset import add_events, create_people
from scripts.throwaway import PostgresServer, RedisServer, start_postgres, start_redis

ROOT = Path(__file__).resolve().parents[2]
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
