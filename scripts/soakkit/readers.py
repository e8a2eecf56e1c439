"""Read load on the API: a few threads, each at a steady rate, every answer counted by status.

Every answer is filed under the fault in progress when its request started ("none" between
faults; a request sent between faults whose answer came once a fault had begun is filed under
that fault), so a 503 can be told apart: expected while Redis restarts, a failure anywhere else.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable

import httpx

TRANSPORT_ERROR = -1  # no HTTP answer at all


class Readers:
    def __init__(
        self,
        base_url: str,
        handles: Callable[[], list[str]],
        window: Callable[[], str],
        *,
        threads: int,
        rate_per_thread: float,
        seed: int,
        started: float,
        expect_503: str = "redis",
        between: str = "none",
    ) -> None:
        self.base_url = base_url
        self.handles = handles
        self.window = window
        self.rate = rate_per_thread
        self.started = started
        self.expect_503 = expect_503
        self.between = between
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.problems: list[str] = []  # first few unexpected answers, for the report
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(seed * 10 + k,), daemon=True)
            for k in range(threads)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def by_status(self) -> Counter[int]:
        with self._lock:
            out: Counter[int] = Counter()
            for (_, status), n in self.statuses.items():
                out[status] += n
            return out

    def snapshot(self) -> Counter[tuple[str, int]]:
        with self._lock:
            return Counter(self.statuses)

    def _note(self, window: str, status: int, problem: str | None) -> None:
        with self._lock:
            self.statuses[(window, status)] += 1
            if problem is not None and len(self.problems) < 20:
                self.problems.append(problem)

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        period = 1.0 / self.rate
        next_at = time.monotonic()
        with httpx.Client(base_url=self.base_url, timeout=10) as http:
            while not self._stop.is_set():
                handles = self.handles()
                if handles:
                    self._one(http, rng.choice(handles))
                next_at = max(next_at + period, time.monotonic() - 1.0)
                self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _one(self, http: httpx.Client, handle: str) -> None:
        window = self.window()
        try:
            response = http.get(f"/v1/users/{handle}/dashboard")
        except httpx.HTTPError as exc:
            self._note(window, TRANSPORT_ERROR, f"{window}: {handle}: {exc!r}")
            return
        # A request sent just before a fault began may meet it: it counts as during the fault.
        window = window if window != self.between else self.window()
        status = response.status_code
        problem = None
        if status == 200:
            try:
                served = str(response.json()["handle"])
            except (ValueError, KeyError, TypeError) as exc:
                served = f"unparsable body ({exc!r})"
            if served.lower() != handle.lower():
                problem = f"{window}: asked for {handle}, served {served}"
        elif status == 503 and not response.headers.get("retry-after", "").isdigit():
            problem = f"{window}: 503 without Retry-After"
        elif status == 503 and window != self.expect_503:
            at = time.monotonic() - self.started
            problem = f"{window}: {handle}: 503 at {at:.2f}s: {response.text[:120]}"
        elif status not in (404, 503):
            problem = f"{window}: {handle}: {status} {response.text[:200]}"
        self._note(window, status, problem)
