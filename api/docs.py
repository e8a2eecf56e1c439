"""What ``/docs`` and ``/openapi.json`` say of the dashboard route: answers, headers, examples."""

from __future__ import annotations

from typing import Any

from models.dashboard import Problem, ValidationProblem

DASHBOARD_DESCRIPTION = """\
The user's dashboard, as the projector prepared it: their 12 most recent audit events over the
agents they own now, their chain height and the global one, and how fresh the answer is
(`projection`, also sent as `X-Projection-*` headers).

Every 200 carries a strong `ETag` (a hash of exactly the bytes served) and
`Cache-Control: no-cache`. Send it back in `If-None-Match` (a list, `W/` tags and `*` are
accepted; comparison is weak, as for any GET) to get a `304 Not Modified` without a body while
nothing in the answer changed: polling clients re-download only what changed.
"""


def _header(description: str, example: str, required: bool = True) -> dict[str, Any]:
    return {
        "description": description,
        "required": required,
        "schema": {"type": "string"},
        "example": example,
    }


FRESHNESS_HEADERS = {
    "ETag": _header(
        "Strong validator of these exact bytes; send it in If-None-Match",
        '"5d41402abc4b2a76b9719d911017c592"',
    ),
    "Cache-Control": _header("Always `no-cache`: keep the answer, but revalidate it", "no-cache"),
    "X-Projection-Generation": _header("The read-model generation served (`projection`)", "3"),
    "X-Projection-Position": _header(
        "The projector's cursor the answer reflects (opaque)", "88412:1000187"
    ),
    "X-Projection-Applied-At": _header(
        "When the projector applied the newest change", "2026-12-04T18:20:11.521Z"
    ),
    "X-Projection-Committed-At": _header(
        "When the newest applied change was committed in Postgres; absent when unknown",
        "2026-12-04T18:20:11.509Z",
        required=False,
    ),
}


def _example(body: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"example": body}}


DASHBOARD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The dashboard", "headers": FRESHNESS_HEADERS},
    304: {
        "description": (
            "Not Modified: `If-None-Match` names the current answer's ETag (or is `*`). No body;"
            " the ETag, Cache-Control and X-Projection-* headers are sent."
        ),
        "headers": FRESHNESS_HEADERS,
    },
    404: {
        "model": Problem,
        "description": "No user has this handle (never had, renamed away, or deleted)",
        "content": _example({"detail": "no user has this handle"}),
    },
    422: {
        "model": ValidationProblem,
        "description": "Malformed handle (valid: `^[A-Za-z0-9][A-Za-z0-9_.-]{0,38}$`)",
        "content": _example(
            {
                "detail": [
                    {
                        "type": "string_pattern_mismatch",
                        "loc": ["path", "handle"],
                        "msg": "String should match pattern '^[A-Za-z0-9][A-Za-z0-9_.-]{0,38}$'",
                        "input": "-leading-dash",
                    }
                ]
            }
        ),
    },
    503: {
        "model": Problem,
        "description": (
            "No read model to answer from: never built, lost by Redis and being rebuilt, or"
            " Redis unreachable. Retry after `Retry-After` seconds."
        ),
        "headers": {"Retry-After": _header("Seconds to wait before retrying", "2")},
        "content": _example(
            {"detail": "the dashboard read model is not available yet; retry shortly"}
        ),
    },
}


def access_responses(challenge: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    """The 401 and 403 of owner-scoped access (api/auth.py), declared only when it is on."""
    return {
        401: {
            "model": Problem,
            "description": "No valid Bearer token (missing, malformed, expired, badly signed)",
            "headers": challenge,
            "content": _example({"detail": "the token has expired"}),
        },
        403: {
            "model": Problem,
            "description": "The token is for another user and lacks the operator scope",
            "headers": challenge,
            "content": _example({"detail": "this token may read only its own dashboard"}),
        },
    }
