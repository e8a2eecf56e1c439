"""Resident memory of processes, sampled from /proc, one series per process lifetime.

A restarted process starts again from a small RSS, so a series never spans a restart; the soak
judges each lifetime on its own and compares lifetimes early and late in the run.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB, or None once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


@dataclass
class Lifetime:
    name: str
    pid: int
    started: float  # seconds into the run
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds alive, KiB)

    @property
    def span(self) -> float:
        return self.samples[-1][0] if self.samples else 0.0


@dataclass(frozen=True)
class Trend:
    """Median RSS of the first and the last fifth of a series, after its warm-up."""

    first_mib: float
    last_mib: float
    samples: int
    seconds: float

    @property
    def growth_mib(self) -> float:
        return self.last_mib - self.first_mib


def trend(samples: list[tuple[float, int]], warmup_s: float, min_samples: int = 10) -> Trend | None:
    kept = [(t, kib) for t, kib in samples if t >= warmup_s]
    if len(kept) < min_samples:
        return None
    fifth = max(1, len(kept) // 5)
    first = statistics.median(kib for _, kib in kept[:fifth]) / 1024
    last = statistics.median(kib for _, kib in kept[-fifth:]) / 1024
    return Trend(first, last, len(kept), kept[-1][0] - kept[0][0])


def steady_mib(life: Lifetime, warmup_s: float) -> float | None:
    kept = [kib for t, kib in life.samples if t >= warmup_s]
    return statistics.median(kept) / 1024 if kept else None


def across_lifetimes(lives: list[Lifetime], warmup_s: float) -> Trend | None:
    """Each lifetime's median after warm-up, in start order: first fifth vs last fifth."""
    series = [(life.started, m) for life in lives if (m := steady_mib(life, warmup_s)) is not None]
    if len(series) < 5:
        return None
    fifth = max(1, len(series) // 5)
    first = statistics.median(m for _, m in series[:fifth])
    last = statistics.median(m for _, m in series[-fifth:])
    return Trend(first, last, len(series), series[-1][0] - series[0][0])


@dataclass
class Memory:
    """What the soak concludes about memory (see ``measure``)."""

    warmup_s: float
    lifetimes: int
    longest_s: float
    longest: Trend | None  # the longest-lived projector, within its own life
    across: Trend | None  # each lifetime's steady median: first fifth vs last fifth of lifetimes
    growth_mib: list[float]  # every measurable projector lifetime's own growth
    api: Trend | None  # the API, never restarted, up to ``api_until``


def measure(sampler: Sampler, warmup_s: float, api_until: float) -> Memory:
    lives = sampler.of("projector")
    longest = max(lives, key=lambda life: life.span, default=None)
    trends = [t for life in lives if (t := trend(life.samples, warmup_s)) is not None]
    api = sampler.of("api")
    api_samples = (
        [] if not api else [s for s in api[0].samples if api[0].started + s[0] <= api_until]
    )
    return Memory(
        warmup_s=warmup_s,
        lifetimes=len(lives),
        longest_s=longest.span if longest else 0.0,
        longest=trend(longest.samples, warmup_s) if longest else None,
        across=across_lifetimes(lives, warmup_s),
        growth_mib=[t.growth_mib for t in trends],
        api=trend(api_samples, warmup_s),
    )


class Sampler:
    """A thread sampling the pids ``watched()`` names (name -> pid) every ``interval`` s."""

    def __init__(self, watched: Callable[[], dict[str, int]], interval: float = 0.5) -> None:
        self.watched = watched
        self.interval = interval
        self.lives: dict[int, Lifetime] = {}
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def of(self, name: str) -> list[Lifetime]:
        with self._lock:
            return [life for life in self.lives.values() if life.name == name]

    def latest_mib(self, name: str) -> float | None:
        lives = self.of(name)
        if not lives or not lives[-1].samples:
            return None
        return lives[-1].samples[-1][1] / 1024

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = time.monotonic() - self._t0
            for name, pid in self.watched().items():
                kib = rss_kib(pid)
                if kib is None:
                    continue
                with self._lock:
                    life = self.lives.setdefault(pid, Lifetime(name, pid, now))
                    life.samples.append((now - life.started, kib))
