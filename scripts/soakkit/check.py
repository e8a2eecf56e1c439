"""The end of the soak: every user's dashboard, as the API serves it, against the seed SQL.

The truth is tests/oracle.py (the SQL of the README), never anything the code under test wrote.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import redis
from sqlalchemy import Engine, text

from models import keys
from tests.oracle import expected, normalise

Want = dict[str, dict[str, Any]]


def oracle(engine: Engine) -> Want:
    """Every user's expected dashboard, keyed by handle (writes must be paused)."""
    with engine.connect() as conn:
        users = conn.execute(text("select id, handle from users order by id")).all()
        return {u.handle: expected(conn, u.id) for u in users}


def difference(want: dict[str, Any], got: dict[str, Any]) -> str:
    """The fields that differ; events shown as their seqs when the lists differ."""
    parts = []
    for key in sorted(want.keys() | got.keys()):
        w, g = want.get(key), got.get(key)
        if w == g:
            continue
        if key == "recent_events" and isinstance(w, list) and isinstance(g, list):
            ws, gs = [e["seq"] for e in w], [e["seq"] for e in g]
            if ws != gs:
                parts.append(f"seqs want {ws} got {gs}")
                continue
            for a, b in zip(w, g, strict=True):
                fields = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
                for f in fields:
                    parts.append(f"event {a['seq']} {f}: want {a.get(f)!r} got {b.get(f)!r}")
            continue
        parts.append(f"{key}: want {w!r} got {g!r}")
    return "; ".join(parts)


def problem(http: httpx.Client, handle: str, want: dict[str, Any]) -> str | None:
    """None if the API answers 200 with exactly ``want``; otherwise what is wrong."""
    try:
        response = http.get(f"/v1/users/{handle}/dashboard")
    except httpx.HTTPError as exc:
        return repr(exc)
    if response.status_code != 200:
        return f"answered {response.status_code} {response.text[:120]}"
    got = normalise(response.json())
    return None if got == want else difference(want, got)


def drift(http: httpx.Client, want: Want) -> dict[str, str]:
    """Every user whose answer differs from the SQL now, with what differs."""
    return {h: found for h in want if (found := problem(http, h, want[h])) is not None}


def converge(http: httpx.Client, want: Want, timeout: float) -> float | None:
    """Seconds until every answer equals the SQL (polling the ones still wrong); None: never."""
    started = time.monotonic()
    pending = set(want)
    while pending:
        pending = {h for h in pending if problem(http, h, want[h]) is not None}
        if not pending:
            break
        if time.monotonic() - started > timeout:
            return None
        time.sleep(0.2)
    return time.monotonic() - started


def stale_handles(http: httpx.Client, gone: list[str], held: Want) -> dict[str, str]:
    """Handles renamed away or deleted, not held by anyone now: each must answer 404."""
    taken = {h.lower() for h in held}
    out = {}
    for handle in sorted({g for g in gone if g.lower() not in taken}):
        status = http.get(f"/v1/users/{handle}/dashboard").status_code
        if status != 404:
            out[handle] = f"a handle no user holds answered {status}, not 404"
    return out


def corrupt_one(client: redis.Redis, want: Want) -> str:
    """``--corrupt-at-end``: change one character of one served document, behind the projector's
    back, as a lost or misapplied write would; return the handle. Shows the checker catches it."""
    handle = max(want, key=lambda h: (len(want[h]["recent_events"]), h))
    gen = int(client.get(keys.CURRENT) or 0)
    uid = int(client.get(keys.handle(gen, handle.lower())) or 0)
    doc_key = keys.user_doc(gen, uid)
    found = client.get(doc_key)
    doc = found if isinstance(found, bytes) else None
    marker = b'"hash":"'
    at = doc.find(marker) + len(marker) if doc else -1
    if doc is None or at < len(marker):
        raise RuntimeError(f"no document with an event hash for {handle}")
    swapped = b"0" if doc[at : at + 1] != b"0" else b"1"
    client.set(doc_key, doc[:at] + swapped + doc[at + 1 :])
    return handle
