"""etcd's client certificates without a platform: where they live, how they are issued and
renewed (also by several agents at once), how clients and Patroni are configured with
them, and that the URL's scheme decides whether they are used."""

from __future__ import annotations

import argparse
import datetime
import shlex
import stat
import threading

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from dbplane.agent import patroni
from dbplane.models import DatabaseSecrets, DatabaseSpec, MemberSpec, RestoreSource
from dbplane.paths import write_private
from dbplane.security import ca, tls
from dbplane.store import Store
from dbplane.store.gateway import Gateway
from dbplane.store.tls import EtcdTLS

pytestmark = pytest.mark.unit

HTTPS = "https://127.0.0.1:2379"
FILES = EtcdTLS(ca="/r/ca/ca.crt", cert="/r/tls/etcd-client.crt", key="/r/tls/etcd-client.key")


@pytest.fixture
def root(tmp_path):
    assert ca.ensure_ca(tmp_path)
    return tmp_path


def _matches(cert_path, key_path) -> bool:
    cert = ca.load_cert(cert_path)
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(*raw) == key.public_key().public_bytes(*raw)


def test_client_certificate_is_found_in_the_data_root(root):
    assert tls.etcd_client_tls(root) is None and tls.etcd_client_tls(None) is None
    assert tls.ensure_etcd_certificates(root, None) == ["etcd client certificate (missing)"]
    found = tls.etcd_client_tls(root)
    assert found == EtcdTLS(ca=str(ca.cert_path(root)), cert=str(root / "tls" / "etcd-client.crt"),
                            key=str(root / "tls" / "etcd-client.key"))
    assert stat.S_IMODE((root / "tls" / "etcd-client.key").stat().st_mode) == 0o600
    assert not (root / "tls" / "etcd-server.crt").exists()
    assert ("etcd client (every component)", root / "tls" / "etcd-client.crt") in ca.leaf_files(root)
    assert found.ssl_context().check_hostname                  # verify-full against the CA


def test_renewal_keeps_server_names_and_touches_only_what_is_due(root):
    assert tls.renew_etcd_certificates(root, "http://127.0.0.1:2379", None) == []   # plaintext etcd
    assert tls.renew_etcd_certificates(root, HTTPS, None) == ["etcd client certificate (missing)"]
    assert not tls.etcd_server_certificate(root)[0].exists()      # etcd is not run from here
    tls.ensure_etcd_certificates(root, None, ["127.0.0.1", "localhost"])
    assert tls.renew_etcd_certificates(root, HTTPS, None) == []   # both fresh
    cert, key = tls.etcd_server_certificate(root)
    old = ca.CertificateAuthority.load(root).issue(["127.0.0.1", "localhost"],
                                                   now=datetime.datetime.now(datetime.UTC)
                                                   - datetime.timedelta(days=70))
    write_private(key, old.key_pem)
    write_private(cert, old.cert_pem, mode=0o644)
    [why] = tls.renew_etcd_certificates(root, HTTPS, None)
    assert why.startswith("etcd server certificate (expires ")
    assert ca.names_of(ca.load_cert(cert)) == ["127.0.0.1", "localhost"] and _matches(cert, key)


def test_agents_renewing_at_once_leave_a_matching_key_and_certificate(root):
    tls.ensure_etcd_certificates(root, None)
    cert, key = tls.etcd_client_certificate(root)
    for _ in range(5):
        old = ca.CertificateAuthority.load(root).issue([tls.ETCD_CLIENT_NAME], now=datetime.datetime.now(
            datetime.UTC) - datetime.timedelta(days=80))
        write_private(key, old.key_pem)
        write_private(cert, old.cert_pem, mode=0o644)
        results: list[list[str]] = []

        def agent_pass(results=results) -> None:
            results.append(tls.renew_etcd_certificates(root, HTTPS, None))
        agents = [threading.Thread(target=agent_pass) for _ in range(4)]
        for a in agents:
            a.start()
        for a in agents:
            a.join()
        assert sorted(len(r) for r in results) == [0, 0, 0, 1]   # one issued, the others found it fresh
        assert _matches(cert, key)


def test_a_missing_ca_key_is_reported_not_guessed(root):
    tls.ensure_etcd_certificates(root, None)
    cert, key = tls.etcd_client_certificate(root)
    old = ca.CertificateAuthority.load(root).issue([tls.ETCD_CLIENT_NAME], now=datetime.datetime.now(
        datetime.UTC) - datetime.timedelta(days=80))
    write_private(key, old.key_pem)
    write_private(cert, old.cert_pem, mode=0o644)
    ca.key_path(root).unlink()                      # another host: only ca.crt and the copies
    with pytest.raises(ca.CaMissing):
        tls.renew_etcd_certificates(root, HTTPS, None)


def test_the_scheme_decides_whether_the_certificate_is_used():
    assert Store("http://127.0.0.1:2379", tls=FILES).tls is None
    assert Store(HTTPS, tls=FILES).tls == FILES
    assert Gateway("http://127.0.0.1:2379", tls=FILES).tls is None
    assert Gateway(HTTPS, tls=FILES).tls == FILES


def test_child_processes_get_the_files_as_options():
    parser = argparse.ArgumentParser()
    EtcdTLS.add_arguments(parser)
    assert EtcdTLS.from_args(parser.parse_args(FILES.argv())) == FILES
    assert EtcdTLS.from_args(parser.parse_args([])) is None


def _render(url: str, etcd_tls: EtcdTLS | None, restore: bool = False) -> dict:
    member = MemberSpec(name="db-1", database="db", host="host-a", zone="a", address="127.0.0.1",
                        pg_port=5432, api_port=5433, kind="primary_candidate")
    secrets = DatabaseSecrets(superuser="s1", replication="s2", rewind="s3", admin="s4")
    spec = DatabaseSpec(name="db")
    if restore:
        spec = spec.model_copy(update={"restore": RestoreSource(
            source_database="src", archive_id="a1", repository="local", chain=["b1"], target="immediate")})
    return yaml.safe_load(patroni.render(member, spec, secrets, [url], "/bin", "/m", etcd_tls=etcd_tls))


def test_patroni_reaches_an_https_etcd_with_the_client_certificate():
    assert _render(HTTPS, FILES)["etcd3"] == {
        "hosts": ["127.0.0.1:2379"], "protocol": "https", "cacert": FILES.ca, "cert": FILES.cert,
        "key": FILES.key}
    assert _render("http://127.0.0.1:2379", FILES)["etcd3"] == {"hosts": ["127.0.0.1:2379"]}


def test_the_restore_bootstrap_gets_the_client_certificate():
    command = shlex.split(_render(HTTPS, FILES, restore=True)["bootstrap"]["dbplane_restore"]["command"])
    assert command[command.index("--etcd") + 1] == HTTPS
    assert command[command.index("--etcd-cert") + 1] == FILES.cert
    assert command[command.index("--etcd-key") + 1] == FILES.key


def test_a_plaintext_platform_switches_to_https_only_when_nothing_of_it_runs(root):
    from dbplane.paths import PlatformInfo
    from dbplane.platform import launcher
    old = PlatformInfo(etcd_url="http://127.0.0.1:24000", api_url="http://127.0.0.1:24002",
                       etcd_client_port=24000, etcd_peer_port=24001, api_port=24002,
                       member_port_start=24010, member_port_end=25000)
    said: list[str] = []
    assert launcher._etcd_tls(root, old, True, None, said.append) == old
    assert "dbplane down" in said[0] and tls.etcd_client_tls(root) is None
    new = launcher._etcd_tls(root, old, False, None, said.append)
    assert new.etcd_url == "https://127.0.0.1:24000" and tls.etcd_client_tls(root) is not None
    argv = launcher._argv("etcd", root, new)
    assert "--client-cert-auth" in argv and argv[argv.index("--listen-client-urls") + 1] == new.etcd_url
    assert "--cert-file" not in launcher._argv("etcd", root, old)
