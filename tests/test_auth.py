"""Issue 4, hostile input: optional owner-scoped access with a Bearer JWT (api/auth.py).

Tokens are minted here with PyJWT from keys made here; answers are checked against the seed SQL
(tests/oracle.py), and refusals by their status, their JSON body and their challenge header.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy import Engine

from api.main import create_app
from models.settings import ProjectorSettings, RedisSettings
from scripts import platform_sim as p
from scripts.throwaway import free_port
from tests.oracle import expected, normalise
from tests.procs import ProcGroup

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cret-for-tests-only-0123456789abcdef"  # 38 bytes: enough for HS256
OPERATOR = "dashboards:read-all"
PATH = "/v1/users/{}/dashboard"

# The README's one-liner, run as written (with the key in the environment) by a test below.
MINT_ONE_LINER = (
    'python -c \'import jwt, os, sys, time; print(jwt.encode({"sub": sys.argv[1],'
    ' "exp": int(time.time()) + 3600}, os.environ["DASHBOARD_JWT_KEY"], algorithm="HS256"))\''
    " hizrianraz"
)


def mint(claims: dict[str, Any], key: Any = SECRET, algorithm: str = "HS256", **headers) -> str:
    body = {"exp": int(time.time()) + 600, **claims}
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key, algorithm=algorithm, headers=headers or None)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unsigned(claims: dict[str, Any]) -> str:
    """An ``alg: none`` token, built by hand as an attacker would."""
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = _b64(json.dumps({"exp": int(time.time()) + 600, **claims}).encode())
    return f"{header}.{payload}."


def assert_refused(response: httpx.Response, status: int, error: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert isinstance(response.json()["detail"], str)
    challenge = response.headers.get("www-authenticate", "")
    if status == 401:
        assert challenge.startswith('Bearer realm="dashboards"'), challenge
        if error is None:
            assert "error=" not in challenge
        else:
            assert f'error="{error}"' in challenge, challenge


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[rsa.RSAPrivateKey, str]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public_pem


@pytest.fixture
def client_for(rclient, settings: ProjectorSettings) -> Iterator[Callable[..., TestClient]]:
    """A started API with the given JWT settings, on the test's Redis."""
    opened: list[TestClient] = []

    def make(**conf: Any) -> TestClient:
        conf.setdefault("redis_url", settings.redis_url)
        client = TestClient(create_app(RedisSettings(**conf)))
        client.__enter__()
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)


@pytest.fixture
def world(engine: Engine, catch_up) -> dict[str, int]:
    with engine.begin() as conn:
        alice = p.create_user(conn, "Alice", "Alice A.")
        bob = p.create_user(conn, "bob", None)
        for owner in (alice, bob):
            agent = p.create_agent(conn, owner, f"agent-of-{owner}")
            for _ in range(3):
                p.add_event(conn, agent)
    catch_up()
    return {"alice": alice, "bob": bob}


def assert_dashboard(engine: Engine, response: httpx.Response, user_id: int) -> None:
    assert response.status_code == 200, response.text
    with engine.connect() as conn:
        assert normalise(response.json()) == expected(conn, user_id)


# --- settings --------------------------------------------------------------------------------


def test_off_by_default_and_configured_from_the_environment(monkeypatch, rsa_keys) -> None:
    for name in list(os.environ):
        if name.upper().startswith("DASHBOARD_JWT_"):
            monkeypatch.delenv(name)
    assert not RedisSettings().jwt_enabled
    monkeypatch.setenv("DASHBOARD_JWT_KEY", "")
    assert not RedisSettings().jwt_enabled  # an empty value leaves it off

    _, public_pem = rsa_keys
    one_line = public_pem.strip().replace("\n", "\\n")  # how a one-line env file holds a PEM
    monkeypatch.setenv("DASHBOARD_JWT_KEY", one_line)
    monkeypatch.setenv("DASHBOARD_JWT_ALGORITHMS", "RS256, PS256")
    monkeypatch.setenv("DASHBOARD_JWT_AUDIENCE", "dashboards")
    monkeypatch.setenv("DASHBOARD_JWT_ISSUER", "")
    monkeypatch.setenv("DASHBOARD_JWT_LEEWAY_SECONDS", "5")
    conf = RedisSettings()
    assert conf.jwt_enabled
    assert conf.dashboard_jwt_key is not None
    assert conf.dashboard_jwt_key.get_secret_value().strip() == public_pem.strip()
    assert conf.dashboard_jwt_algorithms == ["RS256", "PS256"]
    assert conf.dashboard_jwt_audience == "dashboards"
    assert conf.dashboard_jwt_issuer is None
    assert conf.dashboard_jwt_leeway_seconds == 5
    assert conf.dashboard_jwt_operator_scope == OPERATOR
    assert SECRET not in repr(conf) and "BEGIN PUBLIC KEY" not in repr(conf)

    monkeypatch.setenv("DASHBOARD_JWT_ALGORITHMS", '["PS512"]')
    assert RedisSettings().dashboard_jwt_algorithms == ["PS512"]


@pytest.mark.parametrize(
    ("conf", "says"),
    [
        ({"dashboard_jwt_key": "short"}, "at least 32 bytes"),
        ({"dashboard_jwt_key": SECRET, "dashboard_jwt_algorithms": "HS256,HS512"}, "at least 64"),
        ({"dashboard_jwt_key": SECRET, "dashboard_jwt_algorithms": "none"}, "none"),
        ({"dashboard_jwt_key": SECRET, "dashboard_jwt_algorithms": "HS256,RS256"}, "mix"),
        ({"dashboard_jwt_key": SECRET, "dashboard_jwt_algorithms": "XS999"}, "unknown"),
        ({"dashboard_jwt_key": SECRET, "dashboard_jwt_algorithms": ""}, "at least one"),
        ({"dashboard_jwt_key": SECRET, "dashboard_jwt_algorithms": "[RS256"}, "JSON list"),
        ({"dashboard_jwt_key": "not a pem", "dashboard_jwt_algorithms": "RS256"}, "public key"),
        ({"dashboard_jwt_key": SECRET, "dashboard_jwt_operator_scope": "a b"}, "one scope"),
        ({"dashboard_jwt_key": SECRET, "dashboard_jwt_leeway_seconds": -1}, "greater than"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_error(conf: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        RedisSettings(**conf)


def test_key_material_that_does_not_fit_is_refused(rsa_keys) -> None:
    private, public_pem = rsa_keys
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    with pytest.raises(ValidationError, match="private key"):
        RedisSettings(dashboard_jwt_key=private_pem, dashboard_jwt_algorithms="RS256")
    # A public key as an HMAC secret would let anyone holding it sign tokens.
    with pytest.raises(ValidationError, match="looks like a public key"):
        RedisSettings(dashboard_jwt_key=public_pem, dashboard_jwt_algorithms="HS256")
    with pytest.raises(ValidationError, match="ES256"):
        RedisSettings(dashboard_jwt_key=public_pem, dashboard_jwt_algorithms="ES256")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    small_pem = small.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    with pytest.raises(ValidationError, match="1024 bits"):
        RedisSettings(dashboard_jwt_key=small_pem, dashboard_jwt_algorithms="RS256")


# --- off --------------------------------------------------------------------------------------


def test_off_serves_everyone_and_documents_no_security(engine, world, client_for) -> None:
    api = client_for()
    assert_dashboard(engine, api.get(PATH.format("alice")), world["alice"])
    # With access control off, an Authorization header of any kind changes nothing.
    for header in ("Bearer garbage", "Basic YTpi", unsigned({"sub": "bob"})):
        response = api.get(PATH.format("alice"), headers={"Authorization": header})
        assert_dashboard(engine, response, world["alice"])
    spec = api.get("/openapi.json").json()
    assert "securitySchemes" not in spec.get("components", {})
    assert "security" not in spec["paths"]["/v1/users/{handle}/dashboard"]["get"]


# --- on: HS256 --------------------------------------------------------------------------------


def test_owner_reads_own_dashboard_case_insensitively(engine, world, client_for) -> None:
    api = client_for(dashboard_jwt_key=SECRET)
    for sub, asked in [("alice", "alice"), ("ALICE", "Alice"), ("Alice", "aLiCe"), ("bob", "BOB")]:
        response = api.get(PATH.format(asked), headers=bearer(mint({"sub": sub})))
        assert_dashboard(engine, response, world[asked.lower()])
    # The scheme name is case-insensitive (RFC 7235), the token is not.
    response = api.get(
        PATH.format("bob"), headers={"Authorization": f"bearer {mint({'sub': 'bob'})}"}
    )
    assert_dashboard(engine, response, world["bob"])


def test_another_users_token_is_403(world, client_for) -> None:
    api = client_for(dashboard_jwt_key=SECRET)
    for claims in [
        {"sub": "bob"},
        {"sub": "alice2"},
        {"sub": "alic"},
        {"sub": "alice\n"},
        {"sub": "\uff41lice"},  # fullwidth a: no handle, whatever lower() makes of it
        {"sub": "bob", "scope": f"{OPERATOR}-lite read"},  # scopes match whole, not by prefix
        {"sub": "bob", "scp": [f"x{OPERATOR}"]},
        {"sub": "bob", "scope": ["not", "a", "string"]},
    ]:
        response = api.get(PATH.format("alice"), headers=bearer(mint(claims)))
        assert_refused(response, 403)
        assert "insufficient_scope" in response.headers["www-authenticate"]


def test_operator_scope_reads_any_dashboard(engine, world, client_for) -> None:
    api = client_for(dashboard_jwt_key=SECRET)
    tokens = [
        mint({"sub": "ops-robot", "scope": f"openid {OPERATOR} profile"}),
        mint({"sub": "ops-robot", "scp": ["other", OPERATOR]}),
        mint({"sub": "ops-robot", "scp": OPERATOR}),
    ]
    for token in tokens:
        for handle, uid in world.items():
            assert_dashboard(engine, api.get(PATH.format(handle), headers=bearer(token)), uid)
        assert api.get(PATH.format("nobody"), headers=bearer(token)).status_code == 404
    # A custom operator scope replaces the default one.
    custom = client_for(dashboard_jwt_key=SECRET, dashboard_jwt_operator_scope="support")
    response = custom.get(PATH.format("bob"), headers=bearer(tokens[0]))
    assert_refused(response, 403)
    token = mint({"sub": "helpdesk", "scope": "support"})
    assert_dashboard(engine, custom.get(PATH.format("bob"), headers=bearer(token)), world["bob"])


def test_missing_and_malformed_headers_are_401(world, client_for) -> None:
    api = client_for(dashboard_jwt_key=SECRET)
    assert_refused(api.get(PATH.format("alice")), 401, error=None)
    good = mint({"sub": "alice"})
    for header in [
        "",
        "Bearer",
        "Bearer ",
        f"Basic {good}",
        f"Token {good}",
        f"Bearer {good} extra",
        f"Bearer{good}",
        good,
    ]:
        response = api.get(PATH.format("alice"), headers={"Authorization": header})
        assert_refused(response, 401, error="invalid_request")


def test_bad_tokens_are_401(world, client_for, rsa_keys) -> None:
    api = client_for(dashboard_jwt_key=SECRET)
    private, _ = rsa_keys
    now = int(time.time())
    bad = {
        "expired": mint({"sub": "alice", "exp": now - 600}),
        "not yet valid": mint({"sub": "alice", "nbf": now + 600}),
        "wrongly signed": mint({"sub": "alice"}, key=SECRET[::-1]),
        "alg none": unsigned({"sub": "alice"}),
        "alg none, operator": unsigned({"sub": "ops", "scope": OPERATOR}),
        "RS256 not configured": mint({"sub": "alice"}, key=private, algorithm="RS256"),
        "HS512 not configured": mint({"sub": "alice"}, key=SECRET * 2, algorithm="HS512"),
        "no exp": mint({"sub": "alice", "exp": None}),
        "no sub": mint({"scope": OPERATOR}),
        "sub not a string": mint({"sub": 42}),
        "aud not configured": mint({"sub": "alice", "aud": "elsewhere"}),
        "garbage": "not.a.token",
        "two parts": "abc.def",
        "too long": mint({"sub": "alice", "pad": "x" * 9000}),
        "tampered payload": _tamper(mint({"sub": "bob"}), {"sub": "alice"}),
    }
    for name, token in bad.items():
        response = api.get(PATH.format("alice"), headers=bearer(token))
        assert_refused(response, 401, error="invalid_token")
        assert token not in response.text, name  # nothing of the token is echoed


def _tamper(token: str, claims: dict[str, Any]) -> str:
    header, _, signature = token.split(".")
    payload = _b64(json.dumps({"exp": int(time.time()) + 600, **claims}).encode())
    return f"{header}.{payload}.{signature}"


def test_audience_issuer_and_leeway(engine, world, client_for) -> None:
    api = client_for(
        dashboard_jwt_key=SECRET,
        dashboard_jwt_audience="dashboards",
        dashboard_jwt_issuer="https://id.example",
    )
    right = {"sub": "alice", "aud": "dashboards", "iss": "https://id.example"}
    response = api.get(PATH.format("alice"), headers=bearer(mint(right)))
    assert_dashboard(engine, response, world["alice"])
    for wrong in [
        {**right, "aud": "other"},
        {**right, "iss": "https://evil.example"},
        {k: v for k, v in right.items() if k != "aud"},
        {k: v for k, v in right.items() if k != "iss"},
    ]:
        response = api.get(PATH.format("alice"), headers=bearer(mint(wrong)))
        assert_refused(response, 401, error="invalid_token")

    lenient = client_for(dashboard_jwt_key=SECRET, dashboard_jwt_leeway_seconds=3600)
    recently_expired = mint({"sub": "alice", "exp": int(time.time()) - 600})
    response = lenient.get(PATH.format("alice"), headers=bearer(recently_expired))
    assert_dashboard(engine, response, world["alice"])


def test_refusals_come_before_redis_and_answers_after(world, client_for, rclient) -> None:
    """Verified without asking Redis: with no read model, or no Redis at all, a bad token is
    still 401 and a foreign one 403, while a good one gets the usual 503."""
    dead = client_for(dashboard_jwt_key=SECRET, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    rclient.flushall()
    empty = client_for(dashboard_jwt_key=SECRET)
    for api in (dead, empty):
        assert_refused(api.get(PATH.format("alice")), 401)
        assert_refused(api.get(PATH.format("alice"), headers=bearer(mint({"sub": "bob"}))), 403)
        response = api.get(PATH.format("alice"), headers=bearer(mint({"sub": "alice"})))
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"]


def test_malformed_handle_is_still_422_for_an_authenticated_caller(world, client_for) -> None:
    api = client_for(dashboard_jwt_key=SECRET)
    for handle in ["-alice", "a" * 40, "al ice"]:
        response = api.get(PATH.format(handle), headers=bearer(mint({"sub": "alice"})))
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/json"


# --- on: public keys --------------------------------------------------------------------------


def test_rs256_public_key(engine, world, client_for, rsa_keys) -> None:
    private, public_pem = rsa_keys
    api = client_for(dashboard_jwt_key=public_pem, dashboard_jwt_algorithms='["RS256","PS256"]')
    for algorithm in ("RS256", "PS256"):
        token = mint({"sub": "bob"}, key=private, algorithm=algorithm)
        assert_dashboard(engine, api.get(PATH.format("bob"), headers=bearer(token)), world["bob"])
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for token in [
        mint({"sub": "bob"}, key=stranger, algorithm="RS256"),
        # Key confusion: HS256 with the public key's PEM as the secret.
        _hs256_with_raw_secret({"sub": "bob"}, public_pem.encode()),
        mint({"sub": "bob"}, key=private, algorithm="RS512"),
        unsigned({"sub": "bob"}),
    ]:
        response = api.get(PATH.format("bob"), headers=bearer(token))
        assert_refused(response, 401, error="invalid_token")


def _hs256_with_raw_secret(claims: dict[str, Any], secret: bytes) -> str:
    """HS256 by hand: PyJWT itself refuses to use a PEM as an HMAC secret."""
    import hashlib
    import hmac

    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps({"exp": int(time.time()) + 600, **claims}).encode())
    signing_input = f"{header}.{payload}".encode()
    return f"{header}.{payload}.{_b64(hmac.new(secret, signing_input, hashlib.sha256).digest())}"


def test_es256_public_key(engine, world, client_for) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    api = client_for(dashboard_jwt_key=public_pem, dashboard_jwt_algorithms="ES256")
    token = mint({"sub": "alice"}, key=private, algorithm="ES256")
    assert_dashboard(engine, api.get(PATH.format("alice"), headers=bearer(token)), world["alice"])
    forged = mint({"sub": "alice"}, key=ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    assert_refused(api.get(PATH.format("alice"), headers=bearer(forged)), 401, "invalid_token")


# --- documentation ----------------------------------------------------------------------------


def test_openapi_documents_the_bearer_scheme_when_on(client_for) -> None:
    api = client_for(dashboard_jwt_key=SECRET)
    spec = api.get("/openapi.json").json()
    scheme = spec["components"]["securitySchemes"]["DashboardJWT"]
    assert scheme["type"] == "http" and scheme["scheme"].lower() == "bearer"
    operation = spec["paths"]["/v1/users/{handle}/dashboard"]["get"]
    assert operation["security"] == [{"DashboardJWT": []}]
    assert {"401", "403"} <= set(operation["responses"])
    assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]


def test_readme_one_liner_mints_a_token_the_api_accepts(engine, world, client_for) -> None:
    readme = (ROOT / "README.md").read_text()
    assert MINT_ONE_LINER in readme
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "DASHBOARD_JWT_KEY": SECRET, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    token = subprocess.run(
        ["sh", "-c", MINT_ONE_LINER], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    api = client_for(dashboard_jwt_key=SECRET)
    response = api.get(PATH.format("hizrianraz"), headers=bearer(token))
    assert response.status_code == 404  # valid for that handle; no such user in this world
    response = api.get(PATH.format("alice"), headers=bearer(token))
    assert_refused(response, 403)


def test_uvicorn_reads_the_settings_from_the_environment(engine, world, settings, tmp_path) -> None:
    group = ProcGroup(tmp_path, settings.database_url, settings.redis_url)
    group.env["DASHBOARD_JWT_KEY"] = SECRET
    try:
        proc = group.api()
        with httpx.Client(base_url=proc.base_url, timeout=10) as http:
            assert_refused(http.get(PATH.format("alice")), 401)
            response = http.get(PATH.format("alice"), headers=bearer("x.y.z"))
            assert_refused(response, 401, "invalid_token")
            response = http.get(PATH.format("alice"), headers=bearer(mint({"sub": "alice"})))
            assert_dashboard(engine, response, world["alice"])
    finally:
        group.stop_all()


# --- fuzz -------------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
_claim_names = ["sub", "exp", "nbf", "iat", "aud", "iss", "jti", "scope", "scp"]
_header_names = ["alg", "typ", "kid", "crit", "b64", "jku", "x5u", "cty"]


def _signed(header: Any, claims: Any, secret: bytes) -> str:
    """Any JSON as header and claims, HS256-signed with the API's own secret by hand."""
    import hashlib
    import hmac

    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def test_tokens_of_any_shape_are_answered_401_403_or_served(client_for, rclient) -> None:
    """Correctly signed tokens with arbitrary headers and claims (wrong types, nesting, odd
    algorithms), unsigned ones and random strings: never a 500, always a JSON answer."""
    rclient.flushall()
    api = client_for(dashboard_jwt_key=SECRET)
    good_exp = int(time.time()) + 600
    header = st.fixed_dictionaries(
        {}, optional={n: _json | st.sampled_from(["HS256", "none", "RS256"]) for n in _header_names}
    )
    claims = st.fixed_dictionaries(
        {},
        optional={n: _json | st.sampled_from(["alice", good_exp, OPERATOR]) for n in _claim_names},
    )
    tokens = st.one_of(
        st.builds(_signed, header | _json, claims | _json, st.just(SECRET.encode())),
        st.builds(_signed, header, claims, st.binary(min_size=32, max_size=40)),
        st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=60),
    )

    @hsettings(max_examples=300, deadline=None, database=None, derandomize=True)
    @given(token=tokens)
    def one(token: str) -> None:
        response = api.get(PATH.format("alice"), headers=bearer(token))
        assert response.status_code in (401, 403, 503), response.text
        assert response.headers["content-type"] == "application/json"
        assert isinstance(response.json()["detail"], str)

    one()
