"""What a handle looks like, and how handles compare (case-insensitively)."""

from __future__ import annotations

import re

HANDLE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,38}$"
_HANDLE_RE = re.compile(HANDLE_PATTERN)


def is_valid_handle(handle: str) -> bool:
    return _HANDLE_RE.fullmatch(handle) is not None


def handle_key(handle: str) -> str:
    # Valid handles are ASCII, where Python's lower() and Postgres's lower() agree; that is
    # what makes the Redis index agree with the unique index on lower(handle).
    return handle.lower()
