"""Figures over rounds (median, min, max) and the rows of the report's verdicts."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from scripts.benchkit.backlog import BacklogRound
from scripts.benchkit.lag import LagRound
from scripts.benchkit.reads import ReadsAt
from scripts.benchkit.rebuild import RebuildAt
from scripts.benchkit.world import HANDLES, HEAVY, LIGHT, TEN_MILLION


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


# -- the verdicts' rows ------------------------------------------------------------------------
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
