"""The soak (scripts/soak.py), short: a real run as the operator starts it, judged by its result.

The script starts its own Postgres and Redis, the projector and the API as real processes, and
injects every fault of its rotation; its JSON result is what is asserted here. The checks that
decide its verdict are shown to fail too: on a document corrupted behind the projector's back,
and (as pure functions) on 500s, misplaced 503s and growing memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from scripts.soakkit.faults import Fault
from scripts.soakkit.readers import TRANSPORT_ERROR
from scripts.soakkit.report import SoakResult, verdict
from scripts.soakkit.rss import Lifetime, Memory, across_lifetimes, trend

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"kill", "redis", "postgres", "rebuild"}


def run_soak(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [
            sys.executable,
            "scripts/soak.py",
            *args,
            "--json",
            str(out),
            "--log-dir",
            str(tmp_path / "logs"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    output = done.stdout + done.stderr
    print(output)  # shown by pytest when the test fails
    assert out.exists(), f"no result written (exit {done.returncode}):\n{output[-6000:]}"
    return done.returncode, json.loads(out.read_text()), output


def reads_by_status(result: dict[str, Any]) -> Counter[int]:
    total: Counter[int] = Counter()
    for by in result["reads"].values():
        total.update({int(s): n for s, n in by.items()})
    return total


@pytest.mark.timeout(420)
def test_short_soak_every_fault_recovered_and_every_dashboard_equals_the_sql(
    tmp_path: Path,
) -> None:
    code, result, output = run_soak(
        tmp_path, "--minutes", "0.6", "--fault-every", "4", "--seed", "7", "--load-seconds", "0"
    )
    assert code == 0, output[-6000:]
    assert result["failures"] == []
    kinds = Counter(f["kind"] for f in result["faults"])
    assert set(kinds) == KINDS, kinds
    assert all(f["ok"] for f in result["faults"]), result["faults"]
    assert result["unplanned_exits"] == []
    assert result["converged_s"] is not None
    assert result["drift"] == {} and result["stale"] == {}
    assert result["users_at_end"] >= 300 and result["events_written"] > 500
    assert result["writer_outcomes"]["committed"] > 100 and result["writer_errors"] == []
    statuses = reads_by_status(result)
    assert statuses[200] > 1000, statuses
    assert not [s for s in statuses if s >= 500 and s != 503], statuses
    assert TRANSPORT_ERROR not in statuses, statuses
    # The readers were there when Redis was gone, and 503 was their answer only then.
    assert int(result["reads"]["redis"].get("503", 0)) > 0, result["reads"]
    others = {w: by for w, by in result["reads"].items() if w != "redis"}
    assert all("503" not in by for by in others.values()), result["reads"]
    assert result["memory"]["longest"] is not None, "the projector's RSS was never measured"


@pytest.mark.timeout(300)
def test_soak_reports_a_corrupted_document_and_exits_1(tmp_path: Path) -> None:
    code, result, output = run_soak(
        tmp_path,
        "--minutes",
        "0",
        "--fault-every",
        "3",
        "--seed",
        "8",
        "--load-seconds",
        "0",
        "--corrupt-at-end",
    )
    assert code == 1, output[-6000:]
    corrupted = result["corrupted"]
    assert corrupted and list(result["drift"]) == [corrupted], result["drift"]
    assert "hash" in result["drift"][corrupted], result["drift"]
    assert result["converged_s"] is not None  # converged first; then the one document changed
    assert result["failures"] == [f"drift: {corrupted}: {result['drift'][corrupted]}"]
    assert f"drift: {corrupted}" in output


# -- the verdict's own checks, as pure functions ------------------------------------------------
def clean_result(**changes: Any) -> SoakResult:
    result = SoakResult(
        command="scripts/soak.py --minutes 1",
        seed=1,
        soak_s=60.0,
        seeded_events=100,
        events_written=100,
        users_at_end=10,
        writer_outcomes={"committed": 50},
        writer_errors=[],
        faults=[Fault(k, "", 1.0, recovery_s=0.5, ok=True) for k in sorted(KINDS)],
        unplanned_exits=[],
        reads={"none": {200: 100}, "redis": {503: 5, 200: 5}},
        read_problems=[],
        converged_s=1.0,
        drift={},
        stale={},
        corrupted=None,
        memory=Memory(5.0, 2, 30.0, None, None, [], None),
        load=None,
        log_dir="/tmp/x",
    )
    for name, value in changes.items():
        setattr(result, name, value)
    return result


def test_the_verdict_passes_a_clean_result_only() -> None:
    assert verdict(clean_result()) == []
    assert verdict(clean_result(reads={"none": {200: 10, 500: 1}})) == ["1 answers 500 during none"]
    assert verdict(clean_result(reads={"rebuild": {503: 2}})) == [
        "2 answers 503 while Redis was up (window: rebuild)"
    ]
    assert verdict(clean_result(reads={"kill": {TRANSPORT_ERROR: 3}})) == [
        "3 reads got no HTTP answer during kill"
    ]
    assert verdict(clean_result(converged_s=None))
    assert verdict(clean_result(faults=[Fault("kill", "", 1.0, note="stuck")]))
    assert verdict(clean_result(stale={"gone": "a handle no user holds answered 200"}))


def test_memory_growth_fails_the_verdict_and_flat_memory_passes() -> None:
    flat = [(t * 0.5, 80_000 + (t % 3) * 100) for t in range(200)]
    growing = [(t * 0.5, 80_000 + t * 400) for t in range(200)]  # +78 MiB over 100 s
    flat_trend, growing_trend = trend(flat, 5.0), trend(growing, 5.0)
    assert flat_trend is not None and growing_trend is not None
    assert abs(flat_trend.growth_mib) < 1 and growing_trend.growth_mib > 50
    memory = Memory(5.0, 1, 100.0, flat_trend, None, [], None)
    assert verdict(clean_result(memory=memory)) == []
    memory = Memory(5.0, 1, 100.0, growing_trend, None, [], None)
    assert verdict(clean_result(memory=memory))[0].startswith("longest-lived projector: RSS grew")
    # Lifetimes that each start higher than the last: growth across restarts is caught too.
    lives = [
        Lifetime("projector", k, k * 30.0, [(t, 80_000 + k * 20_000) for t in range(6, 30)])
        for k in range(10)
    ]
    across = across_lifetimes(lives, 5.0)
    assert across is not None and across.growth_mib > 100
    assert verdict(clean_result(memory=Memory(5.0, 10, 24.0, None, across, [], None)))
