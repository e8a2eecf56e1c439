"""Unit tests of projector/fold.py: the pure core, no Postgres, no Redis.

Expected values are written by hand from each scenario.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from projector.fold import FoldResult, HandleMove, Loaded, fold, merge_top
from projector.records import AgentRow, Event, OwnerView, UserRow, iso_utc
from projector.render import render_doc

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def ev(seq: int, minute: float, agent: int = 10) -> Event:
    return Event(
        id=f"00000000-0000-0000-0000-{seq:012d}",
        seq=seq,
        event_type="inference",
        agent_id=agent,
        model="gpt-5",
        provider="openai",
        hash=f"h{seq}",
        prev_hash=f"h{seq - 1}",
        created_at=iso_utc(T0 + timedelta(minutes=minute)),
    )


def seqs(events: list[Event]) -> list[int]:
    return [e.seq for e in events]


def view(uid: int, handle: str, agents: dict[int, str], top=(), height: int = 0) -> OwnerView:
    return OwnerView(uid, handle, None, dict(agents), list(top), height)


def loaded(
    views: list[OwnerView],
    owners: dict[int, int],
    agents: dict[int, AgentRow | None],
    users: dict[int, UserRow | None],
    height: int = 0,
) -> Loaded:
    return Loaded({v.user_id: v for v in views}, owners, agents, users, height)


def apply_moves(index: dict[str, int], moves: list[HandleMove]) -> dict[str, int]:
    """The sink's contract for handle moves: release old if it is still ours, claim new."""
    out = dict(index)
    for m in moves:
        if m.old is not None and m.old != m.new and out.get(m.old) == m.user_id:
            del out[m.old]
        if m.new is not None:
            out[m.new] = m.user_id
    return out


# -- merge_top -----------------------------------------------------------------------------------
def test_merge_top_orders_by_created_at_desc_then_seq_desc() -> None:
    merged = merge_top([ev(1, 5), ev(2, 1)], [ev(3, 5), ev(4, 0), ev(5, 3), ev(6, 1)])
    assert seqs(merged) == [3, 1, 5, 6, 2, 4]


def test_merge_top_keeps_twelve_and_back_dated_events_do_not_displace() -> None:
    window = [ev(s, s) for s in range(1, 13)]
    assert seqs(merge_top(window, [ev(13, -60)])) == list(range(12, 0, -1))
    assert seqs(merge_top(window, [ev(14, 100)])) == [14, *range(12, 1, -1)]
    assert seqs(merge_top(window, [ev(15, 6.5)])) == [*range(12, 6, -1), 15, *range(6, 1, -1)]


def test_merge_top_ties_beyond_the_window_keep_the_highest_seqs() -> None:
    merged = merge_top([ev(s, 0) for s in (2, 9, 4)], [ev(s, 0) for s in range(10, 22)])
    assert seqs(merged) == list(range(21, 9, -1))


def test_merge_top_shows_an_event_once() -> None:
    window = [ev(1, 1), ev(2, 2)]
    merged = merge_top(window, [ev(2, 2), ev(1, 1), ev(3, 3), ev(3, 3)])
    assert seqs(merged) == [3, 2, 1]
    assert seqs(merge_top(merged, merged)) == [3, 2, 1]


def test_iso_utc_keeps_microseconds_and_sorts_as_time_across_offsets() -> None:
    ist = timezone(timedelta(hours=5, minutes=30))
    later_in_ist = (T0 + timedelta(microseconds=1)).astimezone(ist)
    earlier_in_utc = T0
    assert iso_utc(later_in_ist) > iso_utc(earlier_in_utc)
    assert iso_utc(later_in_ist) == "2025-01-01T12:00:00.000001+00:00"
    a = ev(1, 0)._replace(created_at=iso_utc(later_in_ist))
    b = ev(2, 0)._replace(created_at=iso_utc(earlier_in_utc))
    assert seqs(merge_top([], [b, a])) == [1, 2]


# -- events --------------------------------------------------------------------------------------
def test_events_go_to_their_owners_window_and_heights() -> None:
    state = loaded(
        [view(1, "ann", {10: "a"}, [ev(1, 1)], 1), view(2, "ben", {20: "b"})],
        {10: 1, 20: 2},
        {10: AgentRow(10, 1, "a"), 20: AgentRow(20, 2, "b")},
        {},
        height=1,
    )
    out = fold(state, [ev(5, 2, agent=10), ev(3, 9, agent=20), ev(4, 0, agent=10)])
    assert seqs(out.views[1].top) == [5, 1, 4]
    assert seqs(out.views[2].top) == [3]
    assert (out.views[1].height, out.views[2].height, out.global_height) == (5, 3, 5)
    assert out.recompute == set()


def test_fold_leaves_the_loaded_state_alone_and_is_idempotent() -> None:
    original = view(1, "ann", {10: "a"}, [ev(1, 1)], 1)
    state = loaded([original], {10: 1}, {10: AgentRow(10, 1, "a")}, {})
    batch = [ev(2, 2), ev(3, 0)]
    first = fold(state, batch)
    assert seqs(original.top) == [1] and original.height == 1
    again = fold(replace(state, views={1: first.views[1]}), batch)
    assert seqs(again.views[1].top) == seqs(first.views[1].top) == [2, 1, 3]
    assert again.views[1].height == 3


def test_an_event_of_an_agent_nobody_loaded_is_an_error() -> None:
    state = loaded([view(1, "ann", {10: "a"})], {10: 1}, {10: AgentRow(10, 1, "a")}, {})
    with pytest.raises(ValueError):
        fold(state, [ev(1, 0, agent=99)])


def test_an_agent_whose_owner_was_not_loaded_is_an_error() -> None:
    state = loaded([view(1, "ann", {})], {}, {10: AgentRow(10, 7, "a")}, {})
    with pytest.raises(ValueError):
        fold(state, [])


# -- agents --------------------------------------------------------------------------------------
def test_transfer_marks_both_owners_for_recompute() -> None:
    state = loaded(
        [view(1, "ann", {10: "mover", 11: "stayer"}, [ev(1, 1)], 1), view(2, "ben", {20: "b"})],
        {10: 1},
        {10: AgentRow(10, 2, "mover")},
        {},
        height=1,
    )
    out = fold(state, [ev(7, 3, agent=10)])
    assert {1, 2} <= out.recompute
    assert out.views[1].agents == {11: "stayer"}
    assert out.views[2].agents == {20: "b", 10: "mover"}
    assert out.agent_owner_set == {10: 2}
    assert (1, 10) in out.owned_del
    assert out.owned_set == {(2, 10): "mover"}
    assert out.global_height == 7


def test_transfer_of_an_agent_routes_later_batches_to_the_new_owner() -> None:
    state = loaded(
        [view(1, "ann", {}), view(2, "ben", {10: "mover"})],
        {10: 2},  # what the previous batch's agent_owner_set recorded
        {10: AgentRow(10, 2, "mover")},
        {},
    )
    out = fold(state, [ev(8, 1, agent=10)])
    assert seqs(out.views[2].top) == [8]
    assert 1 not in out.views or out.views[1].top == []
    assert out.recompute == set()


def test_rename_changes_the_name_on_old_events_without_recompute() -> None:
    state = loaded(
        [view(1, "ann", {10: "alpha"}, [ev(1, 1), ev(2, 2)], 2)],
        {10: 1},
        {10: AgentRow(10, 1, "beta")},
        {},
    )
    out = fold(state, [])
    assert out.recompute == set()
    assert out.owned_set == {(1, 10): "beta"}
    assert out.views[1].agents == {10: "beta"}
    doc = orjson.loads(render_doc(out.views[1]))
    assert [e["agent_name"] for e in doc["recent_events"]] == ["beta", "beta"]


def test_deleted_agent_leaves_its_owner_and_the_routing() -> None:
    state = loaded(
        [view(1, "ann", {10: "a", 11: "idle"}, [ev(1, 1)], 1)],
        {10: 1, 11: 1},
        {11: None},
        {},
    )
    out = fold(state, [])
    assert out.views[1].agents == {10: "a"}
    assert (1, 11) in out.owned_del
    assert out.agent_owner_del == {11}
    assert seqs(out.views[1].top) == [1]


def test_new_agent_joins_its_owner() -> None:
    state = loaded([view(1, "ann", {10: "a"})], {10: 1}, {12: AgentRow(12, 1, "new")}, {})
    out = fold(state, [])
    assert out.views[1].agents == {10: "a", 12: "new"}
    assert out.agent_owner_set == {12: 1}
    assert out.owned_set == {(1, 12): "new"}


# -- users and handles ---------------------------------------------------------------------------
def test_new_user_gets_a_view_and_a_handle() -> None:
    out = fold(loaded([], {}, {}, {5: UserRow(5, "NewOne", "New")}), [])
    assert (out.views[5].handle, out.views[5].display_name) == ("NewOne", "New")
    assert (out.views[5].agents, out.views[5].top, out.views[5].height) == ({}, [], 0)
    assert out.handle_moves == [HandleMove(5, None, "newone")]


def test_handle_rename_releases_the_old_and_claims_the_new() -> None:
    state = loaded([view(1, "Alice", {})], {}, {}, {1: UserRow(1, "Bob.B", "Al")})
    out = fold(state, [])
    assert out.handle_moves == [HandleMove(1, "alice", "bob.b")]
    assert (out.views[1].handle, out.views[1].display_name) == ("Bob.B", "Al")
    assert apply_moves({"alice": 1}, out.handle_moves) == {"bob.b": 1}


def test_case_only_handle_change_keeps_the_lookup() -> None:
    out = fold(loaded([view(1, "alice", {})], {}, {}, {1: UserRow(1, "ALICE", None)}), [])
    assert out.views[1].handle == "ALICE"
    assert apply_moves({"alice": 1}, out.handle_moves) == {"alice": 1}


@pytest.mark.parametrize("order", [(1, 2), (2, 1)])
def test_handle_swap_between_two_users(order: tuple[int, int]) -> None:
    rows = {1: UserRow(1, "bob", None), 2: UserRow(2, "alice", None)}
    state = loaded([view(1, "alice", {}), view(2, "bob", {})], {}, {}, {u: rows[u] for u in order})
    out = fold(state, [])
    assert sorted(out.handle_moves, key=lambda m: m.user_id) == [
        HandleMove(1, "alice", "bob"),
        HandleMove(2, "bob", "alice"),
    ]
    assert apply_moves({"alice": 1, "bob": 2}, out.handle_moves) == {"alice": 2, "bob": 1}


def test_handle_the_api_would_refuse_gets_no_index_key() -> None:
    out = fold(loaded([view(1, "fine", {})], {}, {}, {1: UserRow(1, "not fine!", None)}), [])
    assert out.handle_moves == [HandleMove(1, "fine", None)]
    assert apply_moves({"fine": 1}, out.handle_moves) == {}


def test_display_name_change() -> None:
    state = loaded([replace(view(1, "ann", {}), display_name="Old")], {}, {}, {})
    state.users[1] = UserRow(1, "ann", None)
    out = fold(state, [])
    assert out.views[1].display_name is None


def test_deleted_user_is_dropped_and_releases_the_handle() -> None:
    state = loaded(
        [view(1, "Gone", {}), view(2, "stays", {20: "x"})],
        {20: 2},
        {},
        {1: None},
    )
    out = fold(state, [])
    assert out.deleted_users == {1}
    assert 1 not in out.views and 1 not in out.recompute
    assert out.handle_moves == [HandleMove(1, "gone", None)]
    assert apply_moves({"gone": 1, "stays": 2}, out.handle_moves) == {"stays": 2}


def test_deleted_user_whose_handle_was_already_claimed_keeps_the_claim() -> None:
    # user 1 renamed away and deleted; user 2 took the handle in the same batch
    state = loaded(
        [view(1, "taken", {}), view(2, "other", {})],
        {},
        {},
        {1: None, 2: UserRow(2, "taken", None)},
    )
    out = fold(state, [])
    assert apply_moves({"taken": 1, "other": 2}, out.handle_moves) == {"taken": 2}


def test_unknown_deleted_user_is_nothing_to_do() -> None:
    out = fold(loaded([], {}, {}, {9: None}), [])
    assert out == FoldResult()
