"""How fresh an answer is, and whether the client already has it: X-Projection-*, ETag, 304.

The shared tail the projector writes holds the ``projection`` object (generation, position,
applied_at, committed_at, and whatever it gains later). It is parsed here once per tail change,
never per request, into ready-made ``X-Projection-*`` header pairs: each scalar member becomes
one header (``applied_at`` -> ``X-Projection-Applied-At``; a null member sends no header).

A ``Served`` answer is built once per (user document, tail) pair: the bytes, their strong ETag
(a hash of exactly those bytes) and the raw header lists of its 200 and its 304. A request then
costs a list copy, and, only when it sends ``If-None-Match``, a comparison.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.responses import Response

CACHE_CONTROL = b"no-cache"  # clients may keep an answer, but must revalidate it (ETag) first
_SCALAR_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")
_PRINTABLE = re.compile(r"[\x20-\x7e]{1,256}")
# A tail re-opens chain_meta and closes the body (projector/render.py): behind this prefix it is
# one JSON object, whatever members it holds.
_TAIL_OPENER = b'{"chain_meta":{"_":0'
# An entity-tag of an If-None-Match list (RFC 9110 8.8.3): W/ is ignored by weak comparison.
_ENTITY_TAG = re.compile(rb'(?:W/)?("[\x21\x23-\x7e\x80-\xff]*")')


def header_name(member: str) -> str:
    """``applied_at`` -> ``X-Projection-Applied-At``."""
    return "X-Projection-" + "-".join(part.capitalize() for part in member.split("_"))


def _header_value(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str) and _PRINTABLE.fullmatch(value):
        return value
    return None  # null, nested, or not sendable in a header as it is


@dataclass(frozen=True, slots=True)
class Tail:
    """One version of the shared tail, parsed."""

    raw: bytes
    projection: dict[str, Any] | None  # None: the tail is not what the projector writes
    headers: tuple[tuple[bytes, bytes], ...]

    @property
    def ok(self) -> bool:
        return self.projection is not None


def parse_tail(raw: bytes) -> Tail:
    try:
        spliced = orjson.loads(_TAIL_OPENER + raw)
    except orjson.JSONDecodeError:
        return Tail(raw, None, ())
    projection = spliced.get("projection") if isinstance(spliced, dict) else None
    if not isinstance(projection, dict):
        return Tail(raw, None, ())
    headers = []
    for member, value in projection.items():
        text = _header_value(value)
        if text is not None and _SCALAR_KEY.fullmatch(member):
            headers.append((header_name(member).lower().encode(), text.encode()))
    return Tail(raw, projection, tuple(headers))


def entity_tag(body: bytes) -> bytes:
    """A strong ETag: a hash of exactly the bytes served (quoted, as RFC 9110 wants it)."""
    return b'"' + hashlib.blake2b(body, digest_size=16).hexdigest().encode() + b'"'


def none_match(if_none_match: str, etag: bytes) -> bool:
    """Whether ``If-None-Match`` names ``etag`` (or is ``*``): the client has this answer.

    Weak comparison, as RFC 9110 13.1.2 asks for GET: ``W/"x"`` matches ``"x"``.
    """
    header = if_none_match.encode("latin-1", "replace")
    if header.strip() == b"*":
        return True
    if etag not in header:  # the common case (another version) costs one substring search
        return False
    return etag in _ENTITY_TAG.findall(header)


class PreparedResponse(Response):
    """A response whose raw headers were made once, ahead of the request."""

    def __init__(self, status_code: int, body: bytes, raw_headers: list[tuple[bytes, bytes]]):
        self.status_code = status_code
        self.body = body
        self.background = None
        self.raw_headers = raw_headers


@dataclass(frozen=True, slots=True)
class Served:
    """One answer as served: its bytes, ETag and headers, built once, reused by every hit."""

    body: bytes
    etag: bytes
    tail: Tail
    _ok_headers: tuple[tuple[bytes, bytes], ...]
    _not_modified_headers: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def build(cls, prefix: bytes, tail: Tail) -> Served:
        body = prefix + tail.raw
        etag = entity_tag(body)
        common = ((b"etag", etag), (b"cache-control", CACHE_CONTROL), *tail.headers)
        ok = (
            (b"content-length", str(len(body)).encode()),
            (b"content-type", b"application/json"),
            *common,
        )
        return cls(body, etag, tail, ok, common)

    @property
    def projection(self) -> dict[str, Any]:
        return self.tail.projection or {}

    def response(self, if_none_match: str | None = None) -> Response:
        """The 200, or a 304 without a body when ``If-None-Match`` names this answer."""
        if if_none_match is not None and none_match(if_none_match, self.etag):
            return PreparedResponse(304, b"", list(self._not_modified_headers))
        return PreparedResponse(200, self.body, list(self._ok_headers))
