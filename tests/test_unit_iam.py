"""Policy evaluation, request signing and the route table, without a platform."""

from __future__ import annotations

import asyncio
import datetime

import httpx
import pytest

from dbplane.errors import InvalidInput
from dbplane.httpapi.app import create_app
from dbplane.httpapi.auth import PUBLIC, ROUTES, SESSION_TOKEN, WHOAMI
from dbplane.security import policy, session_token, signing
from dbplane.security.credentials import read_profile, resolve, write_profile

V = policy.VERSION


def P(*statements, name="p"):
    return policy.parse(name, {"Version": V, "Statement": list(statements)})


def req(action, resource, **kw):
    return policy.Request(action=action, resource=resource, **kw)


def test_default_deny_allow_and_explicit_deny_wins():
    allow = P({"Effect": "Allow", "Action": "db:*", "Resource": "db/orders*"})
    deny = P({"Sid": "NoDelete", "Effect": "Deny", "Action": "db:DeleteDatabase", "Resource": "*"},
             name="guard")
    assert not policy.evaluate([], req("db:DescribeDatabases", "db/orders")).allowed
    assert policy.evaluate([allow], req("db:DeleteDatabase", "db/orders")).allowed
    assert not policy.evaluate([allow], req("db:DescribeDatabases", "db/billing")).allowed
    d = policy.evaluate([allow, deny], req("db:DeleteDatabase", "db/orders-eu"))
    assert not d.allowed and d.reason == "explicitly denied by policy guard statement NoDelete"
    assert policy.evaluate([allow, deny], req("db:ModifyDatabase", "db/orders")).allowed


def test_actions_match_case_insensitively_and_resources_exactly():
    p = P({"Effect": "Allow", "Action": "DB:describe*", "Resource": "db/Orders"})
    assert policy.evaluate([p], req("db:DescribeDatabases", "db/Orders")).allowed
    assert not policy.evaluate([p], req("db:DescribeDatabases", "db/orders")).allowed


def test_conditions():
    p = P({"Effect": "Allow", "Action": "*", "Resource": "*", "Condition": {
        "IpAddress": {"dbplane:SourceIp": ["10.0.0.0/8", "::1/128"]},
        "DateLessThan": {"dbplane:CurrentTime": "2030-01-01T00:00:00Z"}}})
    early = datetime.datetime(2029, 1, 1, tzinfo=datetime.UTC)
    late = datetime.datetime(2031, 1, 1, tzinfo=datetime.UTC)
    assert policy.evaluate([p], req("db:Connect", "db/x", source_ip="10.1.2.3", now=early)).allowed
    assert policy.evaluate([p], req("db:Connect", "db/x", source_ip="::1", now=early)).allowed
    assert not policy.evaluate([p], req("db:Connect", "db/x", source_ip="192.168.1.1", now=early)).allowed
    assert not policy.evaluate([p], req("db:Connect", "db/x", source_ip="10.1.2.3", now=late)).allowed
    assert not policy.evaluate([p], req("db:Connect", "db/x", source_ip="garbage", now=early)).allowed
    tls = P({"Effect": "Deny", "Action": "*", "Resource": "*",
             "Condition": {"Bool": {"dbplane:SecureTransport": "false"}}},
            {"Effect": "Allow", "Action": "*", "Resource": "*"})
    assert not policy.evaluate([tls], req("db:Connect", "db/x")).allowed
    assert policy.evaluate([tls], req("db:Connect", "db/x", secure_transport=True)).allowed
    user = P({"Effect": "Allow", "Action": "db:Connect", "Resource": "dbuser/orders/*",
              "Condition": {"StringLike": {"dbplane:DatabaseUser": "app_*"}}})
    assert policy.evaluate([user], req("db:Connect", "dbuser/orders/app_ro", database_user="app_ro")).allowed
    assert not policy.evaluate([user], req("db:Connect", "dbuser/orders/postgres",
                                           database_user="postgres")).allowed


@pytest.mark.parametrize("document, fragment", [
    ("[]", "must be a JSON object"),
    ('{"Version": "2012-10-17"}', "has no Statement"),
    ('{"Version": "2012-10-17", "Statement": {"Effect": "Allow", "Action": "db:Nope", "Resource": "*"}}',
     "matches no dbplane action"),
    ('{"Version": "2012-10-17", "Statement": {"Effect": "Allow", "Action": "Connect", "Resource": "*"}}',
     "has no service prefix"),
    ('{"Version": "2012-10-17", "Statement": {"Effect": "Allow", "Action": "*"}}',
     "needs both Action and Resource"),
    ('{"Version": "2012-10-17", "Statement": {"Effect": "Allow", "Action": "*", "Resource": [], "Sid": "x"}}',
     "Resource must be a non-empty"),
    ('{"Version": "2012-10-17", "Statement": {"Effect": "Allow", "NotAction": "*", "Resource": "*"}}',
     "unsupported element 'NotAction'"),
    ('{"Version": "2012-10-17", "Statement": {"Effect": "Allow", "Action": "*", "Resource": "*", '
     '"Condition": {"IpAddress": {"dbplane:CurrentTime": "x"}}}}', "cannot test dbplane:CurrentTime"),
    ('{"Version": "2012-10-17", "Statement": {"Effect": "Allow", "Action": "*", "Resource": "*", '
     '"Condition": {"NumericLessThan": {"dbplane:SourceIp": "1"}}}}', "unknown condition operator"),
    ("{" + '"a": "' + "x" * 7000 + '"}', "the limit is 6144"),
])
def test_malformed_documents_name_the_problem(document, fragment):
    with pytest.raises(InvalidInput) as e:
        policy.parse("p", document)
    assert fragment in e.value.message and e.value.code == "malformed_policy"


def test_broad_policies_are_recognised():
    assert policy.is_broad(policy.parse("a", policy.BUILTIN["AdministratorAccess"]))
    assert not policy.is_broad(policy.parse("r", policy.BUILTIN["ReadOnlyAccess"]))


def test_signatures_bind_method_path_query_host_body_and_time():
    now = datetime.datetime(2026, 11, 24, 6, 35, tzinfo=datetime.UTC)
    h = signing.sign("DPAKX", "secret", "POST", "/v1/databases", "b=2&a=1", "127.0.0.1:24002", b"{}", now=now)
    key_id, sig = signing.parse_authorization(h["Authorization"])
    args = dict(method="POST", path="/v1/databases", query="a=1&b=2", host="127.0.0.1:24002",
                date=h[signing.DATE_HEADER], nonce=h[signing.NONCE_HEADER],
                content_sha256=h[signing.BODY_HEADER], body=b"{}")
    signing.verify("secret", sig, **args)                       # query order does not matter
    for change in ({"method": "PUT"}, {"path": "/v1/hosts"}, {"query": "a=1"}, {"host": "evil:1"},
                   {"nonce": "0" * 32}, {"date": "20261124T063501Z"}):
        with pytest.raises(signing.SignatureError):
            signing.verify("secret", sig, **{**args, **change})
    with pytest.raises(signing.SignatureError, match="body does not match"):
        signing.verify("secret", sig, **{**args, "body": b"{ }"})
    with pytest.raises(signing.SignatureError, match="wrong secret"):
        signing.verify("other", sig, **args)
    signing.check_date(h[signing.DATE_HEADER], now=now + datetime.timedelta(seconds=299))
    with pytest.raises(signing.SignatureError) as e:
        signing.check_date(h[signing.DATE_HEADER], now=now + datetime.timedelta(seconds=301))
    assert e.value.code == "request_expired"


def test_nonces_are_remembered_and_bounded():
    cache = signing.NonceCache(window=10, limit=4)
    assert cache.check_and_add("k", "n1", 0) and not cache.check_and_add("k", "n1", 1)
    assert cache.check_and_add("other", "n1", 1)
    for i in range(10):                                          # a flood never grows it past the limit
        cache.check_and_add("k", f"x{i}", 20 + i)
    assert len(cache._seen) <= 4


def test_every_route_has_an_action():
    app = create_app("http://127.0.0.1:1")
    missing = []
    for route in app.routes:
        for method in getattr(route, "methods", None) or []:
            if method in ("HEAD", "OPTIONS") or route.path in PUBLIC or route.path in (WHOAMI, SESSION_TOKEN):
                continue
            if (method, route.path) not in ROUTES:
                missing.append(f"{method} {route.path}")
    assert not missing, f"routes without an action in httpapi/auth.py ROUTES: {missing}"
    for action, _ in ROUTES.values():
        assert action.replace("{Kind}", "User") in policy.ALL_ACTIONS, action


def test_credentials_profiles(tmp_path, monkeypatch):
    shared, root = tmp_path / "home" / "credentials", tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("DBPLANE_SHARED_CREDENTIALS_FILE", str(shared))
    for var in ("DBPLANE_ACCESS_KEY_ID", "DBPLANE_SECRET_ACCESS_KEY", "DBPLANE_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    assert resolve(root) is None
    write_profile(root / "credentials", "default", "DPAKROOT", "s1")
    write_profile(shared, "default", "DPAKHOME", "s2")
    write_profile(shared, "app", "DPAKAPP", "s3")
    assert oct(shared.stat().st_mode & 0o777) == "0o600"
    assert resolve(root).key_id == "DPAKROOT"                   # the platform's own admin first
    assert resolve(root, "app").key_id == "DPAKAPP"
    assert read_profile(shared, "default").key_id == "DPAKHOME"   # other profiles kept
    monkeypatch.setenv("DBPLANE_ACCESS_KEY_ID", "DPAKENV")
    monkeypatch.setenv("DBPLANE_SECRET_ACCESS_KEY", "s4")
    assert resolve(root, "app").key_id == "DPAKENV"
    assert "s4" not in repr(resolve(root))
    monkeypatch.delenv("DBPLANE_ACCESS_KEY_ID")
    with pytest.raises(InvalidInput, match="no profile nope"):
        resolve(root, "nope")


def test_session_tokens_verify_expire_and_resist_forgery():
    token, expires = session_token.issue("DPAKX", "user/tina", "secret-1", 900, now=1000.0)
    assert expires == 1900
    claims = session_token.verify(token, "secret-1", now=1899.0)
    assert (claims.key_id, claims.principal) == ("DPAKX", "user/tina")
    with pytest.raises(session_token.TokenError, match="expired") as e:
        session_token.verify(token, "secret-1", now=1900.0)
    assert e.value.code == "expired_token"
    with pytest.raises(session_token.TokenError, match="forged or altered"):
        session_token.verify(token, "another-secret", now=1000.0)
    head, _, mac = token.split(".")
    other, _ = session_token.issue("DPAKX", "user/admin", "other", 900, now=1000.0)
    spliced = f"{head}.{other.split('.')[1]}.{mac}"                 # claims of another token
    with pytest.raises(session_token.TokenError, match="forged or altered"):
        session_token.verify(spliced, "secret-1", now=1000.0)
    for bad in ("", "dbpst1", "dbpst1.!!.x", "jwt.a.b", "dbpst1.e30.x"):
        with pytest.raises(session_token.TokenError):
            session_token.verify(bad, "secret-1", now=1000.0)


def test_a_bearer_token_over_plain_http_is_refused():
    app = create_app("http://127.0.0.1:1")          # lifespan not run: refused before any lookup
    token, _ = session_token.issue("DPAKX", "user/tina", "secret-1", 900)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as c:
            return await c.get("/v1/hosts", headers={"Authorization": f"Bearer {token}"})
    r = asyncio.run(go())
    assert r.status_code == 401 and r.json()["error"]["code"] == "insecure_transport", r.text
