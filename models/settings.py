"""Settings from the environment, validated once; built on demand, never at import."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Signature algorithms the dashboard JWT may name. HMAC ones need a key at least as long as the
# hash (RFC 7518 3.2); the others verify with a public key.
JWT_HMAC_MIN_KEY_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
JWT_PUBLIC_KEY_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class RedisSettings(BaseSettings):
    """What the API needs: only Redis."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    redis_url: str = Field(default="redis://127.0.0.1:6379/0")
    # Seconds a client is told to wait when there is no read model to answer from.
    retry_after_seconds: int = Field(default=2, ge=1)
    # Live updates (api/live.py): a comment line on every idle stream this often, and how often
    # at most a change of the shared tail alone (global height, position) re-sends dashboards.
    sse_heartbeat_seconds: float = Field(default=15.0, gt=0)
    sse_shared_refresh_seconds: float = Field(default=1.0, ge=0)

    # Owner-scoped access (api/auth.py), off while no key is set. The key is an HMAC secret for
    # HS* algorithms, or a PEM public key for the others (a PEM given with literal "\n" escapes,
    # as one-line environments hold it, is accepted too).
    dashboard_jwt_key: SecretStr | None = None
    # A JSON list (["RS256"]) or a comma-separated list (RS256,PS256); one key family only.
    dashboard_jwt_algorithms: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["HS256"]
    )
    dashboard_jwt_audience: str | None = None
    dashboard_jwt_issuer: str | None = None
    # A token carrying this scope (space-separated "scope" claim, or "scp" list) reads any user.
    dashboard_jwt_operator_scope: str = "dashboards:read-all"
    dashboard_jwt_leeway_seconds: float = Field(default=0, ge=0, le=3600)

    # /readyz (api/health.py) answers 503 once the projector's heartbeat is older than this.
    ready_max_heartbeat_age_seconds: float = Field(default=30.0, gt=0)

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("REDIS_URL must look like redis://host:port/db")
        return v

    @field_validator("dashboard_jwt_algorithms", mode="before")
    @classmethod
    def _algorithm_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except ValueError:
                    raise ValueError(
                        'DASHBOARD_JWT_ALGORITHMS must be a JSON list (["RS256"]) or a'
                        " comma-separated list (RS256,PS256)"
                    ) from None
            return [part.strip() for part in text.split(",") if part.strip()]
        return v

    @field_validator("dashboard_jwt_algorithms")
    @classmethod
    def _known_algorithms(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("DASHBOARD_JWT_ALGORITHMS must name at least one algorithm")
        known = sorted([*JWT_HMAC_MIN_KEY_BYTES, *JWT_PUBLIC_KEY_ALGORITHMS])
        for alg in v:
            if alg.lower() == "none":
                raise ValueError("DASHBOARD_JWT_ALGORITHMS: unsigned tokens (none) are refused")
            if alg not in known:
                raise ValueError(
                    f"DASHBOARD_JWT_ALGORITHMS: unknown algorithm {alg!r} (one of {known})"
                )
        hmac = [alg in JWT_HMAC_MIN_KEY_BYTES for alg in v]
        if any(hmac) and not all(hmac):
            # One key verifies every algorithm listed: a public key accepted as an HMAC secret
            # would let anyone who has it sign tokens.
            raise ValueError(
                "DASHBOARD_JWT_ALGORITHMS must not mix HMAC (HS*) and public-key algorithms"
            )
        return list(dict.fromkeys(v))

    @field_validator("dashboard_jwt_audience", "dashboard_jwt_issuer")
    @classmethod
    def _blank_is_unset(cls, v: str | None) -> str | None:
        return v if v is None or v.strip() else None

    @field_validator("dashboard_jwt_operator_scope")
    @classmethod
    def _one_scope(cls, v: str) -> str:
        if not v or v != v.strip() or any(ch.isspace() for ch in v):
            raise ValueError("DASHBOARD_JWT_OPERATOR_SCOPE must be one scope name, without spaces")
        return v

    @field_validator("dashboard_jwt_key")
    @classmethod
    def _pem_escapes(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None:
            return None
        key = v.get_secret_value()
        if not key.strip():
            return None  # DASHBOARD_JWT_KEY= (empty) leaves access control off
        if key.lstrip().startswith("-----BEGIN") and "\n" not in key and "\\n" in key:
            return SecretStr(key.strip().replace("\\n", "\n") + "\n")
        return v

    @model_validator(mode="after")
    def _key_fits_algorithms(self) -> RedisSettings:
        if self.dashboard_jwt_key is not None:
            _check_jwt_key(self.dashboard_jwt_key.get_secret_value(), self.dashboard_jwt_algorithms)
        return self

    @property
    def jwt_enabled(self) -> bool:
        return self.dashboard_jwt_key is not None


class ProjectorSettings(RedisSettings):
    """What the projector and the scripts need: Postgres as well."""

    database_url: str
    # Events per batch. Big on purpose: a batch's cost is mostly one rewrite per touched owner,
    # so a backlog is cheapest in few large slices; live traffic makes small ones anyway. What
    # the projector holds grows with owners, not events (Postgres ranks the slice), and the
    # Postgres side of a 1M slice needs ~100 MB of its work_mem.
    batch_size: int = Field(default=1_000_000, ge=1)
    # Upper bound on how long the worker sleeps without a NOTIFY before looking again: a
    # transaction that rolls back sends none, yet it may have been holding the horizon back.
    idle_poll_seconds: float = Field(default=0.5, gt=0)
    heartbeat_ttl_seconds: int = Field(default=15, ge=1)
    max_backoff_seconds: float = Field(default=5.0, gt=0)
    # High availability (projector/leader.py): a frozen leader's lease ends after this long
    # without a beat, and a standby tries for the lead this often; together they bound takeover.
    leader_lease_seconds: float = Field(default=3.0, ge=0.5)
    standby_poll_seconds: float = Field(default=0.5, gt=0)
    # Prometheus metrics (projector/metrics.py) on this port of every projector; 0 turns them off.
    metrics_port: int = Field(default=9108, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    # text: the usual log lines; json: one object a line (projector/logs.py).
    log_format: Literal["text", "json"] = "text"

    @field_validator("database_url")
    @classmethod
    def _psycopg_driver(cls, v: str) -> str:
        for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
            if v.startswith(prefix):
                return "postgresql+psycopg://" + v[len(prefix) :]
        raise ValueError("DATABASE_URL must look like postgresql://user@host:port/db")


def _check_jwt_key(key: str, algorithms: list[str]) -> None:
    looks_pem = key.lstrip().startswith("-----BEGIN") or key.startswith(("ssh-", "ecdsa-"))
    if algorithms[0] in JWT_HMAC_MIN_KEY_BYTES:
        if looks_pem:
            raise ValueError(
                "DASHBOARD_JWT_KEY looks like a public key, but DASHBOARD_JWT_ALGORITHMS are"
                f" HMAC ({', '.join(algorithms)}): set them to e.g. RS256"
            )
        need = max(JWT_HMAC_MIN_KEY_BYTES[alg] for alg in algorithms)
        if len(key.encode()) < need:
            raise ValueError(
                f"DASHBOARD_JWT_KEY must hold at least {need} bytes for"
                f" {', '.join(algorithms)} (RFC 7518 3.2)"
            )
        return
    import jwt  # only when access control is configured

    for alg in algorithms:
        verifier = jwt.get_algorithm_by_name(alg)
        try:
            prepared = verifier.prepare_key(key)
        except (jwt.InvalidKeyError, ValueError, TypeError) as exc:
            raise ValueError(
                f"DASHBOARD_JWT_KEY is not a public key usable with {alg}: {exc}"
            ) from None
        if hasattr(prepared, "public_key"):  # a private key: the API only verifies
            raise ValueError("DASHBOARD_JWT_KEY is a private key: give the API the public key only")
        too_short = getattr(verifier, "check_key_length", lambda _: None)(prepared)
        if too_short:
            raise ValueError(f"DASHBOARD_JWT_KEY: {too_short}")


@lru_cache
def get_redis_settings() -> RedisSettings:
    return RedisSettings()


@lru_cache
def get_projector_settings() -> ProjectorSettings:
    return ProjectorSettings()  # database_url comes from the environment
