"""A platform-shaped data set, generated inside Postgres (fast enough for 10M events).

5,000 users and 20,000 agents by default; one heavy tenant ``ainfera-ai`` owns 2,000 agents and
~30% of events; ``hizrianraz`` owns 3 agents and ~0.01% of events; the rest spread over the
others; created_at spread over 60 days.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, text


@dataclass(frozen=True)
class Shape:
    users: int = 5000
    agents: int = 20000
    heavy_agents: int = 2000
    light_agents: int = 3
    heavy_share: float = 0.30
    light_share: float = 0.0001


def create_people(engine: Engine, shape: Shape = Shape()) -> None:
    others = shape.users - 2
    rest = shape.agents - shape.heavy_agents - shape.light_agents
    with engine.begin() as conn:
        conn.execute(
            text(
                "insert into users (id, handle, display_name) values"
                " (1, 'ainfera-ai', 'Ainfera AI (E2E)'), (2, 'hizrianraz', 'Hizrian Raz')"
            )
        )
        conn.execute(
            text(
                "insert into users (id, handle) select 2 + g, 'user-' || g"
                " from generate_series(1, :n) g"
            ),
            {"n": others},
        )
        conn.execute(
            text(
                "insert into agents (id, owner_id, name)"
                " select g, 1, 'e2e-runner-' || g from generate_series(1, :h) g"
            ),
            {"h": shape.heavy_agents},
        )
        conn.execute(
            text(
                "insert into agents (id, owner_id, name)"
                " select :h + g, 2, 'hizrian-agent-' || g from generate_series(1, :l) g"
            ),
            {"h": shape.heavy_agents, "l": shape.light_agents},
        )
        conn.execute(
            text(
                "insert into agents (id, owner_id, name)"
                " select :base + g, 3 + (g % :others), 'agent-' || g from generate_series(1, :n) g"
            ),
            {"base": shape.heavy_agents + shape.light_agents, "n": rest, "others": others},
        )
        for table in ("users", "agents"):
            conn.execute(
                text(
                    f"select setval(pg_get_serial_sequence('{table}', 'id'),"
                    f" (select max(id) from {table}))"
                )
            )


def add_events(
    engine: Engine,
    count: int,
    shape: Shape = Shape(),
    chunk: int = 100_000,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Append ``count`` events in committed chunks of ``chunk``."""
    heavy, light = shape.heavy_agents, shape.light_agents
    rest = shape.agents - heavy - light
    sql = text(
        "insert into audit_events (id, agent_id, event_type, model, provider, hash, prev_hash,"
        " created_at)"
        " select gen_random_uuid(),"
        "  case when r < :hs then 1 + floor(random() * :heavy)::bigint"
        "       when r < :hs + :ls then :heavy + 1 + floor(random() * :light)::bigint"
        "       else :heavy + :light + 1 + floor(random() * :rest)::bigint end,"
        "  case when r < :hs then 'e2e.test' else 'inference' end,"
        "  'gpt-5', 'openai', md5(g::text) || md5((g + 7)::text),"
        "  md5((g - 1)::text) || md5((g + 6)::text),"
        "  now() - random() * interval '60 days'"
        " from (select g, random() as r from generate_series(1, :n) g) s"
    )
    done = 0
    while done < count:
        n = min(chunk, count - done)
        with engine.begin() as conn:
            conn.execute(
                sql,
                {
                    "hs": shape.heavy_share,
                    "ls": shape.light_share,
                    "heavy": heavy,
                    "light": light,
                    "rest": rest,
                    "n": n,
                },
            )
        done += n
        if progress is not None:
            progress(done, count)
