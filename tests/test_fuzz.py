"""Fuzz targets (hypothesis) for what faces the network: the proxy's start-up and
authentication handling (against a real proxy, and its parsers in-process) and the API's
request parsing (against the real API). Every example is bounded; the properties: only
the documented errors, never a crash, a hang or a 5xx, and real clients keep working.

Longer runs: FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py
"""

from __future__ import annotations

import json
import os
import socket
import struct

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbplane import pgwire as wire
from dbplane.errors import InvalidInput
from dbplane.security import dbtoken, policy, signing
from dbplane.security.scram import ScramAuthFailed, ScramError, ServerExchange, parse_verifier, verifier

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
LIVE = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PURE = settings(max_examples=EXAMPLES * 4, deadline=None)
DB = "fuzz-db"

int32 = st.integers(min_value=-(2 ** 31), max_value=2 ** 31 - 1)
startup_codes = st.sampled_from([wire.PROTOCOL_3_0, wire.SSL_REQUEST, wire.CANCEL_REQUEST,
                                 wire.GSSENC_REQUEST, 196608 + 2, 1234]) | int32
params = st.dictionaries(st.sampled_from(["user", "database", "options", "application_name",
                                          "replication", "client_encoding"]) | st.text(max_size=10),
                         st.text(max_size=40), max_size=6)


# -- in-process parsers --------------------------------------------------------------------------

@PURE
@given(st.binary(max_size=300))
def test_startup_params_parse_or_refuse(body):
    try:
        assert isinstance(wire.parse_startup_params(body), dict)
    except wire.ProtocolViolation:
        pass


@PURE
@given(st.text(max_size=200))
def test_startup_options_parse_or_refuse(text):
    try:
        assert isinstance(wire.parse_options(text), dict)
    except ValueError:
        pass


@PURE
@given(st.binary(max_size=200), st.binary(max_size=200))
def test_scram_server_refuses_garbage(first, final):
    exchange = ServerExchange(parse_verifier(verifier("secret")), "app")
    try:
        exchange.first(first)
        exchange.final(final)
        pytest.fail("a random proof was accepted")
    except (ScramError, ScramAuthFailed):
        pass


@PURE
@given(st.text(max_size=300) | st.builds(lambda b: "dbpt1." + b, st.text(max_size=200)))
def test_tokens_refuse_garbage(token):
    try:
        dbtoken.verify(token, "secret", "db", "app")
        pytest.fail("a random token was accepted")
    except dbtoken.TokenError:
        pass


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=12), children, max_size=4), max_leaves=12)
statements = st.fixed_dictionaries({}, optional={
    "Effect": st.sampled_from(["Allow", "Deny", "allow", ""]) | json_values,
    "Action": st.sampled_from(["*", "db:*", "db:Connect", "db:Nope", "x"]) | json_values,
    "Resource": st.sampled_from(["*", "db/x"]) | json_values,
    "Condition": json_values | st.just({"IpAddress": {"dbplane:SourceIp": "10.0.0.0/8"}}),
    "Sid": json_values})


@PURE
@given(st.fixed_dictionaries({}, optional={"Version": st.just(policy.VERSION) | json_values,
                                           "Statement": statements | st.lists(statements, max_size=3)
                                           | json_values}) | json_values)
def test_policies_parse_or_refuse(document):
    try:
        parsed = policy.parse("p", json.dumps(document))
    except InvalidInput as e:
        assert e.code == "malformed_policy" and e.message
        return
    policy.evaluate([parsed], policy.Request(action="db:Connect", resource="db/x"))


@PURE
@given(st.text(max_size=200))
def test_authorization_headers_parse_or_refuse(header):
    try:
        signing.parse_authorization(header)
    except signing.SignatureError:
        pass


# -- a real proxy --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def endpoint(platform):
    platform.create(DB, "--no-multi-az", "--param", "require_tls=off")   # fuzz the login too
    host, port = platform.describe(DB)["endpoints"]["writer"].rsplit(":", 1)
    yield host, int(port)
    platform.delete_all(DB)


def _send(address, payload: bytes) -> bytes:
    """Send, half-close, read what the proxy answers (bounded)."""
    with socket.create_connection(address, timeout=2) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while len(out) < 65536:
                chunk = s.recv(4096)
                if not chunk:
                    break
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def _answers_sanely(reply: bytes) -> None:
    """Nothing, a one-byte SSL/GSS answer, or PostgreSQL messages (never a Python trace)."""
    assert b"Traceback" not in reply
    if reply and reply[:1] not in b"NS":
        assert reply[:1] in b"ERE", reply[:40]          # ErrorResponse or an authentication request


def _still_serves(platform):
    with platform.connect(DB, connect_timeout=10) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


@LIVE
@given(st.binary(max_size=600))
def test_proxy_survives_random_bytes(platform, endpoint, payload):
    _answers_sanely(_send(endpoint, payload))


@LIVE
@given(st.integers(min_value=0, max_value=20000), startup_codes, st.binary(max_size=400))
def test_proxy_survives_bad_startup_packets(platform, endpoint, length, code, body):
    _answers_sanely(_send(endpoint, struct.pack("!ii", length, code) + body))


@LIVE
@given(params, st.lists(st.tuples(st.sampled_from(b"pQPBEXSd"), st.binary(max_size=120)), max_size=4))
def test_proxy_survives_bad_logins(platform, endpoint, startup, messages):
    startup = {"user": "fuzz", **startup}
    packet = wire.startup_message({k.replace("\0", ""): v.replace("\0", "") for k, v in startup.items()})
    rest = b"".join(wire.message(bytes([kind]), body) for kind, body in messages)
    _answers_sanely(_send(endpoint, packet + rest))


def test_the_proxy_still_serves_after_the_fuzzing(platform, endpoint):
    _still_serves(platform)
    with pytest.raises(psycopg.OperationalError):       # and still checks passwords
        host, port = endpoint
        psycopg.connect(host=host, port=port, user=platform.describe(DB)["admin_user"],
                        password="wrong", dbname="postgres", sslmode="disable", connect_timeout=5)


# -- the real API --------------------------------------------------------------------------------

@LIVE
@given(json_values | st.fixed_dictionaries({"name": st.text(max_size=50)},
                                           optional={"class": json_values, "replicas": json_values,
                                                     "params": json_values, "multi_az": json_values}))
def test_api_refuses_bad_create_bodies(platform, body):
    if isinstance(body, dict) and isinstance(body.get("name"), str):
        body["class"] = "fuzz-no-such-class"     # whatever else, nothing gets created
    r = platform.api.post("/v1/databases", json=body)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["code"]


@LIVE
@given(st.binary(max_size=300), st.sampled_from(["application/json", "text/plain", ""]))
def test_api_refuses_bodies_that_are_not_json(platform, body, content_type):
    r = platform.api.post("/v1/iam/simulate", content=body, headers={"content-type": content_type})
    assert 400 <= r.status_code < 500, r.text


@LIVE
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60))
def test_api_refuses_strange_names_in_paths(platform, name):
    from urllib.parse import quote
    # a name that decodes to "/" makes the path end in a slash: a redirect is a fine answer
    r = platform.api.get(f"/v1/databases/{quote(name, safe='')}")
    assert r.status_code in (307, 400, 404, 405), r.text
    r = platform.api.post(f"/v1/iam/users/{quote(name, safe='')}/access-keys")
    assert 300 <= r.status_code < 500, r.text


@LIVE
@given(st.fixed_dictionaries({"Version": st.just(policy.VERSION),
                              "Statement": st.lists(statements, max_size=3)}))
def test_api_policy_documents(platform, document):
    r = platform.api.post("/v1/iam/policies", json={"name": "fuzzpol", "document": json.dumps(document)})
    assert r.status_code in (201, 400), r.text
    if r.status_code == 201:
        assert platform.api.delete("/v1/iam/policies/fuzzpol").status_code == 200
