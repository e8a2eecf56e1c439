"""The results of a run, and RESULTS.md, results.json and reads.png written from them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from scripts.benchkit.backlog import BacklogRound
from scripts.benchkit.figures import Spread, backlog_rows, lag_rows, read_rows, rebuild_rows
from scripts.benchkit.lag import LagRound
from scripts.benchkit.reads import ReadsAt
from scripts.benchkit.rebuild import RebuildAt
from scripts.benchkit.world import HEAVY, LIGHT, READ_TARGETS, say


# -- the results -------------------------------------------------------------------------------
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


# -- the report --------------------------------------------------------------------------------
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
