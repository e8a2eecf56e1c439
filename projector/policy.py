"""How the worker meets failure: which errors to wait out, how long, and how big a batch to try.

Nothing here decides correctness: every batch is applied whole or not at all (one fenced Lua
write), so any failure may simply be retried. These rules only decide how soon, and with how
many events, so that the worker neither hammers a store that is down nor retries for ever a
batch that can never fit in the time Postgres allows it.
"""

from __future__ import annotations

import psycopg
import redis

# What "the other side is unreachable or refusing for a while" looks like; anything else is a
# bug and ends the worker loudly rather than retrying for ever.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    # Connection lost or refused, server shutting down, statement cancelled, too many clients.
    psycopg.OperationalError,
    # An operator's idle_in_transaction_session_timeout ended the session mid-batch.
    psycopg.errors.IdleInTransactionSessionTimeout,
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    redis.OutOfMemoryError,
)


def is_statement_timeout(exc: BaseException) -> bool:
    """Postgres cancelled a statement (statement_timeout, or an operator's pg_cancel_backend)."""
    return isinstance(exc, psycopg.errors.QueryCanceled)


def brief(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


class Backoff:
    def __init__(self, ceiling: float) -> None:
        self.ceiling = ceiling
        self.reset()

    def reset(self) -> None:
        self.delay = self.ceiling / 64

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, self.ceiling)
        return delay


class BatchLimit:
    """At most how many events the next batch may take.

    A batch that Postgres cancels for taking too long would be cancelled again at the same
    size, so the limit halves; it doubles back towards the configured size only after a run of
    batches that went through, so a steady timeout settles just below what fits.
    """

    GROW_AFTER = 8

    def __init__(self, ceiling: int) -> None:
        self.ceiling = ceiling
        self.value = ceiling
        self._streak = 0

    def shrink(self) -> int:
        self.value = max(1, self.value // 2)
        self._streak = 0
        return self.value

    def succeeded(self) -> None:
        if self.value >= self.ceiling:
            return
        self._streak += 1
        if self._streak >= self.GROW_AFTER:
            self.value = min(self.ceiling, self.value * 2)
            self._streak = 0
