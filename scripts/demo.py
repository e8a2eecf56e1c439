"""The platform's story, end to end, on throwaway Postgres and Redis: one viewport, one truth.

A noisy tenant, ainfera-ai, floods the audit chain with E2E test events while hizrianraz has a
handful of his own. The projector (``python -m projector``) and the API (``uvicorn
api.main:app``) run as real processes, the writers use plain SQL the way the platform does, and
hizrianraz's dashboard is fetched over HTTP.

Run it with ``scripts/run demo`` (which sets up the venv, Redis and PostgreSQL 15 first).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text

from models.settings import ProjectorSettings
from projector.schema import init_schema

# Run as a file, Python puts scripts/ itself on the path; the repo root makes the scripts package
# (the platform stand-in and the throwaway servers, shared with the tests) importable.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts import platform_sim as p  # noqa: E402
from scripts.throwaway import (  # noqa: E402
    PostgresServer,
    RedisServer,
    free_port,
    start_postgres,
    start_redis,
)

HERO = "hizrianraz"
NOISY = "ainfera-ai"
NOISE_TYPE = "e2e.test"
NOISE_SEEDED = 360  # before the projector starts
NOISE_LIVE = 150  # while the projector and the API run
WAIT_SECONDS = 30.0

RECENT_SQL = """
select e.id::text as id from audit_events e join agents a on a.id = e.agent_id
where a.owner_id = :user order by e.created_at desc, e.seq desc limit 12
"""
OWNER_HEIGHT_SQL = """
select coalesce(max(e.seq), 0) from audit_events e join agents a on a.id = e.agent_id
where a.owner_id = :user
"""
GLOBAL_HEIGHT_SQL = "select coalesce(max(seq), 0) from audit_events"
# What a naive shared feed shows: the 12 latest events of the whole chain, whoever owns them.
NAIVE_FEED_SQL = """
select u.handle, e.event_type, count(*) as n
from (select agent_id, event_type from audit_events
      order by created_at desc, seq desc limit 12) e
join agents a on a.id = e.agent_id join users u on u.id = a.owner_id
group by u.handle, e.event_type order by n desc
"""


def step(title: str) -> None:
    print(f"\n== {title}")


def note(line: str) -> None:
    print(f"   {line}")


# -- HTTP --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    status: int
    retry_after: str | None
    body: bytes

    def json(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


def http_get(url: str) -> Answer | None:
    """GET ``url``; None while nothing listens there yet."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return Answer(resp.status, resp.headers.get("Retry-After"), resp.read())
    except urllib.error.HTTPError as err:
        return Answer(err.code, err.headers.get("Retry-After"), err.read())
    except (urllib.error.URLError, ConnectionError):
        return None


def wait_for(what: str, check: Callable[[], bool], timeout: float = WAIT_SECONDS) -> float:
    """Poll ``check`` until it holds; return the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f}s")
        time.sleep(0.01)
    return time.monotonic() - started


# -- processes ---------------------------------------------------------------------------------
@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> int:
        """SIGTERM, as an operator or a supervisor would; SIGKILL only if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def spawn(name: str, args: list[str], env: dict[str, str], log_dir: Path) -> Service:
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Service(name, proc, log)


# -- the platform's writers (plain SQL, as the platform's own app) -------------------------------
@dataclass
class Cast:
    hero: int
    noisy_agents: list[int]
    hero_agents: dict[str, int]


def seed(engine: Engine) -> Cast:
    now = datetime.now(UTC)
    with engine.begin() as conn:
        noisy = p.create_user(conn, NOISY, "Ainfera AI")
        noisy_agents = [p.create_agent(conn, noisy, f"e2e-runner-{i}") for i in range(1, 5)]
        hero = p.create_user(conn, HERO, "Hizrian Raz")
        agents = {name: p.create_agent(conn, hero, name) for name in ("scout", "ledger")}
        history = [
            ("scout", "gpt-5", "openai", 55),
            ("ledger", "claude-opus-4", "anthropic", 41),
            ("scout", "gemini-3-pro", "google", 23),
            ("ledger", "gpt-5", "openai", 9),
        ]
        for agent, model, provider, minutes_ago in history:
            p.add_event(
                conn,
                agents[agent],
                "inference",
                model=model,
                provider=provider,
                created_at=now - timedelta(minutes=minutes_ago),
            )
        mira = p.create_user(conn, "mira.k", "Mira K.")
        helper = p.create_agent(conn, mira, "helper")
        for _ in range(3):
            p.add_event(conn, helper, "inference", model="claude-opus-4", provider="anthropic")
        ops = p.create_user(conn, "dev_ops-7", None)
        p.add_event(
            conn, p.create_agent(conn, ops, "pager"), "alert.ack", model=None, provider=None
        )
        p.create_user(conn, "newcomer", "New Comer")  # no agents yet: an empty dashboard
    write_noise(engine, noisy_agents, NOISE_SEEDED, per_tx=40)
    return Cast(hero, noisy_agents, agents)


def write_noise(
    engine: Engine,
    agents: list[int],
    count: int,
    *,
    per_tx: int,
    pause: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> None:
    written = 0
    while written < count:
        with engine.begin() as conn:
            for _ in range(min(per_tx, count - written)):
                p.add_event(
                    conn, agents[written % len(agents)], NOISE_TYPE, model=None, provider=None
                )
                written += 1
        if progress is not None:
            progress(written)
        time.sleep(pause)


def count_rows(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            table: int(conn.execute(text(f"select count(*) from {table}")).scalar_one())
            for table in ("users", "agents", "audit_events")
        }


# -- printing ----------------------------------------------------------------------------------
def table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        note("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def short_time(iso: str | None) -> str:
    if iso is None:
        return "-"
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def show_dashboard(body: dict[str, Any]) -> None:
    meta, proj = body["chain_meta"], body["projection"]
    note(
        f"{body['handle']} ({body['display_name']}), {body['agent_count']} agents, "
        f"{len(body['recent_events'])} recent events"
    )
    table(
        [
            [
                str(e["seq"]),
                short_time(e["created_at"]),
                e["agent_name"],
                e["event_type"],
                e["model"] or "-",
                e["provider"] or "-",
            ]
            for e in body["recent_events"]
        ],
        ["seq", "created_at (UTC)", "agent", "event_type", "model", "provider"],
    )
    note(
        f"chain heights: owner {meta['owner_chain_height']}, global {meta['global_chain_height']};"
        f" latest event at {short_time(meta['latest_event_at'])}"
    )
    note(
        f"projection: generation {proj['generation']}, position {proj['position']},"
        f" applied at {short_time(proj['applied_at'])}"
    )


def matches_seed_sql(engine: Engine, user_id: int, body: dict[str, Any]) -> bool:
    with engine.connect() as conn:
        ids = list(conn.execute(text(RECENT_SQL), {"user": user_id}).scalars())
        owner = conn.execute(text(OWNER_HEIGHT_SQL), {"user": user_id}).scalar_one()
        global_height = conn.execute(text(GLOBAL_HEIGHT_SQL)).scalar_one()
    meta = body["chain_meta"]
    same = (
        [e["id"] for e in body["recent_events"]] == ids
        and meta["owner_chain_height"] == owner
        and meta["global_chain_height"] == global_height
    )
    note(
        f"equals the seed SQL on the same database (top-12 ids, owner height {owner},"
        f" global height {global_height}): {'yes' if same else 'NO'}"
    )
    return same


def contrast_with_naive_feed(engine: Engine, body: dict[str, Any]) -> None:
    with engine.connect() as conn:
        feed = conn.execute(text(NAIVE_FEED_SQL)).all()
    parts = ", ".join(f"{r.n} x {r.handle} ({r.event_type})" for r in feed)
    hero_in_feed = sum(r.n for r in feed if r.handle == HERO)
    note(f'a naive "global latest 12" feed shows: {parts}; {HERO}: {hero_in_feed}')
    note(
        f"{HERO}'s own dashboard shows his {len(body['recent_events'])} events, "
        "none of the noise: one viewport = one truth"
    )


def show_log(service: Service, batch_lines: int = 3) -> None:
    """The log, with its one-line-per-batch INFO lines cut to the last few."""
    lines = []
    for line in service.log.read_text(errors="replace").splitlines():
        # "2026-01-01 12:00:00,123 INFO projector message" -> "INFO projector message"
        parts = line.split(" ", 2)
        lines.append(parts[2] if len(parts) == 3 and parts[0][:2].isdigit() else line)
    batches = [i for i, line in enumerate(lines) if line.startswith("INFO projector batch:")]
    hidden = set(batches[:-batch_lines])
    for i, line in enumerate(lines):
        if i in hidden:
            if i == batches[0]:
                note(f"... ({len(hidden)} earlier batch lines) ...")
            continue
        note(line)


# -- the story ---------------------------------------------------------------------------------
@dataclass
class Stage:
    pg: PostgresServer
    redis: RedisServer
    engine: Engine
    log_dir: Path
    services: list[Service]

    @property
    def env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
        return {**base, "PYTHONUNBUFFERED": "1", "REDIS_URL": self.redis.url}


def start_api(stage: Stage) -> str:
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1"]
    args += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
    # The API gets REDIS_URL only: it never touches Postgres.
    stage.services.append(spawn("api", args, stage.env, stage.log_dir))
    return f"http://127.0.0.1:{port}"


def start_projector(stage: Stage) -> Service:
    env = {**stage.env, "DATABASE_URL": stage.pg.url()}
    service = spawn("projector", [sys.executable, "-m", "projector"], env, stage.log_dir)
    stage.services.append(service)
    return service


def dashboard_of(api: str, handle: str) -> Answer | None:
    return http_get(f"{api}/v1/users/{handle}/dashboard")


def first_answer(api: str) -> None:
    answers: list[Answer] = []

    def listening() -> bool:
        found = dashboard_of(api, HERO)
        if found is not None:
            answers.append(found)
        return found is not None

    wait_for("the API to listen", listening)
    first = answers[-1]
    note(
        f"GET /v1/users/{HERO}/dashboard -> {first.status}"
        f" (Retry-After: {first.retry_after}): no read model in Redis yet"
    )


def live_event(stage: Stage, api: str, cast: Cast) -> dict[str, Any]:
    """Commit one event for the hero in the middle of a noise burst; watch it appear."""
    noise_done = threading.Event()
    noise_written = [0]

    def noise() -> None:
        try:
            write_noise(
                stage.engine,
                cast.noisy_agents,
                NOISE_LIVE,
                per_tx=3,
                pause=0.005,
                progress=lambda n: noise_written.__setitem__(0, n),
            )
        finally:
            noise_done.set()

    burst = threading.Thread(target=noise, name="noise", daemon=True)
    burst.start()
    wait_for("the noise burst", lambda: noise_written[0] >= NOISE_LIVE // 4)
    with stage.engine.begin() as conn:
        event_id, seq = p.add_event(
            conn,
            cast.hero_agents["scout"],
            "inference",
            model="claude-opus-4",
            provider="anthropic",
        )
    committed = time.monotonic()
    note(f"committed event seq {seq} for {HERO} (agent scout) amid {NOISY}'s burst")

    def on_top() -> bool:
        found = dashboard_of(api, HERO)
        return (
            found is not None
            and found.status == 200
            and (found.json()["recent_events"][0]["id"] == event_id)
        )

    wait_for("the new event on the dashboard", on_top)
    note(f"on {HERO}'s dashboard {1000 * (time.monotonic() - committed):.0f} ms after the commit")
    noise_done.wait(WAIT_SECONDS)
    burst.join(WAIT_SECONDS)
    note(f"{NOISY} wrote {noise_written[0]} more {NOISE_TYPE} events meanwhile")
    with stage.engine.connect() as conn:
        height = int(conn.execute(text(GLOBAL_HEIGHT_SQL)).scalar_one())

    latest: list[dict[str, Any]] = []

    def caught_up() -> bool:
        found = dashboard_of(api, HERO)
        if found is None or found.status != 200:
            return False
        latest[:] = [found.json()]
        return int(latest[0]["chain_meta"]["global_chain_height"]) >= height

    wait_for("the projector to catch up", caught_up)
    note(f"projector caught up with the whole chain (global height {height})")
    return latest[0]


def contract_probes(api: str) -> None:
    for path, why in (
        (f"/v1/users/{HERO.upper()}/dashboard", "handles are case-insensitive"),
        ("/v1/users/nobody-here/dashboard", "no user has this handle"),
        ("/v1/users/-not.a.handle/dashboard", "malformed handle"),
    ):
        found = http_get(api + path)
        note(f"GET {path} -> {found.status if found else 'no answer'}  ({why})")


def serve_page(stage: Stage, api: str, cast: Cast, seconds: float) -> None:
    """Keep everything up so the page can be watched; a new event for the hero every 3 s."""
    step(f"serving for {seconds:.0f}s: open {api}/ui/{HERO} (Ctrl-C ends it sooner)")
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            time.sleep(min(3.0, max(0.0, deadline - time.monotonic())))
            with stage.engine.begin() as conn:
                _, seq = p.add_event(conn, cast.hero_agents["scout"], "inference")
            note(f"committed event seq {seq} for {HERO}: watch it arrive at the top of the page")
    except KeyboardInterrupt:
        note("interrupted: stopping")


def story(stage: Stage, serve_seconds: float = 0) -> bool:
    step("seeding the platform's tables with plain SQL (as the platform's own app does)")
    cast = seed(stage.engine)
    rows = count_rows(stage.engine)
    note(
        f"{rows['users']} users, {rows['agents']} agents, {rows['audit_events']} audit events:"
        f" {NOISY} wrote {NOISE_SEEDED} {NOISE_TYPE} events, {HERO} has 4 inference events"
    )

    step("starting the API (uvicorn api.main:app, REDIS_URL only)")
    api = start_api(stage)
    first_answer(api)

    step("starting the projector (python -m projector)")
    start_projector(stage)
    took = wait_for(
        f"{HERO}'s dashboard",
        lambda: (found := dashboard_of(api, HERO)) is not None and found.status == 200,
    )
    note(f"{HERO}'s dashboard served {took:.2f}s after the projector started")

    step("a new event while everything runs")
    body = live_event(stage, api, cast)

    step(f"GET /v1/users/{HERO}/dashboard (over HTTP, from the API)")
    show_dashboard(body)
    ok = matches_seed_sql(stage.engine, cast.hero, body)
    contrast_with_naive_feed(stage.engine, body)

    step("the rest of the contract")
    contract_probes(api)

    step("raw JSON, as served")
    print(json.dumps(body, indent=2))
    note(f"the live page: {api}/ui/{HERO} (run with --serve SECONDS to keep it up and watch it)")
    if serve_seconds > 0:
        serve_page(stage, api, cast, serve_seconds)
    return ok


def stop_services(stage: Stage) -> bool:
    clean = True
    for service in reversed(stage.services):
        code = service.stop()
        if service.name == "api" and code == -signal.SIGTERM:
            # uvicorn shuts down gracefully, then re-raises the signal it caught.
            note(f"api: SIGTERM -> graceful shutdown (uvicorn re-raises the signal: status {code})")
            continue
        clean = clean and code == 0
        note(f"{service.name}: SIGTERM -> exit code {code}")
    return clean


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/run demo", description=__doc__)
    parser.add_argument(
        "--serve",
        type=float,
        default=0,
        metavar="SECONDS",
        help="after the story, keep the API and the projector up this long, with the live page"
        " at /ui/hizrianraz and a new event every 3 s",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    print("Audit-chain dashboards: the platform's story on throwaway Postgres and Redis")
    step("starting throwaway PostgreSQL 15 and Redis on loopback")
    pg = start_postgres()
    redis_server: RedisServer | None = None
    engine: Engine | None = None
    try:
        redis_server = start_redis()
        settings = ProjectorSettings(database_url=pg.url(), redis_url=redis_server.url)
        engine = create_engine(settings.database_url, pool_size=4)
        init_schema(engine)
        note(f"postgres {pg.url()} (schema, triggers and change log ready)")
        note(f"redis    {redis_server.url}")
        with tempfile.TemporaryDirectory(prefix="demo-logs-") as logs:
            stage = Stage(pg, redis_server, engine, Path(logs), [])
            try:
                ok = story(stage, args.serve)
            finally:
                step("stopping the API and the projector")
                ok = stop_services(stage) and ok
                projector = [s for s in stage.services if s.name == "projector"]
                if projector:
                    step("the projector's log")
                    show_log(projector[0])
    finally:
        if engine is not None:
            engine.dispose()
        if redis_server is not None:
            redis_server.destroy()
        pg.destroy()
    print(f"\ndone in {time.monotonic() - started:.1f}s: {'all as expected' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
