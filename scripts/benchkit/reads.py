"""The read path: HTTP servers, wrk, and rounds of reads against API, seed and constant."""

from __future__ import annotations

import math
import re
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis

from scripts.bench_const_app import BODY_ENV
from scripts.benchkit.world import (
    APPS,
    HANDLES,
    HEAVY,
    LIGHT,
    PYTHON,
    READ_TARGETS,
    Plan,
    Processes,
    World,
    loud,
    say,
    wait_for_quiet,
)
from scripts.throwaway import free_port


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
