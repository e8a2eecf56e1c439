"""What the soak found, the verdict on it, and its report (terminal text, markdown, JSON)."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scripts.soakkit.faults import KINDS, LABELS, NONE, Fault
from scripts.soakkit.load import LoadResult, summary
from scripts.soakkit.readers import TRANSPORT_ERROR
from scripts.soakkit.rss import Memory, Trend

# The projector's RSS may grow this much (MiB, or this share of where it started, whichever is
# more) from the first to the last fifth of a series: allocator noise and the caches filling,
# not a leak that scales with time.
RSS_SLACK_MIB = 16.0
RSS_SLACK_RATIO = 0.15


def rss_limit(first_mib: float) -> float:
    return first_mib + max(RSS_SLACK_MIB, RSS_SLACK_RATIO * first_mib)


@dataclass
class SoakResult:
    command: str
    seed: int
    soak_s: float  # writers and faults running
    seeded_events: int
    events_written: int
    users_at_end: int
    writer_outcomes: dict[str, int]
    writer_errors: list[str]
    faults: list[Fault]
    unplanned_exits: list[str]
    reads: dict[str, dict[int, int]]  # fault window -> status -> answers
    read_problems: list[str]
    converged_s: float | None
    drift: dict[str, str]
    stale: dict[str, str]
    corrupted: str | None
    memory: Memory
    load: LoadResult | None
    log_dir: str
    code: str = ""
    kinds: list[str] = field(default_factory=lambda: list(KINDS))  # the rotation (--faults)
    failures: list[str] = field(default_factory=list)


def _reads_failures(result: SoakResult) -> list[str]:
    out = []
    for window, statuses in result.reads.items():
        for status, n in statuses.items():
            if status == TRANSPORT_ERROR:
                out.append(f"{n} reads got no HTTP answer during {window}")
            elif status >= 500 and status != 503:
                out.append(f"{n} answers {status} during {window}")
            elif status == 503 and window != "redis":
                out.append(f"{n} answers 503 while Redis was up (window: {window})")
    return out + result.read_problems[:5]


def _memory_failures(memory: Memory) -> list[str]:
    out = []
    for name, found in (
        ("longest-lived projector", memory.longest),
        ("projector across lifetimes", memory.across),
    ):
        if found is not None and found.last_mib > rss_limit(found.first_mib):
            out.append(f"{name}: RSS grew {found.first_mib:.1f} -> {found.last_mib:.1f} MiB")
    return out


def verdict(result: SoakResult) -> list[str]:
    out = [
        f"fault {i + 1} ({f.kind} {f.detail}) did not recover: {f.note}"
        for i, f in enumerate(result.faults)
        if not f.ok
    ]
    missing = set(result.kinds) - {f.kind for f in result.faults}
    if missing:
        out.append(f"never injected: {sorted(missing)}")
    out += result.unplanned_exits + [f"writer failed: {e}" for e in result.writer_errors]
    out += _reads_failures(result)
    if result.converged_s is None:
        out.append("the answers never all equalled the SQL after the writers paused")
    out += [f"drift: {h}: {d}" for h, d in sorted(result.drift.items())]
    out += [f"stale handle: {h}: {d}" for h, d in sorted(result.stale.items())]
    out += _memory_failures(result.memory)
    if result.load is not None:
        out += [f"load: {f}" for f in result.load.failures()]
    return out


# -- rendering --------------------------------------------------------------------------------
def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _seconds(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} / {max(values):.2f}"


def fault_table(faults: list[Fault]) -> str:
    rows = []
    for kind in KINDS:
        mine = [f for f in faults if f.kind == kind]
        ok = [f for f in mine if f.ok]
        rows.append(
            [
                kind,
                LABELS[kind],
                str(len(mine)),
                f"{len(ok)}/{len(mine)}",
                _seconds([f.recovery_s for f in ok if f.recovery_s is not None]),
            ]
        )
    return table(["fault", "what", "injected", "recovered", "recovery s (median / max)"], rows)


def reads_table(reads: dict[str, dict[int, int]]) -> str:
    statuses = sorted({s for by in reads.values() for s in by})
    names = {TRANSPORT_ERROR: "no answer"}
    rows = []
    for window in [NONE, *KINDS, "load"]:
        if window in reads:
            by = reads[window]
            rows.append([window, *(f"{by.get(s, 0):,}" for s in statuses), f"{sum(by.values()):,}"])
    total: Counter[int] = Counter()
    for by in reads.values():
        total.update(by)
    rows.append(["all", *(f"{total.get(s, 0):,}" for s in statuses), f"{sum(total.values()):,}"])
    return table(["during", *(names.get(s, str(s)) for s in statuses), "total"], rows)


def _trend(found: Trend | None) -> str:
    if found is None:
        return "not measured (too few samples)"
    return (
        f"{found.first_mib:.1f} -> {found.last_mib:.1f} MiB ({found.growth_mib:+.1f};"
        f" limit {rss_limit(found.first_mib):.1f}), {found.samples} samples over"
        f" {found.seconds:.0f}s"
    )


def _growths(values: list[float]) -> str:
    if not values:
        return "not measured (too few samples)"
    return (
        f"median {statistics.median(values):+.1f} MiB, max {max(values):+.1f} MiB"
        f" (first fifth -> last fifth of each)"
    )


def memory_table(memory: Memory) -> str:
    rows = [
        ["projector, longest lifetime", f"{memory.longest_s:.0f}s alive", _trend(memory.longest)],
        ["projector, across lifetimes", f"{memory.lifetimes} lifetimes", _trend(memory.across)],
        [
            "projector, each lifetime",
            f"{len(memory.growth_mib)} measured",
            _growths(memory.growth_mib),
        ],
        ["API (never restarted)", "until the load", _trend(memory.api)],
    ]
    return table(["process", "span", "median RSS, first fifth -> last fifth"], rows)


def render(result: SoakResult, *, full: bool) -> str:
    verdict_line = "PASS" if not result.failures else f"FAIL ({len(result.failures)} problems)"
    run = table(
        ["figure", "value"],
        [
            ["verdict", verdict_line],
            ["command", f"`{result.command}`"],
            ["code", result.code],
            ["soak (writers and faults)", f"{result.soak_s:.0f}s, seed {result.seed}"],
            [
                "events seeded / written live",
                f"{result.seeded_events:,} / {result.events_written:,}",
            ],
            ["users at the end", f"{result.users_at_end:,}"],
            [
                "writer transactions",
                ", ".join(f"{k} {v:,}" for k, v in sorted(result.writer_outcomes.items())),
            ],
            ["faults injected", f"{len(result.faults)}"],
            [
                "convergence after the writers paused",
                "never" if result.converged_s is None else f"{result.converged_s:.2f}s",
            ],
            [
                "users whose answer differs from the SQL",
                f"{len(result.drift)}"
                + (f" (corrupted on purpose: {result.corrupted})" if result.corrupted else ""),
            ],
            ["stale handles not answering 404", f"{len(result.stale)}"],
            ["logs", result.log_dir],
        ],
    )
    parts = [
        run,
        "",
        "Faults:",
        "",
        fault_table(result.faults),
        "",
        "Reads by status, under the fault in progress when each request was sent (or, sent"
        " between faults, when its answer came):",
        "",
        reads_table(result.reads),
        "",
        "Memory (RSS sampled every 0.5 s, after a"
        f" {result.memory.warmup_s:.0f}s warm-up of each process):",
        "",
        memory_table(result.memory),
    ]
    if result.load is not None:
        parts += ["", f"API load: {summary(result.load)}"]
    if result.failures:
        parts += ["", "Problems:", *(f"- {f}" for f in result.failures[:40])]
    if full and result.faults:
        rows = [
            [
                str(i + 1),
                f"{f.at_s:.1f}",
                "-" if f.over_s is None else f"{f.over_s:.1f}",
                f.kind,
                f.detail,
                "-" if f.recovery_s is None else f"{f.recovery_s:.2f}",
                "ok" if f.ok else f"FAILED {f.note}",
            ]
            for i, f in enumerate(result.faults)
        ]
        parts += [
            "",
            "Every fault:",
            "",
            table(["#", "at s", "over at s", "fault", "detail", "recovered in s", "outcome"], rows),
        ]
    return "\n".join(parts)


METHOD = f"""How memory is judged: the RSS of the projector and of the API is read from
/proc/<pid>/status every 0.5 s. A SIGKILLed projector is replaced by a new process whose RSS
starts low again, so every process lifetime is its own series, and its first 5 s are left out
(start-up, and the state it loads). Three figures: (1) the longest-lived projector, the median
of the last fifth of its samples against the median of the first fifth; (2) across lifetimes,
each lifetime's median, the lifetimes started in the last fifth of the run against those of the
first fifth, which catches growth that survives restarts or follows the data; (3) the growth of
every lifetime on its own (reported, not judged). (1) and (2) fail the run when the later median
exceeds the earlier by more than max({RSS_SLACK_MIB:.0f} MiB, {RSS_SLACK_RATIO:.0%}). With a fault
every few seconds a projector lives about four fault intervals, so a leak that needs longer
than that within one process to show is caught only by (2), if at all. The API is never
restarted: its series runs from start-up to the connection load (reported, not judged; the
load judges its own RSS)."""


def write_markdown(result: SoakResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = render(result, full=True)
    path.write_text(f"# Soak: `{result.command}`\n\n{body}\n\n{METHOD}\n")


def write_json(result: SoakResult, path: Path) -> None:
    data: dict[str, Any] = asdict(result)
    data["reads"] = {w: {str(s): n for s, n in by.items()} for w, by in result.reads.items()}
    path.write_text(json.dumps(data, indent=2, default=str))
