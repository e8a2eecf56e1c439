"""Settings from the environment, validated once; built on demand, never at import."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class RedisSettings(BaseSettings):
    """What the API needs: only Redis."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    redis_url: str = Field(default="redis://127.0.0.1:6379/0")
    # Seconds a client is told to wait when there is no read model to answer from.
    retry_after_seconds: int = Field(default=2, ge=1)

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("REDIS_URL must look like redis://host:port/db")
        return v


class ProjectorSettings(RedisSettings):
    """What the projector and the scripts need: Postgres as well."""

    database_url: str
    # Events per batch. Big on purpose: a batch's cost is mostly one rewrite per touched owner,
    # so a backlog is cheapest in few large slices; live traffic makes small ones anyway.
    batch_size: int = Field(default=500_000, ge=1)
    # Upper bound on how long the worker sleeps without a NOTIFY before looking again: a
    # transaction that rolls back sends none, yet it may have been holding the horizon back.
    idle_poll_seconds: float = Field(default=0.5, gt=0)
    heartbeat_ttl_seconds: int = Field(default=15, ge=1)
    max_backoff_seconds: float = Field(default=5.0, gt=0)

    @field_validator("database_url")
    @classmethod
    def _psycopg_driver(cls, v: str) -> str:
        for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
            if v.startswith(prefix):
                return "postgresql+psycopg://" + v[len(prefix) :]
        raise ValueError("DATABASE_URL must look like postgresql://user@host:port/db")


@lru_cache
def get_redis_settings() -> RedisSettings:
    return RedisSettings()


@lru_cache
def get_projector_settings() -> ProjectorSettings:
    return ProjectorSettings()  # database_url comes from the environment
