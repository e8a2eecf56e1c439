"""Optional owner-scoped access: a Bearer JWT whose subject is the handle asked for.

Off unless ``DASHBOARD_JWT_KEY`` is set (models/settings.py). When on, every dashboard request
needs ``Authorization: Bearer <token>``, verified here with PyJWT alone (signature, ``exp``,
``nbf``, and ``aud``/``iss`` when configured): Postgres and Redis are never asked, so a refused
request costs neither. The token may read the dashboard of the handle in its ``sub`` claim
(compared case-insensitively, as handles are), or any dashboard if it carries the operator scope
(in a space-separated ``scope`` claim, or in an ``scp`` list).

- 401 + ``WWW-Authenticate: Bearer ...`` (RFC 6750): no token, a header that is not
  ``Bearer <token>``, or a token that is malformed, expired, not yet valid, badly signed, signed
  with an algorithm not configured (``alg: none`` included), or for another audience or issuer.
- 403: a valid token for someone else, without the operator scope.

Nothing happens at import; ``OwnerAccess`` is built by ``create_app`` from its settings.
"""

from __future__ import annotations

from typing import Any

import jwt
from fastapi import HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from models.handles import handle_key, is_valid_handle
from models.settings import JWT_HMAC_MIN_KEY_BYTES, RedisSettings

REALM = "dashboards"
MAX_TOKEN_CHARS = 8192  # far above any real token; refused before any decoding work

# Declared for OpenAPI only (the security scheme); the header is parsed below, so that a
# malformed header and a missing one get their own answers.
BEARER = HTTPBearer(
    bearerFormat="JWT",
    scheme_name="DashboardJWT",
    description=(
        "A JWT whose `sub` is the handle asked for (case-insensitive), or that carries the"
        " operator scope. Required only when the API is configured with DASHBOARD_JWT_KEY."
    ),
    auto_error=False,
)

# Fixed descriptions: nothing from the token is echoed back.
_REASONS: list[tuple[type[jwt.InvalidTokenError], str]] = [
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet"),
    (jwt.InvalidAudienceError, "the token is for another audience"),
    (jwt.InvalidIssuerError, "the token is from another issuer"),
    (jwt.InvalidAlgorithmError, "the token's algorithm is not accepted"),
    (jwt.InvalidSignatureError, "the token's signature does not verify"),
    (jwt.MissingRequiredClaimError, "the token lacks a required claim (sub, exp)"),
    (jwt.DecodeError, "the token is malformed"),
]


def _unauthorized(detail: str, error: str | None) -> HTTPException:
    challenge = f'Bearer realm="{REALM}"'
    if error is not None:
        challenge += f', error="{error}", error_description="{detail}"'
    return HTTPException(401, detail, headers={"WWW-Authenticate": challenge})


def token_scopes(claims: dict[str, Any]) -> set[str]:
    """The scopes a token grants: ``scope`` (space-separated) and ``scp`` (list or string)."""
    scopes: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            scopes.update(value.split())
        elif isinstance(value, list):
            scopes.update(item for item in value if isinstance(item, str))
    return scopes


class OwnerAccess:
    """The FastAPI dependency that guards ``GET /v1/users/{handle}/dashboard``."""

    def __init__(self, settings: RedisSettings) -> None:
        if settings.dashboard_jwt_key is None:
            raise ValueError("OwnerAccess needs DASHBOARD_JWT_KEY")
        algorithms = settings.dashboard_jwt_algorithms
        raw_key = settings.dashboard_jwt_key.get_secret_value()
        # Prepared once (a PEM is parsed here, not per request); settings checked it already.
        self._key: Any = (
            raw_key.encode()
            if algorithms[0] in JWT_HMAC_MIN_KEY_BYTES
            else jwt.get_algorithm_by_name(algorithms[0]).prepare_key(raw_key)
        )
        self._algorithms = list(algorithms)
        self._audience = settings.dashboard_jwt_audience
        self._issuer = settings.dashboard_jwt_issuer
        self._leeway = settings.dashboard_jwt_leeway_seconds
        self.operator_scope = settings.dashboard_jwt_operator_scope
        self._jwt = jwt.PyJWT(options={"require": ["exp", "sub"]})

    def verify(self, authorization: str | None) -> dict[str, Any]:
        """The token's claims, or an HTTPException(401)."""
        if authorization is None:
            raise _unauthorized("a Bearer token is required", None)
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            raise _unauthorized(
                "the Authorization header must be 'Bearer <token>'", "invalid_request"
            )
        if len(token) > MAX_TOKEN_CHARS:
            raise _unauthorized("the token is malformed", "invalid_token")
        try:
            claims: dict[str, Any] = self._jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
            )
        except jwt.InvalidTokenError as exc:
            reason = next((text for kind, text in _REASONS if isinstance(exc, kind)), None)
            raise _unauthorized(reason or "the token is not valid", "invalid_token") from None
        return claims

    def may_read(self, claims: dict[str, Any], handle: str) -> bool:
        if self.operator_scope in token_scopes(claims):
            return True
        if not is_valid_handle(handle):
            return True  # the route answers 422 for it, serving nothing
        subject = claims.get("sub")
        return (
            isinstance(subject, str)
            and is_valid_handle(subject)
            and handle_key(subject) == handle_key(handle)
        )

    async def __call__(
        self,
        request: Request,
        _declared: HTTPAuthorizationCredentials | None = Security(BEARER),  # noqa: B008
    ) -> None:
        claims = self.verify(request.headers.get("authorization"))
        if not self.may_read(claims, str(request.path_params.get("handle", ""))):
            raise HTTPException(
                403,
                "this token may read only its own dashboard",
                headers={
                    "WWW-Authenticate": (
                        f'Bearer realm="{REALM}", error="insufficient_scope",'
                        f' scope="{self.operator_scope}"'
                    )
                },
            )
