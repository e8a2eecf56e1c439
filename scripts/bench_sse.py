"""The SSE fan-out figure (issue 5): 1,000 concurrent streams on one API process.

Throwaway Postgres and Redis (scripts/throwaway.py), ``python -m projector`` and one
``uvicorn api.main:app`` as real processes; this script opens the streams itself (raw asyncio
sockets, HTTP/1.1 chunked, one socket per stream), commits events for the watched users from a
writer thread (plain SQL, as the platform does), and measures, per client and per commit, the
time from the commit returning to the client reading a dashboard whose owner_chain_height
covers that event. Two phases:

- steady: one event per transaction for a random watched user, at ``--rate`` commits a second;
  each commit is awaited by the clients watching that user;
- fan-out: one transaction with an event for every watched user, ``--bursts`` times: every
  client awaits it, so the spread is the cost of waking and writing to all streams at once.

Errors: streams that failed to open or ended early, and commits never delivered within
``--deadline`` seconds. The clients run in this process, so a receipt time includes its own
queueing behind the other clients (on a 2-core machine shared with the servers).

    python scripts/bench_sse.py [--clients 1000] [--users 1000] [--out bench/SSE.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import redis
from sqlalchemy import Engine, create_engine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from projector.schema import init_schema  # noqa: E402
from scripts import platform_sim as p  # noqa: E402
from scripts.throwaway import free_port, start_postgres, start_redis  # noqa: E402

API_ARGS = ["--no-access-log", "--log-level", "warning", "--port"]
SUMMARY = "The SSE fan-out figure: 1,000 concurrent streams on one API process."


@dataclass
class Client:
    handle: str
    uid: int
    height: int = 0
    connected: bool = False
    ended: str | None = None
    received: int = 0
    seen: list[tuple[int, float]] = field(default_factory=list)  # (height, when) as it grew


@dataclass
class Commit:
    phase: str
    at: float
    waiting: dict[int, int]  # index of a client that must see it -> the seq it must see


@dataclass
class Results:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    missed: dict[str, int] = field(default_factory=dict)


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise SystemExit(f"ulimit -n is {soft} (hard {hard}); {need} needed")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def seed(engine: Engine, users: int) -> tuple[list[tuple[str, int]], dict[int, int]]:
    """``users`` users with one agent and one event each; their (handle, id) and agent ids."""
    out: list[tuple[str, int]] = []
    agents: dict[int, int] = {}
    with engine.begin() as conn:
        for i in range(users):
            handle = f"viewer{i:04d}"
            uid = p.create_user(conn, handle, f"Viewer {i}")
            agents[uid] = p.create_agent(conn, uid, f"agent-{i}")
            p.add_event(conn, agents[uid])
            out.append((handle, uid))
    return out, agents


class Bench:
    def __init__(self, port: int, clients: list[Client]) -> None:
        self.port = port
        self.clients = clients
        self.commits: list[Commit] = []
        self.by_user: dict[int, list[int]] = {}  # uid -> indexes of the clients watching
        for i, c in enumerate(clients):
            self.by_user.setdefault(c.uid, []).append(i)
        self.results = Results()
        self.lock = threading.Lock()
        self.all_done = asyncio.Event()

    def delivered(self, index: int, height: int, now: float) -> None:
        with self.lock:
            for commit in self.commits:
                seq = commit.waiting.get(index)
                if seq is not None and seq <= height:
                    del commit.waiting[index]
                    self.results.latencies.setdefault(commit.phase, []).append(now - commit.at)

    def record(self, commit: Commit) -> None:
        with self.lock:
            self.commits.append(commit)
            # A client may have read it before the writer's thread got back here.
            for index, seq in list(commit.waiting.items()):
                client = self.clients[index]
                if client.height >= seq:
                    when = next(t for h, t in client.seen if h >= seq)
                    del commit.waiting[index]
                    lat = self.results.latencies.setdefault(commit.phase, [])
                    lat.append(max(0.0, when - commit.at))

    async def stream(self, index: int) -> None:
        client = self.clients[index]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError as exc:
            client.ended = f"connect: {exc}"
            return
        try:
            writer.write(
                f"GET /v1/users/{client.handle}/dashboard/stream HTTP/1.1\r\n"
                "Host: bench\r\nAccept: text/event-stream\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                client.ended = head.split(b"\r\n", 1)[0].decode(errors="replace")
                return
            client.connected = True
            buffer = b""
            while True:
                size_line = await reader.readline()
                if not size_line:
                    client.ended = "closed by the server"
                    return
                size = int(size_line.strip() or b"0", 16)
                if size == 0:
                    client.ended = "stream ended"
                    return
                buffer += (await reader.readexactly(size + 2))[:-2]
                while b"\n\n" in buffer:
                    block, buffer = buffer.split(b"\n\n", 1)
                    self.on_block(index, block)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            client.ended = f"{type(exc).__name__}: {exc}"
        finally:
            writer.close()

    def on_block(self, index: int, block: bytes) -> None:
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                now = time.perf_counter()
                body = orjson.loads(line[6:])
                height = int(body["chain_meta"]["owner_chain_height"])
                client = self.clients[index]
                client.received += 1
                if height > client.height:
                    with self.lock:
                        client.height = height
                        client.seen.append((height, now))
                    self.delivered(index, height, now)


def commit_one(engine: Engine, agent: int) -> tuple[int, float]:
    with engine.begin() as conn:
        seq = p.add_event(conn, agent)[1]
    return seq, time.perf_counter()


def commit_all(engine: Engine, agents: dict[int, int]) -> tuple[dict[int, int], float]:
    """One transaction, one event for each user (uid -> agent); each user's new seq."""
    with engine.begin() as conn:
        seqs = {uid: p.add_event(conn, agent)[1] for uid, agent in agents.items()}
    return seqs, time.perf_counter()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def run(
    args: argparse.Namespace,
    engine: Engine,
    port: int,
    users: list[tuple[str, int]],
    agents: dict[int, int],
) -> tuple[Bench, dict[str, float]]:
    clients = [Client(*users[i % len(users)]) for i in range(args.clients)]
    bench = Bench(port, clients)
    started = time.perf_counter()
    tasks = [asyncio.create_task(bench.stream(i)) for i in range(len(clients))]
    # Connected: every client has its first dashboard (or has failed).
    deadline = time.perf_counter() + args.deadline
    while time.perf_counter() < deadline:
        if all(c.height > 0 or c.ended for c in clients):
            break
        await asyncio.sleep(0.05)
    timing = {"connect_all_s": time.perf_counter() - started}
    # The hub's promise: one Redis subscription for the process, however many streams.
    with redis.Redis.from_url(args.redis_url) as r:
        clients_info = await asyncio.to_thread(r.client_list)
    timing["subscribed"] = sum(1 for c in clients_info if int(c.get("sub", 0)) > 0)
    watched = sorted(bench.by_user)

    # steady: single commits for random watched users
    rng = random.Random(5)
    for _ in range(int(args.rate * args.seconds)):
        uid = rng.choice(watched)
        seq, at = await asyncio.to_thread(commit_one, engine, agents[uid])
        bench.record(Commit("steady", at, dict.fromkeys(bench.by_user[uid], seq)))
        await asyncio.sleep(1 / args.rate)
    # fan-out: one transaction touching every watched user
    for _ in range(args.bursts):
        await asyncio.sleep(args.burst_gap)
        seqs, at = await asyncio.to_thread(commit_all, engine, {u: agents[u] for u in watched})
        waiting = {i: seqs[u] for u in watched for i in bench.by_user[u]}
        bench.record(Commit("fan-out", at, waiting))

    deadline = time.perf_counter() + args.deadline
    while time.perf_counter() < deadline:
        with bench.lock:
            if not any(c.waiting for c in bench.commits):
                break
        await asyncio.sleep(0.05)
    with bench.lock:
        for commit in bench.commits:
            bench.results.missed[commit.phase] = bench.results.missed.get(commit.phase, 0) + len(
                commit.waiting
            )
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return bench, timing


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def report(args: argparse.Namespace, bench: Bench, timing: dict[str, float], rss: float) -> str:
    clients = bench.clients
    failed = [c for c in clients if not c.connected]
    ended = [c for c in clients if c.connected and c.ended]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    rows = []
    for phase, note in (
        ("steady", f"{args.rate:g} commits/s for {args.seconds:g} s, one event each"),
        ("fan-out", f"{args.bursts} commits of one event for each of {len(bench.by_user)} users"),
    ):
        lat = bench.results.latencies.get(phase, [])
        rows.append(
            f"| {phase} | {note} | {len(lat):,} | {pct(lat, 0.5) * 1000:.1f} |"
            f" {pct(lat, 0.99) * 1000:.1f} | {max(lat, default=float('nan')) * 1000:.1f} |"
            f" {bench.results.missed.get(phase, 0)} |"
        )
    table = "\n".join(
        [
            "| phase | commits | deliveries | p50 ms | p99 ms | max ms | missed |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    received = sum(c.received for c in clients)
    return f"""# SSE fan-out (issue 5)

`scripts/bench_sse.py`, {when}, commit {commit}, {os.cpu_count()} cores (shared with Postgres,
Redis, the projector and the clients). One API process (`uvicorn api.main:app`, one worker),
{len(clients):,} concurrent `GET /v1/users/{{handle}}/dashboard/stream` clients watching
{len(bench.by_user):,} users, opened at once from one asyncio process (raw sockets);
`python -m projector` live. Latency: from the writer's commit returning to a client reading a
dashboard that holds the event (its owner_chain_height covers the event's seq).

{table}

- streams opened: {len(clients) - len(failed):,} of {len(clients):,}; failed to open: {len(failed)};
  ended early: {len(ended)}
- all {len(clients):,} first dashboards received {timing["connect_all_s"]:.2f} s after the first
  connect
- dashboard events received in all: {received:,} (the commits' and the shared tail's refresh,
  at most once a second per stream)
- API RSS at the end: {rss:.0f} MB; Redis connections in subscribed mode while the
  {len(clients):,} streams were open: {timing["subscribed"]:.0f} (the API's one invalidation feed)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=SUMMARY)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20.0, help="steady commits a second")
    parser.add_argument("--seconds", type=float, default=15.0, help="steady phase length")
    parser.add_argument("--bursts", type=int, default=5, help="fan-out commits")
    parser.add_argument("--burst-gap", type=float, default=2.0)
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=None, help="write the report here (markdown)")
    args = parser.parse_args()

    raise_fd_limit(args.clients + 1024)  # inherited by the API process
    pg = start_postgres()
    rd = start_redis()
    logs = Path(tempfile.mkdtemp(prefix="bench-sse-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        engine = create_engine(pg.url().replace("postgresql://", "postgresql+psycopg://"))
        init_schema(engine)
        users, agents = seed(engine, args.users)
        args.redis_url = rd.url
        env = {
            **os.environ,
            "DATABASE_URL": pg.url(),
            "REDIS_URL": rd.url,
            "PYTHONPATH": str(ROOT),
            "LOG_LEVEL": "WARNING",
        }
        port = free_port()
        for name, cmd in (
            ("projector", [sys.executable, "-m", "projector"]),
            ("api", [sys.executable, "-m", "uvicorn", "api.main:app", *API_ARGS, str(port)]),
        ):
            with (logs / f"{name}.log").open("wb") as log:
                procs.append(
                    subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                )
        api = procs[1]
        ready = time.monotonic() + 60
        while True:
            try:
                if httpx.get(
                    f"http://127.0.0.1:{port}/v1/users/{users[-1][0]}/dashboard"
                ).is_success:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > ready or api.poll() is not None:
                raise SystemExit(f"the API or the read model is not ready; logs in {logs}")
            time.sleep(0.2)
        bench, timing = asyncio.run(run(args, engine, port, users, agents))
        text_out = report(args, bench, timing, rss_mb(api.pid))
        print(text_out)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text_out)
            print(f"written to {args.out}")
        engine.dispose()
        missed = sum(bench.results.missed.values())
        broken = any(not c.connected or c.ended for c in bench.clients)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        rd.destroy()
        pg.destroy()
    return 1 if missed or broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
