"""The rebuild timed over rounds, and Redis memory per user."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import redis

from scripts.benchkit.world import PYTHON, ROOT, World, say, scalar, wait_for_quiet


# -- rebuild and memory ------------------------------------------------------------------------
@dataclass
class RebuildAt:
    events: int
    seconds: list[float]  # wall clock of the subprocess
    reported: list[float | None]  # the time rebuild.py reports itself (no interpreter start-up)
    users: int
    used_memory: int
    empty_used_memory: int

    @property
    def per_user(self) -> float:
        return self.used_memory / self.users

    @property
    def net_per_user(self) -> float:
        return (self.used_memory - self.empty_used_memory) / self.users


def used_memory(client: redis.Redis) -> int:
    """``used_memory`` once the lazy frees of UNLINK (old generations) have settled."""
    deadline = time.monotonic() + 30
    while True:
        info: dict[str, Any] = client.info("memory")
        pending = int(info.get("lazyfree_pending_objects", 0))
        if pending == 0 or time.monotonic() > deadline:
            return int(info["used_memory"])
        time.sleep(0.05)


def _reported_seconds(log: str) -> float | None:
    found = re.findall(r"; ([\d.]+)s$", log, re.M)
    return float(found[-1]) if found else None


def measure_rebuilds(world: World, events: int, empty_used_memory: int) -> RebuildAt:
    seconds, reported = [], []
    for rnd in range(1, world.plan.rounds + 1):
        wait_for_quiet()
        name = f"rebuild-{events}-{rnd}"
        took = world.procs.run_timed(name, [PYTHON, str(ROOT / "scripts" / "rebuild.py")])
        seconds.append(took)
        reported.append(_reported_seconds(world.procs.log_path(name).read_text()))
        say(
            f"rebuild at {events:,} events, round {rnd}/{world.plan.rounds}: {took:.2f}s"
            f" (it reports {reported[-1]}s)"
        )
    client = world.redis()
    memory = used_memory(client)
    client.close()
    users = scalar(world, "select count(*) from users")
    found = RebuildAt(events, seconds, reported, users, memory, empty_used_memory)
    say(
        f"Redis used_memory {memory / 2**20:,.1f} MiB: {found.per_user / 1024:.2f} KiB per user"
        f" ({found.net_per_user / 1024:.2f} KiB net of an empty Redis)"
    )
    return found
