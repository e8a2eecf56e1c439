"""The pure heart of the projector: a batch of changes in, read-model updates out.

Inputs are what the edge loaded: the current Postgres rows of every user and agent the batch
touches, the projector's own belief about who owned each touched agent, the affected owners'
views from Redis, and the batch's events. Every update is idempotent (events are keyed by seq,
heights are maxima, entity state is "current"), so applying a batch twice is harmless.

An owner who loses or gains an agent cannot be updated incrementally: the agent's whole history
moves, and the owner's new top-12 may include events that were never in any stored window. Such
owners are listed in ``recompute`` and re-read from Postgres by the edge, bounded by the batch's
cursor (see source.owner_windows).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from models.handles import handle_key, is_valid_handle
from models.keys import TOP_N
from projector.records import AgentRow, Event, OwnerView, UserRow


@dataclass
class Loaded:
    views: dict[int, OwnerView]
    agent_owner: dict[int, int]
    agents: dict[int, AgentRow | None]
    users: dict[int, UserRow | None]
    global_height: int


@dataclass
class HandleMove:
    user_id: int
    old: str | None  # lowercased handle to release if it still points at this user
    new: str | None  # lowercased handle to point at this user


@dataclass
class FoldResult:
    views: dict[int, OwnerView] = field(default_factory=dict)
    deleted_users: set[int] = field(default_factory=set)
    handle_moves: list[HandleMove] = field(default_factory=list)
    agent_owner_set: dict[int, int] = field(default_factory=dict)
    agent_owner_del: set[int] = field(default_factory=set)
    # Changes to each owner's agents hash, so a batch writes what changed, not all 2,000 agents
    # of a big tenant: (owner, agent) -> name, and (owner, agent) pairs to drop.
    owned_set: dict[tuple[int, int], str] = field(default_factory=dict)
    owned_del: set[tuple[int, int]] = field(default_factory=set)
    recompute: set[int] = field(default_factory=set)
    global_height: int = 0


def merge_top(top: Iterable[Event], new: Iterable[Event]) -> list[Event]:
    by_seq = {e.seq: e for e in top}
    by_seq.update((e.seq, e) for e in new)
    return sorted(by_seq.values(), key=lambda e: e.order_key, reverse=True)[:TOP_N]


def _indexable(handle: str) -> str | None:
    # A handle the API would refuse (422) can never be looked up, so it gets no index key.
    return handle_key(handle) if is_valid_handle(handle) else None


def _fold_users(loaded: Loaded, views: dict[int, OwnerView], out: FoldResult) -> None:
    for uid, row in loaded.users.items():
        view = views.get(uid)
        if row is None:
            if view is not None:
                out.deleted_users.add(uid)
                out.handle_moves.append(HandleMove(uid, _indexable(view.handle), None))
                del views[uid]
            continue
        if view is None:
            view = views[uid] = OwnerView(uid, row.handle, row.display_name)
            out.handle_moves.append(HandleMove(uid, None, _indexable(row.handle)))
        elif view.handle != row.handle:
            out.handle_moves.append(
                HandleMove(uid, _indexable(view.handle), _indexable(row.handle))
            )
        elif view.display_name == row.display_name:
            continue  # nothing of this user's changed
        view.handle, view.display_name = row.handle, row.display_name
        out.views[uid] = view


def _fold_agents(loaded: Loaded, views: dict[int, OwnerView], out: FoldResult) -> dict[int, int]:
    owner_of = dict(loaded.agent_owner)
    for aid, row in loaded.agents.items():
        believed = owner_of.get(aid)
        new_owner = None if row is None else row.owner_id
        if believed is not None and believed != new_owner:
            lost = views.get(believed)
            if lost is not None:
                lost.agents.pop(aid, None)
                out.owned_del.add((believed, aid))
                out.views[believed] = lost
                out.recompute.add(believed)
        if row is None:
            owner_of.pop(aid, None)
            out.agent_owner_del.add(aid)
            continue
        gained = views.get(row.owner_id)
        if gained is None:
            raise ValueError(f"owner {row.owner_id} of agent {aid} was not loaded")
        if believed != row.owner_id:
            owner_of[aid] = row.owner_id
            out.agent_owner_set[aid] = row.owner_id
            out.recompute.add(row.owner_id)
        if gained.agents.get(aid) != row.name:
            gained.agents[aid] = row.name
            out.owned_set[(row.owner_id, aid)] = row.name
        out.views[row.owner_id] = gained
    return owner_of


def fold(loaded: Loaded, events: list[Event], heights: dict[int, int] | None = None) -> FoldResult:
    """Fold one batch. ``events`` must hold at least each owner's 12 most recent events of the
    batch; ``heights`` is the batch's max seq per agent (derived from ``events`` if omitted)."""
    if heights is None:
        heights = {}
        for e in events:
            heights[e.agent_id] = max(heights.get(e.agent_id, 0), e.seq)
    # Copies, so the caller's loaded state is left as it was.
    views = {
        uid: OwnerView(v.user_id, v.handle, v.display_name, dict(v.agents), list(v.top), v.height)
        for uid, v in loaded.views.items()
    }
    out = FoldResult(global_height=loaded.global_height)
    _fold_users(loaded, views, out)
    owner_of = _fold_agents(loaded, views, out)
    by_owner: dict[int, list[Event]] = {}
    for event in events:
        by_owner.setdefault(_owner(owner_of, event.agent_id), []).append(event)
    for agent_id, height in heights.items():
        owner = _owner(owner_of, agent_id)
        out.global_height = max(out.global_height, height)
        view = out.views[owner] = views[owner]
        # A recomputed owner reads these events too, bounded by this batch's cursor.
        if owner not in out.recompute:
            view.height = max(view.height, height)
    for owner, owned in by_owner.items():
        if owner not in out.recompute:
            views[owner].top = merge_top(views[owner].top, owned)
    out.recompute -= out.deleted_users
    return out


def _owner(owner_of: dict[int, int], agent_id: int) -> int:
    owner = owner_of.get(agent_id)
    if owner is None:
        raise ValueError(f"agent {agent_id} has events in the batch but was not loaded")
    return owner
