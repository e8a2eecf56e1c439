"""DDL for the platform's tables and for what the projector adds to them. Safe to run again."""

from __future__ import annotations

from sqlalchemy import Engine, text

# Serialises concurrent runs of init_db: CREATE ... IF NOT EXISTS is not race-free by itself.
_LOCK_KEY = 7_482_913_001

PLATFORM_DDL = """
create table if not exists users (
    id bigserial primary key,
    handle text not null,
    display_name text null,
    created_at timestamptz not null default now()
);
create unique index if not exists users_handle_lower_key on users (lower(handle));

create table if not exists agents (
    id bigserial primary key,
    owner_id bigint not null references users(id),
    name text not null,
    created_at timestamptz not null default now()
);
create index if not exists agents_owner_id_idx on agents (owner_id);

create table if not exists audit_events (
    id uuid primary key,
    seq bigserial unique,
    agent_id bigint not null references agents(id),
    event_type text not null,
    model text null,
    provider text null,
    payload jsonb not null default '{}',
    hash text not null,
    prev_hash text null,
    created_at timestamptz not null default now()
);

create or replace function audit_events_append_only() returns trigger
language plpgsql as $$
begin
    raise exception 'audit_events is append-only: % refused', tg_op
        using errcode = 'insufficient_privilege';
end $$;
drop trigger if exists audit_events_append_only on audit_events;
create trigger audit_events_append_only before update or delete on audit_events
    for each row execute function audit_events_append_only();
drop trigger if exists audit_events_no_truncate on audit_events;
create trigger audit_events_no_truncate before truncate on audit_events
    for each statement execute function audit_events_append_only();
"""

# Why a transaction id on every change: seq is taken at insert, so a transaction holding seq 100
# can commit after one holding seq 101. Reading "seq > last seen" would skip 100 for ever.
# Reading only rows whose tx_id is below the oldest running transaction (the snapshot's xmin)
# means no running transaction can still add a row below the cursor (DESIGN-NOTES part 1).
PROJECTOR_DDL = """
alter table audit_events add column if not exists tx_id xid8 not null
    default pg_current_xact_id();
create index if not exists audit_events_tx_seq_idx on audit_events (tx_id, seq);
-- tx_id rides along in the per-agent indexes so that ranking an agent's recent events and
-- finding its height, both bounded by a cursor, are index-only scans: a rebuild then visits
-- the heap only for each owner's 12 winners, not for 12 events of every agent.
create index if not exists audit_events_agent_recent_tx_idx
    on audit_events (agent_id, created_at desc, seq desc) include (tx_id);
create index if not exists audit_events_agent_seq_tx_idx
    on audit_events (agent_id, seq) include (tx_id);
drop index if exists audit_events_agent_recent_idx;
drop index if exists audit_events_agent_seq_idx;

create table if not exists projector_entity_changes (
    id bigserial primary key,
    tx_id xid8 not null default pg_current_xact_id(),
    kind char(1) not null check (kind in ('u', 'a')),
    entity_id bigint not null
);
create index if not exists projector_entity_changes_tx_id_idx
    on projector_entity_changes (tx_id, id);

create or replace function projector_log_user_change() returns trigger
language plpgsql as $$
begin
    insert into projector_entity_changes (kind, entity_id)
        values ('u', case when tg_op = 'DELETE' then old.id else new.id end);
    return null;
end $$;
create or replace function projector_log_agent_change() returns trigger
language plpgsql as $$
begin
    insert into projector_entity_changes (kind, entity_id)
        values ('a', case when tg_op = 'DELETE' then old.id else new.id end);
    return null;
end $$;
drop trigger if exists projector_user_changes on users;
create trigger projector_user_changes after insert or update or delete on users
    for each row execute function projector_log_user_change();
drop trigger if exists projector_agent_changes on agents;
create trigger projector_agent_changes after insert or update or delete on agents
    for each row execute function projector_log_agent_change();

-- A wake-up call, delivered at commit; Postgres folds repeats within one transaction.
create or replace function projector_notify() returns trigger
language plpgsql as $$
begin
    perform pg_notify('projector', '');
    return null;
end $$;
drop trigger if exists projector_notify_events on audit_events;
create trigger projector_notify_events after insert on audit_events
    for each statement execute function projector_notify();
drop trigger if exists projector_notify_entities on projector_entity_changes;
create trigger projector_notify_entities after insert on projector_entity_changes
    for each statement execute function projector_notify();
"""


def init_schema(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("select pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
        # Straight to psycopg, with no parameters, so the '%' in RAISE formats stays literal.
        raw = conn.connection.driver_connection
        assert raw is not None
        raw.execute(PLATFORM_DDL)
        raw.execute(PROJECTOR_DDL)
