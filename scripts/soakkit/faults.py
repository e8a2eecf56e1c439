"""The faults, in rotation, and how the soak sees each one recovered.

Recovered means: the first event committed after the fault was over shows in the API's answer
for the observer (a user the writers never touch: its answer carries the global chain height),
so the whole path, writers to Postgres to projector to Redis to API, works again and nothing
before it was skipped (after a rebuild, from a new generation). The recovery time runs from the
fault being over (the process restarted, the server up again, the rebuild exited) to that
answer. The projector must survive every fault but its own SIGKILL.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from itertools import cycle

import httpx
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from scripts.soakkit.world import OBSERVER, World, say
from tests.procs import ApiProc, Proc

KINDS = ("kill", "redis", "postgres", "rebuild")
LABELS = {
    "kill": "SIGKILL the projector, start a new one",
    "redis": "Redis killed and restarted empty",
    "postgres": "Postgres stopped (fast/immediate) and started",
    "rebuild": "scripts/rebuild.py while everything runs",
}
NONE = "none"  # the read window between faults


@dataclass
class Fault:
    kind: str
    detail: str
    at_s: float  # seconds into the run
    recovery_s: float | None = None  # from the fault being over to the API caught up
    over_s: float | None = None  # seconds into the run when the fault was over
    ok: bool = False
    note: str = ""


class Injector:
    def __init__(
        self,
        world: World,
        api: ApiProc,
        projector_env: dict[str, str],
        *,
        rng: random.Random,
        recovery_timeout: float,
        started: float,
        kinds: tuple[str, ...] = KINDS,
    ) -> None:
        self.world = world
        self.kinds = kinds
        self.api = api
        self.env = projector_env
        self.rng = rng
        self.timeout = recovery_timeout
        self.started = started
        self.projector: Proc = world.procs.projector(**projector_env)
        self.faults: list[Fault] = []
        self.window = NONE
        self.unplanned_exits: list[str] = []
        self._http = httpx.Client(base_url=api.base_url, timeout=10)
        self._kinds = cycle(kinds)
        self._pg_modes = cycle(("fast", "immediate"))

    def close(self) -> None:
        self._http.close()

    def pids(self) -> dict[str, int]:
        return {"projector": self.projector.pid, "api": self.api.pid}

    def covered(self) -> bool:
        return {f.kind for f in self.faults} >= set(self.kinds)

    # -- what the API serves, what Postgres holds -----------------------------------------------
    def served(self) -> tuple[int, int, int]:
        """(status, global chain height, generation) of the observer's answer."""
        try:
            response = self._http.get(f"/v1/users/{OBSERVER}/dashboard")
        except httpx.HTTPError:
            return -1, -1, -1
        if response.status_code != 200:
            return response.status_code, -1, -1
        body = response.json()
        return 200, body["chain_meta"]["global_chain_height"], body["projection"]["generation"]

    def max_seq(self) -> int:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                with self.world.engine.connect() as conn:
                    query = text("select coalesce(max(seq), 0) from audit_events")
                    return int(conn.execute(query).scalar_one())
            except DBAPIError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def wait_served(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.served()[0] != 200:
            self.check_projector()
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def check_projector(self) -> str | None:
        """If the projector has exited by itself: note it, start a new one, say what happened."""
        if self.projector.alive():
            return None
        code, log = self.projector.popen.returncode, self.projector.log_path.name
        what = f"the projector exited by itself ({code}), log {log}"
        self.unplanned_exits.append(what)
        say(f"!! {what}; starting a new one")
        self.projector = self.world.procs.projector(**self.env)
        return what

    def _caught_up(self, fault: Fault, since: float, not_gen: int | None = None) -> None:
        fault.over_s = since - self.started
        deadline = time.monotonic() + self.timeout
        notes = []
        before = self.max_seq()
        while (target := self.max_seq()) <= before and time.monotonic() < deadline:
            time.sleep(0.01)  # the writers' next commit
        if target <= before:
            notes.append(f"no event committed in {self.timeout:.0f}s after the fault")
        while True:
            died = self.check_projector()
            if died:
                notes.append(died)
            status, height, gen = self.served()
            if status == 200 and height >= target and (not_gen is None or gen != not_gen):
                fault.recovery_s = time.monotonic() - since
                fault.ok = not notes and self.api.alive()
                break
            if time.monotonic() > deadline:
                notes.append(
                    f"not caught up after {self.timeout:.0f}s (answer {status},"
                    f" height {height} < {target})"
                )
                break
            time.sleep(0.05)
        if not self.api.alive():
            notes.append(f"the API exited ({self.api.popen.returncode})")
        fault.note = "; ".join(notes)

    # -- the faults -----------------------------------------------------------------------------
    def inject_next(self) -> Fault:
        kind = next(self._kinds)
        fault = Fault(kind, "", time.monotonic() - self.started)
        self.window = kind
        try:
            getattr(self, f"_{kind}")(fault)
        finally:
            self.window = NONE
        self.faults.append(fault)
        shown = f"{fault.recovery_s:.2f}s" if fault.recovery_s is not None else "-"
        say(
            f"fault {len(self.faults)}: {kind} {fault.detail}: "
            f"{'recovered' if fault.ok else 'FAILED'} in {shown} {fault.note}".rstrip()
        )
        return fault

    def _kill(self, fault: Fault) -> None:
        old = self.projector
        old.kill()
        fault.detail = f"pid {old.pid}"
        self.projector = self.world.procs.projector(**self.env)
        self._caught_up(fault, time.monotonic())

    def _redis(self, fault: Fault) -> None:
        down = self.rng.uniform(0.5, 2.0)
        fault.detail = f"down {down:.1f}s"
        self.world.redis_server.stop()
        time.sleep(down)
        self.world.redis_server.start()
        self._caught_up(fault, time.monotonic())

    def _postgres(self, fault: Fault) -> None:
        mode, down = next(self._pg_modes), self.rng.uniform(0.5, 2.0)
        fault.detail = f"{mode}, down {down:.1f}s"
        self.world.pg.stop(mode)
        time.sleep(down)
        self.world.pg.start()
        self._caught_up(fault, time.monotonic())

    def _rebuild(self, fault: Fault) -> None:
        before = self.served()[2]
        rebuild = self.world.procs.script("scripts/rebuild.py")
        code = rebuild.wait(self.timeout)
        if code is None:
            rebuild.kill()
        fault.detail = f"exit {code}, generation {before} -> ?"
        if code != 0:
            fault.note = f"rebuild exited {code}, log {rebuild.log_path.name}"
            return
        self._caught_up(fault, time.monotonic(), not_gen=before)
        fault.detail = f"generation {before} -> {self.served()[2]}"
