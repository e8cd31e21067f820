"""TLS with real clients on a real platform: the exported CA verifies the proxy
(sslmode=verify-full), require_tls refuses plaintext and downgrades, the proxy picks up a
re-issued certificate, Patroni's REST API is https, and node TLS is on where the
PostgreSQL build has it (a system PostgreSQL) and reported unavailable where not."""

from __future__ import annotations

import datetime
import glob
import socket
import stat

import httpx
import psycopg
import pytest
import yaml
from cryptography import x509

from dbplane import pgwire as wire
from dbplane.models import MemberSpec
from dbplane.paths import write_private
from dbplane.security import ca, tls
from dbplane.store import keys
from platform_helpers import Platform, new_data_root, one_line_error, wait_for
from test_proxy import recv_all

pytestmark = pytest.mark.integration

DB = "tls-a"
SSL_REQUEST = wire.INT32.pack(8) + wire.INT32.pack(wire.SSL_REQUEST)


@pytest.fixture(scope="module")
def db(platform):
    platform.create(DB)
    yield platform
    platform.delete_all("tls-")


@pytest.fixture(scope="module")
def ca_file(db, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("client") / "dbplane-ca.crt"
    db.cli("ca", "cert", "--out", str(out))
    return str(out)


def writer(p: Platform, name: str = DB) -> tuple[str, int]:
    host, port = p.describe(name)["endpoints"]["writer"].rsplit(":", 1)
    return host, int(port)


def connect(p: Platform, **kw) -> psycopg.Connection:
    host, port = writer(p)
    kw = {"host": host, **kw}
    return psycopg.connect(port=port, user="dbadmin", dbname="postgres", connect_timeout=5,
                           passfile=str(p.layout.pgpass(DB)), **kw)


def error_fields(reply: bytes) -> dict[str, str]:
    assert reply[:1] == b"E", reply[:40]
    length = wire.INT32.unpack(reply[1:5])[0]
    return wire.parse_error_fields(reply[5:1 + length])


def startup() -> bytes:
    return wire.startup_message({"user": "dbadmin", "database": "postgres"})


# -- the CA and the proxy's certificate -----------------------------------------------------

def test_exported_ca_verifies_the_proxy_with_verify_full(db, ca_file):
    root_ca = ca.cert_path(db.root)
    assert open(ca_file).read() == root_ca.read_text()
    printed = db.cli("ca", "cert").stdout
    assert printed == root_ca.read_text() and "PRIVATE KEY" not in printed
    assert stat.S_IMODE(ca.key_path(db.root).stat().st_mode) == 0o600
    for host in ("127.0.0.1", "localhost"):            # both are names in the certificate
        with connect(db, host=host, sslmode="verify-full", sslrootcert=ca_file, autocommit=True) as c:
            assert c.pgconn.ssl_in_use
            assert c.execute("SELECT 1").fetchone()[0] == 1
    # a client trusting only the public CAs does not accept it
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        connect(db, sslmode="verify-full", sslrootcert="/etc/ssl/certs/ca-certificates.crt")


def test_ca_describe_lists_every_certificate_with_expiry(db):
    d = db.cli_json("ca", "describe")
    assert d["ca"]["days_left"] > 3000 and len(d["ca"]["sha256_fingerprint"]) == 95
    what = {c["certificate"]: c for c in d["certificates"]}
    for zone in "abc":
        proxy = what[f"proxy on host-{zone}"]
        assert proxy["state"] == "valid" and "127.0.0.1" in proxy["names"]
        assert proxy["days_left"] > ca.LEAF_DAYS * 2 // 3 - 1
    assert any(k.startswith(f"member {DB}-") for k in what)


def _old_certificate(root, names: list[str]) -> tuple[str, str]:
    """A certificate of the platform CA issued 80 of its 90 days ago: due for renewal."""
    issued = ca.CertificateAuthority.load(root).issue(
        names, now=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=80))
    return issued.cert_pem, issued.key_pem


def _proxy_serials(host: str, port: int, ca_path: str) -> set[int]:
    """Serial numbers the proxies sharing the port present (SSLRequest, then TLS)."""
    seen = set()
    for _ in range(12):
        with socket.create_connection((host, port), timeout=5) as raw:
            raw.sendall(SSL_REQUEST)
            assert raw.recv(1) == b"S"
            with tls.client_context(ca_path).wrap_socket(raw, server_hostname=host) as s:
                seen.add(x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number)
    return seen


def test_a_certificate_due_for_renewal_is_reissued_and_picked_up_by_the_proxy(db, ca_file):
    tls_dir = db.layout.host_dir("host-a") / "tls"
    cert, key = tls_dir / "proxy.crt", tls_dir / "proxy.key"
    owner = (key.stat().st_uid, key.stat().st_gid)
    names = ca.names_of(ca.load_cert(cert))
    old_pem, old_key = _old_certificate(db.root, names)
    old = x509.load_pem_x509_certificate(old_pem.encode())
    write_private(key, old_key, owner=owner)
    write_private(cert, old_pem, mode=0o644, owner=owner)
    # the agent re-issues it on its next pass ...
    new = wait_for(lambda: (c := ca.load_cert(cert)).serial_number != old.serial_number and c,
                   30, "the agent to re-issue the proxy's certificate")
    assert datetime.datetime.now(datetime.UTC) < ca.renew_at(new)
    # ... and host-a's proxy presents it to new connections without a restart
    host, port = writer(db)
    wait_for(lambda: new.serial_number in _proxy_serials(host, port, ca_file), 30,
             "host-a's proxy to present the new certificate")
    with connect(db, sslmode="verify-full", sslrootcert=ca_file) as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1


# -- require_tls ------------------------------------------------------------------------------

def test_require_tls_refuses_plaintext_with_a_clear_error(db):
    with pytest.raises(psycopg.OperationalError) as e:
        connect(db, sslmode="disable")
    assert f"database {DB} requires TLS (require_tls=on)" in str(e.value)
    assert "sslmode=require or sslmode=verify-full" in str(e.value)
    with connect(db, sslmode="require") as c:
        assert c.pgconn.ssl_in_use
    # on the wire: a FATAL ErrorResponse, SQLSTATE 28000, before any authentication
    with socket.create_connection(writer(db), timeout=5) as s:
        s.sendall(startup())
        fields = error_fields(recv_all(s))
    assert fields["S"] == "FATAL" and fields["C"] == "28000"
    assert "\n" not in fields["M"] and "dbplane db modify" in fields["H"]


def test_downgrade_attempts_are_refused(db):
    host, port = writer(db)
    # the client asks for TLS, is told yes, then talks plaintext anyway: no login happens
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(SSL_REQUEST)
        assert s.recv(1) == b"S"
        s.sendall(startup())
        reply = recv_all(s)
    assert not reply.startswith(b"R") and b"SCRAM-SHA-256" not in reply
    # plaintext sent right behind the SSLRequest (an injection before the handshake)
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(SSL_REQUEST + startup())
        fields = error_fields(recv_all(s))
    assert fields["C"] == "08P01" and "unencrypted data after SSL request" in fields["M"]
    # a GSSAPI request is declined; a plaintext startup after it is still refused
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(wire.INT32.pack(8) + wire.INT32.pack(wire.GSSENC_REQUEST))
        assert s.recv(1) == b"N"
        s.sendall(startup())
        assert error_fields(recv_all(s))["C"] == "28000"


def test_require_tls_can_be_turned_off_and_bad_values_are_refused(db):
    one_line_error(db.cli("db", "modify", DB, "--param", "require_tls=maybe", check=False),
                   "require_tls must be on or off, not 'maybe'")
    db.cli("db", "modify", DB, "--param", "require_tls=off", "--wait")
    try:
        assert db.describe(DB)["tls"]["require_tls"] is False

        def plaintext_works():
            with connect(db, sslmode="disable") as c:
                return not c.pgconn.ssl_in_use
        wait_for(plaintext_works, 30, "the proxies to allow plaintext")
    finally:
        db.cli("db", "modify", DB, "--param", "require_tls=on", "--wait")
    wait_for(lambda: db.describe(DB)["tls"]["require_tls"], 30, "require_tls back on")


# -- Patroni's REST API ----------------------------------------------------------------------------

def _members(p: Platform, name: str) -> list[MemberSpec]:
    raw = p.etcd.get_prefix(keys.members(name)).values()
    return [MemberSpec.model_validate_json(v) for v in raw]


def test_patroni_rest_api_is_https_with_a_ca_certificate(db, ca_file):
    m = _members(db, DB)[0]
    r = httpx.get(f"https://{m.address}:{m.api_port}/patroni", verify=tls.client_context(ca_file), timeout=5)
    assert r.status_code == 200 and r.json()["state"] == "running"
    with pytest.raises(httpx.HTTPError):                          # no plaintext
        httpx.get(f"http://{m.address}:{m.api_port}/patroni", timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://{m.address}:{m.api_port}/patroni", timeout=5)   # public CAs only
    # the controller drives Patroni over https (PATCH /config for a parameter change)
    db.cli("db", "modify", DB, "--param", "work_mem=6MB", "--wait")
    with connect(db, sslmode="require", autocommit=True) as c:
        assert c.execute("SHOW work_mem").fetchone()[0] == "6MB"


def test_node_tls_is_reported_unavailable_on_a_build_without_openssl(db):
    supported, reason = tls.postgres_tls(db.info.pg_bin_dir)
    d = db.describe(DB)
    assert d["tls"]["nodes"].startswith("on") if supported else d["tls"]["nodes"] == "unavailable"
    if supported:
        return
    assert "has no OpenSSL" in d["tls"]["nodes_reason"]
    assert "node TLS     unavailable" in db.cli("ca", "describe").stdout
    assert "nodes: unavailable" in db.cli("db", "describe", DB).stdout
    m = _members(db, DB)[0]
    config = yaml.safe_load((db.layout.host_dir(m.host) / "members" / m.name / "patroni.yml").read_text())
    assert "ssl" not in config["postgresql"]["parameters"]
    assert all(line.startswith("host ") for line in config["postgresql"]["pg_hba"])


# -- node TLS on a PostgreSQL built with OpenSSL ----------------------------------------------------

# scripts/test installs Debian's postgresql-15 (built with OpenSSL) when run as root
TLS_BIN_DIR = next((b for b in sorted(glob.glob("/usr/lib/postgresql/*/bin")) if tls.postgres_tls(b)[0]),
                   None)


@pytest.mark.skipif(TLS_BIN_DIR is None, reason="no system PostgreSQL built with OpenSSL")
def test_nodes_accept_only_tls_and_the_api_is_https(tmp_path):
    """A platform on a system PostgreSQL built with OpenSSL (Debian's, instead of the embedded
    one), with the API over https too; the engine stays the platform's across down and up."""
    p = Platform(new_data_root("dbplane-nodetls-"))
    try:
        p.up("--pg-bin-dir", TLS_BIN_DIR, "--api-tls")
        api = p.info.api_url
        assert api.startswith("https://127.0.0.1:")
        d = p.create("sealed", "--multi-az")          # the CLI verifies the API against the CA
        assert d["tls"]["nodes"].startswith("on")
        ca_file = str(tmp_path / "ca.crt")
        p.cli("ca", "cert", "--out", ca_file)
        primary = p.member("sealed", "primary")
        node = {"host": primary["address"], "port": primary["port"], "user": "dbadmin",
                "dbname": "postgres", "passfile": str(p.layout.pgpass("sealed")), "connect_timeout": 5}
        with pytest.raises(psycopg.OperationalError, match="no encryption"):     # hostssl only
            psycopg.connect(**node, sslmode="disable")
        with psycopg.connect(**node, sslmode="verify-full", sslrootcert=ca_file, autocommit=True) as c:
            # everything that reaches the node does so over TLS: replication, Patroni, the proxy
            rows = wait_for(lambda: c.execute(
                "SELECT a.application_name, a.usename, s.ssl FROM pg_stat_activity a "
                "JOIN pg_stat_ssl s USING (pid) WHERE a.backend_type IN ('client backend', 'walsender') "
                "AND a.pid <> pg_backend_pid()").fetchall(), 30, "connections to the primary")
            assert all(ssl_on for _, _, ssl_on in rows), rows
            assert any(user == "replicator" for _, user, _ in rows), rows
        host, port = d["endpoints"]["writer"].rsplit(":", 1)
        with psycopg.connect(host=host, port=int(port), user="dbadmin", dbname="postgres",
                             passfile=str(p.layout.pgpass("sealed")), sslmode="verify-full",
                             sslrootcert=ca_file, connect_timeout=5) as c:
            # the proxy's own server connection to the node is TLS too
            assert c.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0]
            # the system PostgreSQL chosen at the first `up` runs the database
            major = TLS_BIN_DIR.split("/")[-2]
            assert p.info.pg_bin_dir == TLS_BIN_DIR and d["version"] == major
            assert c.execute("SHOW server_version").fetchone()[0].startswith(major + ".")
            c.execute("CREATE TABLE t AS SELECT 1 AS x")
            c.commit()
        assert sorted(m["role"] for m in d["members"]) == ["primary", "sync_standby"]
        assert "node TLS     on (hostssl only)" in p.cli("ca", "describe").stdout
        # the API: https with a CA certificate, renewed like the others; no plaintext
        assert httpx.get(f"{api}/healthz", verify=tls.client_context(ca_file)).status_code == 200
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{api}/healthz")                                    # public CAs only
        with pytest.raises(httpx.HTTPError):
            httpx.get(api.replace("https://", "http://") + "/healthz", timeout=5)
        assert any(c["certificate"] == "API server" and c["state"] == "valid"
                   for c in p.cli_json("ca", "describe")["certificates"])
        # the engine is part of the platform: another one is refused, nothing changes
        r = p.cli("up", "--pg-bin-dir", "/nonexistent", check=False)
        assert r.returncode == 1 and "no postgres binary in" in r.stderr
        p.down()
        p.up()                          # no options: the recorded engine, and https is kept
        assert p.info.api_url == api and p.info.pg_bin_dir == TLS_BIN_DIR
        p.wait_available("sealed")

        def read_back():
            with p.connect("sealed") as conn:
                return conn.execute("SELECT x FROM t").fetchone()
        assert wait_for(read_back, 60, "the table to be readable after down and up") == (1,)
    finally:
        p.destroy()

