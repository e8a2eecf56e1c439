from sqlalchemy import Engine

from scripts import platform_sim as p


def test_one_user_end_to_end(engine: Engine, catch_up, api, check_all) -> None:
    with engine.begin() as conn:
        uid = p.create_user(conn, "hizrianraz", "Hizrian")
        aid = p.create_agent(conn, uid, "scout")
        for _ in range(15):
            p.add_event(conn, aid)
    catch_up()
    body = api.get("/v1/users/HizrianRaz/dashboard").json()
    assert len(body["recent_events"]) == 12
    assert body["agent_count"] == 1
    assert check_all() == 1
