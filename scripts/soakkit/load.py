"""The API under many concurrent keep-alive connections (issue 4: 500 for 30 s).

    python -m scripts.soakkit.load [--connections 500] [--seconds 30]

Raw asyncio streams, so the client is cheap and every connection is a real socket: all of them
connect first, then each sends GET after GET on its own connection (HTTP/1.1 keep-alive) until
the time is up. Every answer is counted by status; a connection refused, reset, closed by the
server or timed out is an error. The API's RSS is sampled throughout: the median of the first
fifth after warm-up against the median of the last fifth. Standalone, it runs on its own
throwaway Postgres and Redis (the soak's world); the soak also runs it at its end.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from scripts.soakkit.rss import rss_kib, trend

REQUEST_TIMEOUT_S = 30.0
# Growth of the API's RSS from warm-up to the end that still passes: a little for allocator
# noise, nothing that scales with the requests served.
RSS_SLACK_MIB = 8.0
RSS_SLACK_RATIO = 0.10


@dataclass
class LoadResult:
    connections: int
    seconds: float
    connected: int = 0  # connections open at once when the requests started
    open_at_end: int = 0  # of those, still open when the time was up
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    rss_warm_mib: float | None = None
    rss_end_mib: float | None = None
    rss_peak_mib: float | None = None
    status_after: int | None = None  # one more GET on a new connection once it is over
    ok_statuses: tuple[int, ...] = (200,)

    @property
    def rss_limit_mib(self) -> float | None:
        if self.rss_warm_mib is None:
            return None
        return self.rss_warm_mib + max(RSS_SLACK_MIB, RSS_SLACK_RATIO * self.rss_warm_mib)

    def failures(self) -> list[str]:
        out = []
        if self.connected != self.connections:
            out.append(f"only {self.connected} of {self.connections} connections opened")
        if self.open_at_end != self.connected:
            out.append(f"{self.connected - self.open_at_end} connections lost on the way")
        bad = {s: n for s, n in self.statuses.items() if s not in self.ok_statuses}
        if bad:
            shown = " or ".join(map(str, self.ok_statuses))
            out.append(f"answers other than {shown}: {bad}")
        if self.errors:
            out.append(f"errors: {self.errors}")
        if self.status_after not in self.ok_statuses:
            out.append(f"the API answered {self.status_after} after the load")
        limit = self.rss_limit_mib
        if limit is None or self.rss_end_mib is None:
            out.append("the API's RSS was not measured")
        elif self.rss_end_mib > limit:
            out.append(f"API RSS climbed: {self.rss_warm_mib:.1f} -> {self.rss_end_mib:.1f} MiB")
        return out


def ensure_fds(connections: int) -> None:
    """Raise this process's open-file limit (inherited by what it starts) if it is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = connections + 256
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise RuntimeError(f"ulimit -n is {soft} (hard {hard}); {need} needed")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


async def _answer(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            raise ConnectionResetError("the server closed the keep-alive connection")
    await reader.readexactly(length)
    return status


class _Run:
    def __init__(self, host: str, port: int, paths: list[str], connections: int) -> None:
        self.host, self.port, self.n = host, port, connections
        self.requests = [f"GET {p} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode() for p in paths]
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.tried = 0
        self.connected = 0
        self.open = 0
        self.go = asyncio.Event()
        self.stop = asyncio.Event()

    def _arrived(self) -> None:
        self.tried += 1
        if self.tried == self.n:
            self.go.set()

    async def connection(self, k: int) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), REQUEST_TIMEOUT_S
            )
        except (OSError, TimeoutError) as exc:
            self.errors[f"connect: {type(exc).__name__}"] += 1
            self._arrived()
            return
        self.connected += 1
        self.open += 1
        self._arrived()
        try:
            await self.go.wait()
            i = k
            while not self.stop.is_set():
                writer.write(self.requests[i % len(self.requests)])
                i += 1
                status = await asyncio.wait_for(_answer(reader), REQUEST_TIMEOUT_S)
                self.statuses[status] += 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            self.errors[type(exc).__name__] += 1
            self.open -= 1
        writer.close()


async def _rss_samples(pid: int, out: list[tuple[float, int]], stop: asyncio.Event) -> None:
    started = time.monotonic()
    while not stop.is_set():
        kib = rss_kib(pid)
        if kib is not None:
            out.append((time.monotonic() - started, kib))
        await asyncio.sleep(0.25)


async def _load(
    base_url: str, paths: list[str], connections: int, seconds: float, pid: int
) -> LoadResult:
    url = urlsplit(base_url)
    run = _Run(url.hostname or "127.0.0.1", url.port or 80, paths, connections)
    tasks = [asyncio.create_task(run.connection(k)) for k in range(connections)]
    await run.go.wait()
    samples: list[tuple[float, int]] = []
    sampler = asyncio.create_task(_rss_samples(pid, samples, run.stop))
    connected = run.connected
    await asyncio.sleep(seconds)
    open_at_end = run.open
    run.stop.set()
    await asyncio.gather(*tasks, sampler)
    result = LoadResult(connections, seconds, connected, open_at_end)
    result.requests = sum(run.statuses.values())
    result.statuses = dict(run.statuses)
    result.errors = dict(run.errors)
    found = trend(samples, warmup_s=max(2.0, seconds / 5))
    if found is not None:
        result.rss_warm_mib, result.rss_end_mib = found.first_mib, found.last_mib
    if samples:
        result.rss_peak_mib = max(kib for _, kib in samples) / 1024
    single = _Run(run.host, run.port, paths[:1], 1)
    after = asyncio.create_task(single.connection(0))
    await single.go.wait()
    while not single.statuses and not single.errors:
        await asyncio.sleep(0.01)
    single.stop.set()
    await after
    result.status_after = next(iter(single.statuses), None)
    return result


def hammer(
    base_url: str,
    paths: list[str],
    *,
    connections: int,
    seconds: float,
    pid: int,
    ok: tuple[int, ...] = (200,),
) -> LoadResult:
    """``connections`` keep-alive connections GETting ``paths`` in turn for ``seconds``; any
    answer not in ``ok`` is a failure."""
    ensure_fds(connections)
    result = asyncio.run(_load(base_url, paths, connections, seconds, pid))
    result.ok_statuses = ok
    return result


def summary(result: LoadResult) -> str:
    rate = result.requests / result.seconds if result.seconds else 0.0
    rss = "not measured"
    if result.rss_warm_mib is not None and result.rss_end_mib is not None:
        rss = (
            f"{result.rss_warm_mib:.1f} MiB after warm-up -> {result.rss_end_mib:.1f} MiB"
            f" at the end (peak {result.rss_peak_mib:.1f}, limit {result.rss_limit_mib:.1f})"
        )
    return (
        f"{result.connected}/{result.connections} connections for {result.seconds:.0f}s"
        f" ({result.open_at_end} still open at the end): {result.requests:,} requests"
        f" ({rate:,.0f}/s), statuses {result.statuses}, errors {result.errors or 'none'};"
        f" API RSS {rss}; after: {result.status_after}"
    )


def main(argv: list[str] | None = None) -> int:
    from scripts.soakkit.world import HERO, NOISY, OBSERVER, say, soak_world
    from scripts.soakkit.writers import Writers

    parser = argparse.ArgumentParser(prog="python -m scripts.soakkit.load", description=__doc__)
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    ensure_fds(args.connections)
    log_dir = Path(tempfile.mkdtemp(prefix="api-load-"))
    with soak_world(log_dir, users=300, events=20_000, seed_=1) as world:
        world.procs.catch_up()
        projector = world.procs.projector()  # live: its batches invalidate the API's cache
        api = world.procs.api()
        # One writer: events, transfers, renames go on under the load, as in production.
        writers = Writers(world.engine, count=1, seed=1, pace_s=0.1)
        writers.start()
        say(f"{args.connections} connections for {args.seconds:.0f}s on {api.base_url}")
        handles = [NOISY, HERO, OBSERVER, *(f"tenant-{k}" for k in range(1, 48))]
        paths = [f"/v1/users/{h}/dashboard" for h in handles]
        try:
            result = hammer(
                api.base_url,
                paths,
                connections=args.connections,
                seconds=args.seconds,
                pid=api.pid,
                ok=(200, 404),  # 404: a handle the writer renamed meanwhile
            )
        finally:
            writers.stop()
        failures = result.failures() + [
            f"the {proc.name} exited" for proc in (api, projector) if not proc.alive()
        ]
    say(f"{summary(result)}; {writers.events_committed} events committed meanwhile")
    for failure in failures:
        say(f"FAILED: {failure}")
    say(f"logs in {log_dir}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
