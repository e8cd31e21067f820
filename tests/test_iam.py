"""Identity and access on a real platform: signed requests (forged, replayed, expired,
altered), least-privilege policies with explicit deny and conditions, access-key life
cycle, the lock-out guard, and secrets that never show."""

from __future__ import annotations

import datetime
import json
import stat
import time

import httpx
import psycopg
import pytest

from dbplane.security import credentials, dbtoken
from dbplane.security.signing import SigningAuth, sign
from dbplane.store import keys
from platform_helpers import one_line_error, signed_client, wait_for

PREFIX = "iam-"


@pytest.fixture(scope="module")
def creds_file(platform, tmp_path_factory):
    path = tmp_path_factory.mktemp("creds") / "credentials"
    yield path
    platform.delete_all(PREFIX)


@pytest.fixture
def cli_env(creds_file, monkeypatch):
    monkeypatch.setenv("DBPLANE_SHARED_CREDENTIALS_FILE", str(creds_file))
    return creds_file


def _client(platform, creds_file, profile: str) -> httpx.Client:
    c = credentials.read_profile(creds_file, profile)
    return httpx.Client(base_url=platform.info.api_url, timeout=30, auth=SigningAuth(c.key_id, c.secret),
                        verify=platform.verify)


def _error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    assert err["hint"]
    return err["message"]


def _user_with_policy(platform, name: str, document: dict, creds_file) -> None:
    platform.cli("iam", "create-user", name)
    doc = creds_file.parent / f"{name}.json"
    doc.write_text(json.dumps(document))
    platform.cli("iam", "create-policy", f"{name}-policy", "--document", f"file://{doc}")
    platform.cli("iam", "attach-policy", f"{name}-policy", "--user", name)
    platform.cli("iam", "create-access-key", "--user", name, "--profile", name)


def test_unsigned_and_forged_requests_are_refused(platform):
    url = platform.info.api_url
    v = platform.verify
    assert httpx.get(f"{url}/healthz", verify=v).status_code == 200            # the probe stays public
    msg = _error(httpx.get(f"{url}/v1/databases", verify=v), 401, "unauthenticated")
    assert "not signed" in msg

    admin = credentials.read_profile(credentials.data_root_file(platform.root), "default")
    wrong = httpx.Client(base_url=url, auth=SigningAuth(admin.key_id, "not-the-secret"), verify=v)
    assert "signature does not match" in _error(wrong.get("/v1/databases"), 401, "invalid_signature")
    unknown = httpx.Client(base_url=url, auth=SigningAuth("DPAKAAAAAAAAAAAAAAAA", admin.secret), verify=v)
    _error(unknown.get("/v1/databases"), 401, "invalid_access_key")
    garbage = httpx.get(f"{url}/v1/databases", headers={"Authorization": "Basic YWRtaW46YWRtaW4="}, verify=v)
    _error(garbage, 401, "invalid_signature")


def test_replayed_expired_and_altered_requests_are_refused(platform):
    url = platform.info.api_url
    host = url.split("://", 1)[1]
    http = httpx.Client(verify=platform.verify, timeout=30)
    admin = credentials.read_profile(credentials.data_root_file(platform.root), "default")

    headers = sign(admin.key_id, admin.secret, "GET", "/v1/databases", "", host, b"")
    assert http.get(f"{url}/v1/databases", headers=headers).status_code == 200
    _error(http.get(f"{url}/v1/databases", headers=headers), 401, "replayed_request")

    old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=10)
    headers = sign(admin.key_id, admin.secret, "GET", "/v1/databases", "", host, b"", now=old)
    assert "away from the server's clock" in _error(http.get(f"{url}/v1/databases", headers=headers),
                                                    401, "request_expired")

    body = json.dumps({"name": f"{PREFIX}signed", "class": "micro"}).encode()
    headers = sign(admin.key_id, admin.secret, "POST", "/v1/databases", "", host, body)
    altered = body.replace(b"micro", b"large")
    r = http.post(f"{url}/v1/databases", headers={**headers, "content-type": "application/json"},
                   content=altered)
    assert "body does not match" in _error(r, 401, "invalid_signature")
    # another path with the same signature
    headers = sign(admin.key_id, admin.secret, "GET", "/v1/hosts", "", host, b"")
    _error(http.get(f"{url}/v1/databases", headers=headers), 401, "invalid_signature")
    assert platform.api.get(f"/v1/databases/{PREFIX}signed").status_code == 404


def test_least_privilege_explicit_deny_and_filtered_lists(platform, cli_env):
    platform.create(f"{PREFIX}orders", "--no-multi-az")
    platform.create(f"{PREFIX}billing", "--no-multi-az")
    _user_with_policy(platform, "carol", {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["db:Describe*"], "Resource": [f"db/{PREFIX}orders"]},
        {"Effect": "Allow", "Action": "db:*", "Resource": f"db/{PREFIX}orders"},
        {"Sid": "NeverDelete", "Effect": "Deny", "Action": "db:DeleteDatabase", "Resource": "*"}]},
        cli_env)
    assert stat.S_IMODE(cli_env.stat().st_mode) == 0o600

    names = [d["name"] for d in platform.cli_json("--profile", "carol", "db", "list")]
    assert f"{PREFIX}orders" in names and f"{PREFIX}billing" not in names
    described = platform.cli_json("--profile", "carol", "db", "describe", f"{PREFIX}orders")
    assert described["name"] == f"{PREFIX}orders"

    r = platform.cli("--profile", "carol", "db", "describe", f"{PREFIX}billing", check=False)
    one_line_error(r, f"user/carol is not allowed to db:DescribeDatabases on db/{PREFIX}billing",
                   "no attached policy allows it", "dbplane iam attach-policy")
    r = platform.cli("--profile", "carol", "db", "delete", f"{PREFIX}orders", check=False)
    one_line_error(r, "explicitly denied by policy carol-policy statement NeverDelete")
    r = platform.cli("--profile", "carol", "iam", "list-users", check=False)
    one_line_error(r, "not allowed to iam:ListUsers")
    assert platform.describe(f"{PREFIX}orders")["status"] == "available"

    d = platform.cli_json("iam", "simulate", "--user", "carol", "--action", "db:DeleteDatabase",
                          "--resource", f"db/{PREFIX}orders")
    assert d["decision"] == "denied" and "NeverDelete" in d["reason"]


def test_conditions_on_source_address(platform, cli_env):
    _user_with_policy(platform, "dave", {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "platform:*", "Resource": "*"},
        {"Effect": "Allow", "Action": "db:DescribeDatabases", "Resource": "*",
         "Condition": {"IpAddress": {"dbplane:SourceIp": "10.0.0.0/8"}}},
        {"Effect": "Deny", "Action": "*", "Resource": "*",
         "Condition": {"IpAddress": {"dbplane:SourceIp": "127.0.0.2/32"}}}]}, cli_env)
    c = _client(platform, cli_env, "dave")
    assert c.get("/v1/hosts").status_code == 200                       # from 127.0.0.1
    _error(c.get("/v1/databases/anything"), 403, "access_denied")       # not from 10/8
    # the same key from 127.0.0.2: the Deny applies to everything
    via = httpx.Client(base_url=platform.info.api_url, auth=c.auth,
                       transport=httpx.HTTPTransport(local_address="127.0.0.2", verify=platform.verify))
    assert "explicitly denied" in _error(via.get("/v1/hosts"), 403, "access_denied")


@pytest.mark.parametrize("document, fragment", [
    ("{not json", "is not JSON"),
    ('{"Version": "2012-10-17", "Statement": [{"Effect": "Maybe", "Action": "*", "Resource": "*"}]}',
     "Effect must be Allow or Deny"),
    ('{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "db:DropEverything", '
     '"Resource": "*"}]}', "matches no dbplane action"),
    ('{"Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}', "Version must be"),
    ('{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*", '
     '"Condition": {"IpAddress": {"dbplane:SourceIp": "300.1.1.1"}}}]}', "is not valid"),
])
def test_malformed_policies_are_refused(platform, document, fragment):
    r = platform.api.post("/v1/iam/policies", json={"name": "broken", "document": document})
    assert fragment in _error(r, 400, "malformed_policy")
    assert platform.api.get("/v1/iam/policies/broken").status_code == 404


@pytest.mark.parametrize("name", ["../admin", "a b", "x" * 65, "admin\n", "'; DROP"])
def test_injection_in_names_is_refused(platform, name):
    _error(platform.api.post("/v1/iam/users", json={"name": name}), 400, "invalid_name")


def test_access_key_life_cycle_and_secrets(platform, cli_env):
    platform.cli("iam", "create-role", "orders-app")
    r = platform.cli("iam", "create-access-key", "--role", "orders-app", "--profile", "app")
    key = credentials.read_profile(cli_env, "app")
    assert key.secret not in r.stdout + r.stderr                       # written, never printed
    assert key.key_id in r.stdout
    app = _client(platform, cli_env, "app")
    assert app.get("/v1/whoami").json() == {"principal": "role/orders-app"}
    _error(app.get("/v1/hosts"), 403, "access_denied")                 # no policy: nothing allowed

    # the secret is sealed in etcd and absent from every answer
    dump = b"".join(platform.etcd.get_prefix(keys.ROOT + "iam/").values())
    assert key.secret.encode() not in dump and b"ciphertext" in dump
    listed = platform.api.get("/v1/iam/roles/orders-app").text
    assert key.key_id in listed and key.secret not in listed

    platform.cli("iam", "update-access-key", key.key_id, "--status", "Inactive")
    wait_for(lambda: app.get("/v1/whoami").status_code == 401, 15, "the key to stop working")
    _error(app.get("/v1/whoami"), 401, "inactive_access_key")
    platform.cli("iam", "delete-access-key", key.key_id)
    wait_for(lambda: app.get("/v1/whoami").json()["error"]["code"] == "invalid_access_key", 15,
             "the deleted key to be unknown")
    platform.cli("iam", "delete-role", "orders-app")

    # two keys at most; deleting a principal with keys is refused
    platform.cli("iam", "create-user", "erin")
    platform.cli("iam", "create-access-key", "--user", "erin", "--profile", "erin1")
    platform.cli("iam", "create-access-key", "--user", "erin", "--profile", "erin2")
    one_line_error(platform.cli("iam", "create-access-key", "--user", "erin", "--profile", "erin3",
                                check=False), "already has 2 access keys")
    one_line_error(platform.cli("iam", "delete-user", "erin", check=False), "still has access keys")


def test_the_last_admin_cannot_lock_everyone_out(platform):
    admin = credentials.read_profile(credentials.data_root_file(platform.root), "default")
    r = platform.cli("iam", "detach-policy", "AdministratorAccess", "--user", "admin", check=False)
    one_line_error(r, "would leave no principal with AdministratorAccess")
    r = platform.cli("iam", "delete-access-key", admin.key_id, check=False)
    one_line_error(r, "would leave no principal with AdministratorAccess")
    r = platform.cli("iam", "delete-policy", "AdministratorAccess", check=False)
    one_line_error(r, "is built in")
    assert signed_client(platform.info.api_url, platform.root).get("/v1/whoami").json() == {
        "principal": "user/admin"}


def test_session_tokens(platform, cli_env, monkeypatch):
    _user_with_policy(platform, "tina", {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "platform:DescribeHosts", "Resource": "*"}]}, cli_env)
    r = platform.cli("--profile", "tina", "iam", "get-session-token", "--duration-seconds", "900")
    token = r.stdout.strip()
    assert token.startswith("dbpst1.") and "\n" not in token and "user/tina" in r.stderr
    key = credentials.read_profile(cli_env, "tina")
    assert key.secret not in r.stdout + r.stderr
    bearer = httpx.Client(base_url=platform.info.api_url, timeout=30, verify=platform.verify,
                          headers={"Authorization": f"Bearer {token}"})
    assert bearer.get("/v1/whoami").json() == {"principal": "user/tina"}
    assert bearer.get("/v1/hosts").status_code == 200                  # the user's own permissions
    _error(bearer.get("/v1/databases/x"), 403, "access_denied")       # and no more
    _error(bearer.post("/v1/session-token", json={}), 403, "access_denied")  # no token from a token

    # the CLI takes it from the environment, ahead of every profile
    monkeypatch.setenv("DBPLANE_SESSION_TOKEN", token)
    assert "user/tina (session token" in platform.cli("iam", "whoami").stdout
    monkeypatch.delenv("DBPLANE_SESSION_TOKEN")

    head, claims, mac = token.split(".")
    forged = f"{head}.{claims}.{'A' * len(mac)}"
    msg = _error(httpx.get(f"{platform.info.api_url}/v1/hosts", verify=platform.verify,
                           headers={"Authorization": f"Bearer {forged}"}), 401, "invalid_token")
    assert "forged or altered" in msg
    _error(httpx.get(f"{platform.info.api_url}/v1/hosts", verify=platform.verify,
                     headers={"Authorization": "Bearer nonsense"}), 401, "malformed_token")
    _error(platform.api.post("/v1/session-token", json={"duration_seconds": 60}), 400, "invalid_input")

    # deactivating the access key ends every token it issued
    platform.cli("iam", "update-access-key", key.key_id, "--status", "Inactive")
    wait_for(lambda: bearer.get("/v1/hosts").status_code == 401, 15, "the token to stop working")
    _error(bearer.get("/v1/hosts"), 401, "inactive_access_key")
    wait_for(lambda: platform.api.get("/v1/audit", params={"principal": "user/tina",
                                                          "action": "iam:GetSessionToken"}).json()["entries"],
             15, "the audit entry of the token's issue")


def test_a_trailing_newline_is_not_a_valid_name(platform):
    # `$` in a regular expression also matches before a final newline: names use fullmatch
    _error(platform.api.post("/v1/databases", json={"name": "orders\n", "class": "micro"}), 400,
           "invalid_name")
    _error(platform.api.post("/v1/kms/keys", json={"alias": "alias/x\n"}), 400, "kms_invalid_alias")


# -- IAM database tokens ---------------------------------------------------------------------------

def _token_login(platform, db: str, user: str, password: str, sslmode: str = "require"):
    host, port = platform.describe(db)["endpoints"]["writer"].rsplit(":", 1)
    return psycopg.connect(host=host, port=int(port), user=user, dbname="postgres", password=password,
                           sslmode=sslmode, connect_timeout=10)


def _refused(platform, db, user, password, *fragments, sslmode="require"):
    with pytest.raises(psycopg.OperationalError) as e:
        _token_login(platform, db, user, password, sslmode).close()
    text = str(e.value)
    for fragment in fragments:
        assert fragment in text, text
    return text


def test_database_tokens(platform, cli_env):
    db, other = f"{PREFIX}tok", f"{PREFIX}orders"
    platform.create(db, "--no-multi-az")
    if platform.api.get(f"/v1/databases/{other}").status_code == 404:
        platform.create(other, "--no-multi-az")
    with platform.connect(db, autocommit=True) as c:
        c.execute("CREATE ROLE app LOGIN PASSWORD 'static-password'")
        c.execute("CREATE ROLE legacy LOGIN PASSWORD 'legacy-password'")
        c.execute("GRANT dbplane_iam TO app")       # the admin user may grant it, like rds_iam
    _user_with_policy(platform, "frank", {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "db:Connect", "Resource": f"dbuser/{db}/app"}]}, cli_env)

    token = platform.cli("--profile", "frank", "db", "token", db, "--user", "app").stdout.strip()
    with _token_login(platform, db, "app", token) as c:
        assert c.execute("SELECT current_user").fetchone() == ("app",)
    with _token_login(platform, db, "app", token) as c:       # reusable within its 15 minutes
        assert c.execute("SELECT 1").fetchone() == (1,)

    # refusals, each with its reason
    # without TLS: refused by require_tls, or (where plaintext is allowed) by the token login
    assert "TLS" in _refused(platform, db, "app", token, sslmode="disable")
    _refused(platform, db, "app", "static-password", "logs in with IAM tokens only")
    forged = token[:-4] + ("0000" if not token.endswith("0000") else "1111")
    _refused(platform, db, "app", forged, "signature does not match")
    frank = credentials.read_profile(cli_env, "frank")
    expired = dbtoken.generate(frank.key_id, frank.secret, db, "app", now=time.time() - 1000)
    _refused(platform, db, "app", expired, "the token expired")
    for_other = platform.cli("--profile", "frank", "db", "token", other, "--user", "app").stdout.strip()
    _refused(platform, db, "app", for_other, f"the token is for database {other}")
    with platform.connect(other, autocommit=True) as c:
        c.execute("CREATE ROLE app LOGIN")
        c.execute("GRANT dbplane_iam TO app")
    _refused(platform, other, "app", for_other, f"not allowed to db:Connect on dbuser/{other}/app")
    # a static-password user still logs in with its password (the doctor reports it)
    with _token_login(platform, db, "legacy", "legacy-password") as c:
        assert c.execute("SELECT current_user").fetchone() == ("legacy",)

    # a password changed in SQL does not lock token users out: the proxy sets its own again
    with platform.connect(db, autocommit=True) as c:
        c.execute("ALTER ROLE app PASSWORD 'someone-else'")
    with platform.connect(db, autocommit=True) as c:        # the proxy caches verifiers briefly
        c.execute("SELECT 1")
    wait_for(lambda: _try(platform, db, "app", token), 60, "a token login after the password change")

    entries = platform.api.get("/v1/audit", params={"action": "db:Connect", "limit": 100}).json()["entries"]
    results = {(e["principal"], e["result"]) for e in entries}
    assert ("user/frank", "allowed") in results and (None, "denied") in results


def _try(platform, db, user, password) -> bool:
    try:
        _token_login(platform, db, user, password).close()
        return True
    except psycopg.OperationalError:
        return False
