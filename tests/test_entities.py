"""Issue 2, point 2: users and agents change under the events, and every change must show.

Each scenario writes through plain SQL (scripts/platform_sim.py, as the platform does), runs the
projector, and checks the hand-written consequence of the scenario plus the seed SQL for every
user (check_all).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine

from scripts import platform_sim as p
from tests.projection_helpers import LiveProjector, answer, mismatches, seqs_shown, wait_until

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


def _events(conn, agent: int, start: datetime, n: int, step=timedelta(minutes=1)) -> list[int]:
    return [p.add_event(conn, agent, created_at=start + i * step)[1] for i in range(n)]


def _body(api, handle: str) -> dict:
    status, body = answer(api, handle)
    assert status == 200 and body is not None, (handle, status)
    return body


def _newest(seqs: list[int], n: int = 12) -> list[int]:
    """Seqs written with increasing created_at: newest first, top n."""
    return seqs[::-1][:n]


def test_agent_transfer_moves_its_whole_history(engine, catch_up, api, check_all) -> None:
    with engine.begin() as conn:
        xavier = p.create_user(conn, "xavier")
        mover = p.create_agent(conn, xavier, "mover")
        stayer = p.create_agent(conn, xavier, "stayer")
        relic = p.create_agent(conn, xavier, "relic")
        yolanda = p.create_user(conn, "yolanda")
        ya = p.create_agent(conn, yolanda, "ya")
        zed = p.create_user(conn, "zed")
        ancient = _events(conn, mover, T0 - timedelta(days=365), 5)  # older than every window
        stay = _events(conn, stayer, T0, 15)  # just below xavier's window
        recent = _events(conn, mover, T0 + timedelta(days=1), 12)  # xavier's whole window
        yours = _events(conn, ya, T0 + timedelta(hours=12), 12)  # yolanda's whole window
        relics = _events(conn, relic, T0 - timedelta(days=400), 4)
    catch_up()
    assert seqs_shown(api, "xavier") == recent[::-1]
    assert seqs_shown(api, "yolanda") == yours[::-1]
    assert check_all() == 3

    with engine.begin() as conn:
        p.transfer_agent(conn, mover, yolanda)
    catch_up()
    # xavier's window refills from events that were never in it; yolanda's takes mover's.
    assert seqs_shown(api, "xavier") == _newest(stay)
    x = _body(api, "xavier")
    assert x["agent_count"] == 2
    assert x["chain_meta"]["owner_chain_height"] == max(stay + relics)
    assert seqs_shown(api, "yolanda") == recent[::-1]
    y = _body(api, "yolanda")
    assert y["agent_count"] == 2
    assert y["chain_meta"]["owner_chain_height"] == max(ancient + recent + yours)
    assert check_all() == 3

    with engine.begin() as conn:  # history older than both windows arrives at an empty owner
        p.transfer_agent(conn, relic, zed)
    catch_up()
    z = _body(api, "zed")
    assert [e["seq"] for e in z["recent_events"]] == relics[::-1]
    assert {e["agent_name"] for e in z["recent_events"]} == {"relic"}
    assert (z["agent_count"], z["chain_meta"]["owner_chain_height"]) == (1, max(relics))
    assert _body(api, "xavier")["chain_meta"]["owner_chain_height"] == max(stay)

    with engine.begin() as conn:  # and back: yolanda refills from ya alone
        p.transfer_agent(conn, mover, xavier)
    catch_up()
    assert seqs_shown(api, "yolanda") == yours[::-1]
    assert seqs_shown(api, "xavier") == recent[::-1]
    assert check_all() == 3


def test_transfers_interleaved_with_events_in_one_batch(engine, catch_up, api, check_all) -> None:
    with engine.begin() as conn:
        users = [p.create_user(conn, f"hop-{k}") for k in range(3)]
        hopper = p.create_agent(conn, users[0], "hopper")
        keep = [p.create_agent(conn, u, f"keep-{k}") for k, u in enumerate(users)]
        base = [_events(conn, a, T0, 3) for a in keep]
        hops = _events(conn, hopper, T0 - timedelta(days=2), 3)
    catch_up()
    with engine.begin() as conn:  # event, move, event, move, event, all in one transaction
        hops.append(p.add_event(conn, hopper, created_at=T0 + timedelta(hours=1))[1])
        p.transfer_agent(conn, hopper, users[1])
        hops.append(p.add_event(conn, hopper, created_at=T0 + timedelta(hours=2))[1])
        p.transfer_agent(conn, hopper, users[2])
        hops.append(p.add_event(conn, hopper, created_at=T0 + timedelta(hours=3))[1])
    with engine.begin() as conn:  # and a round trip in another transaction of the same batch
        p.transfer_agent(conn, hopper, users[0])
        p.transfer_agent(conn, hopper, users[2])
    catch_up()
    assert seqs_shown(api, "hop-0") == base[0][::-1]
    assert seqs_shown(api, "hop-1") == base[1][::-1]
    assert seqs_shown(api, "hop-2") == [*hops[:2:-1], *base[2][::-1], *hops[2::-1]]
    assert [_body(api, f"hop-{k}")["agent_count"] for k in range(3)] == [1, 1, 2]
    assert check_all() == 3

    with engine.begin() as conn:  # C -> B -> C in one transaction: nothing moved in the end
        p.transfer_agent(conn, hopper, users[1])
        p.transfer_agent(conn, hopper, users[2])
    catch_up()
    assert [_body(api, f"hop-{k}")["agent_count"] for k in range(3)] == [1, 1, 2]
    assert check_all() == 3


def test_agent_rename_shows_the_new_name_on_old_events(engine, catch_up, api, check_all) -> None:
    with engine.begin() as conn:
        uid = p.create_user(conn, "renamer")
        alpha = p.create_agent(conn, uid, "alpha")
        other = p.create_agent(conn, uid, "other")
        _events(conn, alpha, T0, 5)
        _events(conn, other, T0 - timedelta(hours=1), 2)
    catch_up()
    with engine.begin() as conn:
        p.rename_agent(conn, alpha, "beta")
    catch_up()
    names = [e["agent_name"] for e in _body(api, "renamer")["recent_events"]]
    assert names == ["beta"] * 5 + ["other"] * 2
    with engine.begin() as conn:  # renamed twice around a new event in one transaction
        p.rename_agent(conn, alpha, "gamma")
        p.add_event(conn, alpha, created_at=T0 + timedelta(days=1))
        p.rename_agent(conn, alpha, "delta")
    catch_up()
    names = [e["agent_name"] for e in _body(api, "renamer")["recent_events"]]
    assert names == ["delta"] * 6 + ["other"] * 2
    assert check_all() == 1


def test_handle_rename_moves_the_url(engine, catch_up, api, check_all) -> None:
    with engine.begin() as conn:
        uid = p.create_user(conn, "Original", "Orig")
        _events(conn, p.create_agent(conn, uid, "a"), T0, 2)
    catch_up()
    for url in ("Original", "original", "ORIGINAL"):
        assert _body(api, url)["handle"] == "Original"
    with engine.begin() as conn:
        p.rename_user(conn, uid, "Renamed.User")
    catch_up()
    assert answer(api, "original")[0] == 404
    for url in ("Renamed.User", "renamed.user", "RENAMED.USER"):
        body = _body(api, url)
        assert (body["handle"], body["display_name"], body["agent_count"]) == (
            "Renamed.User",
            "Orig",
            1,
        )
    with engine.begin() as conn:  # a change of case only
        p.rename_user(conn, uid, "RENAMED.user")
    catch_up()
    assert _body(api, "renamed.USER")["handle"] == "RENAMED.user"
    with engine.begin() as conn:  # the old handle is free for someone else
        newcomer = p.create_user(conn, "ORIGINAL", "New")
    catch_up()
    body = _body(api, "original")
    assert (body["handle"], body["display_name"], body["agent_count"]) == ("ORIGINAL", "New", 0)
    assert newcomer != uid
    assert check_all() == 2


def test_display_name_changes(engine, catch_up, api, check_all) -> None:
    with engine.begin() as conn:
        uid = p.create_user(conn, "named")
    catch_up()
    assert _body(api, "named")["display_name"] is None
    for name in ("First Name", "Ünïcode Näme ✓", None, ""):
        with engine.begin() as conn:
            p.set_display_name(conn, uid, name)
        catch_up()
        assert _body(api, "named")["display_name"] == name
    assert check_all() == 1


def _swap(conn, u1: int, u2: int, h1: str, h2: str) -> None:
    p.rename_user(conn, u1, "swap-temp")
    p.rename_user(conn, u2, h1)
    p.rename_user(conn, u1, h2)


def test_handle_swapped_between_two_users(engine, catch_up, api, check_all) -> None:
    with engine.begin() as conn:
        u1 = p.create_user(conn, "alice", "Alice")
        p.create_agent(conn, u1, "a1")
        u2 = p.create_user(conn, "bob", "Bob")
        p.create_agent(conn, u2, "b1")
        p.create_agent(conn, u2, "b2")
    catch_up()
    assert _body(api, "alice")["agent_count"] == 1
    with engine.begin() as conn:  # one transaction
        _swap(conn, u1, u2, "alice", "bob")
    catch_up()
    assert (_body(api, "alice")["display_name"], _body(api, "bob")["display_name"]) == (
        "Bob",
        "Alice",
    )
    assert answer(api, "swap-temp")[0] == 404
    for stmt in ((u2, "swap-temp"), (u1, "Bob"), (u2, "Alice")):  # three, one batch
        with engine.begin() as conn:
            p.rename_user(conn, *stmt)
    catch_up()
    assert (_body(api, "alice")["agent_count"], _body(api, "bob")["agent_count"]) == (2, 1)
    assert (_body(api, "ALICE")["handle"], _body(api, "BOB")["handle"]) == ("Alice", "Bob")
    with engine.begin() as conn:  # three transactions with a projection between each
        p.rename_user(conn, u1, "swap-temp")
    catch_up()
    assert (answer(api, "bob")[0], _body(api, "swap-temp")["display_name"]) == (404, "Alice")
    with engine.begin() as conn:
        p.rename_user(conn, u2, "bob")
    catch_up()
    assert (answer(api, "alice")[0], _body(api, "bob")["display_name"]) == (404, "Bob")
    with engine.begin() as conn:
        p.rename_user(conn, u1, "alice")
    catch_up()
    assert (_body(api, "alice")["display_name"], _body(api, "bob")["display_name"]) == (
        "Alice",
        "Bob",
    )
    assert answer(api, "swap-temp")[0] == 404
    assert check_all() == 2


def test_new_users_and_agents_mid_stream(engine, settings, api, check_all) -> None:
    with engine.begin() as conn:
        first = p.create_user(conn, "first")
        _events(conn, p.create_agent(conn, first, "f"), T0, 3)
    with LiveProjector(settings):
        wait_until(lambda: mismatches(engine, api), "first build")
        with engine.begin() as conn:
            late = p.create_user(conn, "latecomer", "Late")
        wait_until(lambda: answer(api, "latecomer")[0] != 200, "new user appears")
        body = _body(api, "latecomer")
        assert (body["agent_count"], body["recent_events"]) == (0, [])
        with engine.begin() as conn:
            agent = p.create_agent(conn, late, "fresh")
        wait_until(lambda: _body(api, "latecomer")["agent_count"] != 1, "new agent appears")
        with engine.begin() as conn:
            seqs = _events(conn, agent, T0, 2)
            # a user, an agent and events, all in one transaction
            whole = p.create_user(conn, "all-at-once")
            seqs_whole = _events(conn, p.create_agent(conn, whole, "w"), T0, 2)
        wait_until(lambda: mismatches(engine, api), "events of new agents")
    assert seqs_shown(api, "latecomer") == seqs[::-1]
    assert seqs_shown(api, "all-at-once") == seqs_whole[::-1]
    assert check_all() == 3


def test_delete_agent_without_events(engine, catch_up, api, check_all) -> None:
    with engine.begin() as conn:
        uid = p.create_user(conn, "pruner")
        busy = p.create_agent(conn, uid, "busy")
        idle = p.create_agent(conn, uid, "idle")
        seqs = _events(conn, busy, T0, 3)
    catch_up()
    assert _body(api, "pruner")["agent_count"] == 2
    with engine.begin() as conn:
        p.delete_agent(conn, idle)
        brief = p.create_agent(conn, uid, "brief")  # created and deleted before any projection
    with engine.begin() as conn:
        p.delete_agent(conn, brief)
        with engine.begin() as conn2:
            momentary = p.create_agent(conn2, uid, "momentary")
            p.delete_agent(conn2, momentary)
    catch_up()
    body = _body(api, "pruner")
    assert (body["agent_count"], [e["seq"] for e in body["recent_events"]]) == (1, seqs[::-1])
    assert check_all() == 1


def test_delete_user_without_agents(engine, catch_up, api, check_all) -> None:
    with engine.begin() as conn:
        leaving = p.create_user(conn, "leaving")
        staying = p.create_user(conn, "staying")
        _events(conn, p.create_agent(conn, staying, "s"), T0, 2)
    catch_up()
    assert _body(api, "leaving")["agent_count"] == 0
    with engine.begin() as conn:
        p.delete_user(conn, leaving)
        ghost = p.create_user(conn, "ghost")  # never seen by the projector alive
    with engine.begin() as conn:
        p.delete_user(conn, ghost)
    catch_up()
    assert answer(api, "leaving")[0] == 404
    assert answer(api, "ghost")[0] == 404
    with engine.begin() as conn:  # deleted, and the handle taken again in the same batch
        again = p.create_user(conn, "Leaving", "Second")
    with engine.begin() as conn:
        p.delete_user(conn, again)
        p.create_user(conn, "LEAVING", "Third")
    catch_up()
    assert _body(api, "leaving")["display_name"] == "Third"
    assert check_all() == 2


def test_user_without_agents_is_200_with_an_empty_list(engine, catch_up, api) -> None:
    with engine.begin() as conn:
        p.create_user(conn, "Lonely", "Lonely One")
        other = p.create_user(conn, "crowded")
        top = max(_events(conn, p.create_agent(conn, other, "c"), T0, 3))
    catch_up()
    body = _body(api, "lonely")
    body.pop("projection", None)
    assert body == {
        "handle": "Lonely",
        "display_name": "Lonely One",
        "agent_count": 0,
        "recent_events": [],
        "chain_meta": {
            "owner_chain_height": 0,
            "global_chain_height": top,
            "latest_event_at": None,
        },
    }


@pytest.mark.parametrize(
    "handle",
    ["-dash", ".dot", "_under", "a" * 40, "has space", "bang!", "ünï", "semi;colon", "a+b"],
)
def test_malformed_handle_is_422(engine: Engine, catch_up, api, handle: str) -> None:
    catch_up()
    assert api.get(f"/v1/users/{handle}/dashboard").status_code == 422


@pytest.mark.parametrize("handle", ["nobody", "x", "9" * 39, "No.Body_-1"])
def test_unknown_handle_is_404(engine: Engine, catch_up, api, handle: str) -> None:
    with engine.begin() as conn:
        p.create_user(conn, "somebody")
    catch_up()
    assert answer(api, handle)[0] == 404
    assert answer(api, "SomeBody")[0] == 200
