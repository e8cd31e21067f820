"""etcd's client port on a real platform: https with client-certificate authentication.
A client without a certificate, with one from another CA, or in plaintext is refused (over
gRPC and over the JSON gateway); the agents renew etcd's certificates and etcd serves the
new one without a restart; the doctor flags an etcd that admits anyone."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import shutil
import socket
import stat
import subprocess
import sys

import grpc
import httpx
import psutil
import pytest
from aetcd import rpc
from cryptography import x509

from dbplane.doctor import security
from dbplane.errors import StoreUnavailable
from dbplane.paths import write_private
from dbplane.security import ca, tls
from dbplane.store import Store, keys
from dbplane.store.gateway import Gateway
from dbplane.store.tls import EtcdTLS
from dbplane.system import SERVICE_ACCOUNT, etcd_binary, is_root, port_free
from platform_helpers import signed_client, wait_for
from test_bad_input import Components, _free_port

pytestmark = pytest.mark.integration


def _address(platform) -> tuple[str, int]:
    return "127.0.0.1", platform.info.etcd_client_port


def _range_over_grpc(url_host: str, port: int, credentials: grpc.ChannelCredentials) -> None:
    async def main():
        async with grpc.aio.secure_channel(f"{url_host}:{port}", credentials) as channel:
            await rpc.KVStub(channel).Range(rpc.RangeRequest(key=keys.ROOT.encode()), timeout=5)
    asyncio.run(main())


def _range(store: Store):
    async def main():
        async with store as s:
            return await s.get_prefix(keys.ROOT + "config")
    return asyncio.run(main())


def test_the_platform_runs_etcd_over_https_with_client_certificates(platform):
    assert platform.info.etcd_url.startswith("https://")
    assert platform.etcd.healthy()
    assert _range(platform.store())                            # gRPC with the client certificate
    pid = json.loads(platform.layout.pidfile("etcd").read_text())["pid"]
    argv = psutil.Process(pid).cmdline()
    assert "--client-cert-auth" in argv
    assert argv[argv.index("--trusted-ca-file") + 1] == str(ca.cert_path(platform.root))
    cert, key = tls.etcd_server_certificate(platform.root)
    assert argv[argv.index("--cert-file") + 1] == str(cert)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.stat().st_uid == os.getuid()
    client_cert, client_key = tls.etcd_client_certificate(platform.root)
    assert stat.S_IMODE(client_key.stat().st_mode) == 0o600
    if is_root():      # Patroni, the proxy and the backup worker read it as the service account
        import pwd
        assert client_key.stat().st_uid == pwd.getpwnam(SERVICE_ACCOUNT).pw_uid
    authority = ca.load_cert(ca.cert_path(platform.root))
    assert ca.issued_by(ca.load_cert(client_cert), authority)
    assert "127.0.0.1" in ca.names_of(ca.load_cert(cert))


def test_a_client_without_a_certificate_is_refused(platform):
    host, port = _address(platform)
    ca_pem = ca.cert_path(platform.root).read_bytes()
    # it trusts etcd (the platform CA) but has nothing to show
    with pytest.raises(grpc.aio.AioRpcError) as e:
        _range_over_grpc(host, port, grpc.ssl_channel_credentials(root_certificates=ca_pem))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"{platform.info.etcd_url}/v3/kv/range", json={"key": "AA=="}, timeout=5,
                   verify=tls.client_context(ca.cert_path(platform.root)))
    with pytest.raises(StoreUnavailable) as e:                   # https without a certificate
        _range(Store(platform.info.etcd_url, timeout=3))
    assert "no etcd client certificate" in e.value.hint


def test_a_certificate_from_another_ca_is_refused(platform, tmp_path):
    ca.ensure_ca(tmp_path)
    foreign = ca.CertificateAuthority.load(tmp_path).issue([tls.ETCD_CLIENT_NAME])
    write_private(tmp_path / "client.key", foreign.key_pem)
    write_private(tmp_path / "client.crt", foreign.cert_pem, mode=0o644)
    impostor = EtcdTLS(ca=str(ca.cert_path(platform.root)), cert=str(tmp_path / "client.crt"),
                       key=str(tmp_path / "client.key"))
    with pytest.raises(StoreUnavailable) as e:
        _range(Store(platform.info.etcd_url, timeout=3, tls=impostor))
    assert "unreachable" in e.value.message
    with pytest.raises(StoreUnavailable):
        Gateway(platform.info.etcd_url, tls=impostor).get(keys.config())


def test_plaintext_to_the_client_port_fails(platform):
    host, port = _address(platform)
    plain = f"http://{host}:{port}"
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"{plain}/v3/kv/range", json={"key": "AA=="}, timeout=5)
    with pytest.raises(StoreUnavailable):
        _range(Store(plain, timeout=3))                           # plaintext gRPC


def _served_certificate(platform) -> x509.Certificate:
    """The certificate etcd presents to a new connection (made with the client certificate)."""
    host, port = _address(platform)
    ctx = platform.etcd.tls.ssl_context()
    with socket.create_connection((host, port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as conn:
        return x509.load_der_x509_certificate(conn.getpeercert(binary_form=True))


def test_agents_renew_etcd_certificates_and_etcd_serves_them_without_a_restart(platform):
    """A server and a client certificate due for renewal (issued 70 of 90 days ago) are
    re-issued by an agent's next pass; etcd presents the new one on the next connection and
    every component keeps working."""
    etcd_pid = platform.layout.pidfile("etcd").read_text()
    authority = ca.CertificateAuthority.load(platform.root)
    old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=70)
    server_cert, server_key = tls.etcd_server_certificate(platform.root)
    client_cert, client_key = tls.etcd_client_certificate(platform.root)
    owner = (client_key.stat().st_uid, client_key.stat().st_gid)
    due_server = authority.issue(ca.names_of(ca.load_cert(server_cert)), now=old)
    due_client = authority.issue([tls.ETCD_CLIENT_NAME], now=old)
    with tls.etcd_issuing(platform.root):                 # the agents wait meanwhile
        write_private(server_key, due_server.key_pem)
        write_private(server_cert, due_server.cert_pem, mode=0o644)
        write_private(client_key, due_client.key_pem, owner=owner)
        write_private(client_cert, due_client.cert_pem, mode=0o644, owner=owner)
        stale = ca.load_cert(server_cert).serial_number
        assert _served_certificate(platform).serial_number == stale   # etcd read the file again

    def renewed():
        server, client = ca.load_cert(server_cert), ca.load_cert(client_cert)
        return server.serial_number != stale and not ca.needs_issue(server, authority.cert, []) \
            and not ca.needs_issue(client, authority.cert, [])
    wait_for(renewed, 30, "an agent to renew the etcd certificates")
    assert _served_certificate(platform).serial_number == ca.load_cert(server_cert).serial_number
    assert client_key.stat().st_uid == owner[0] and stat.S_IMODE(client_key.stat().st_mode) == 0o600
    assert platform.layout.pidfile("etcd").read_text() == etcd_pid          # no restart
    assert _range(platform.store()) and platform.cli("hosts").returncode == 0


def _free_ports() -> int:
    """Two free ports in a row (etcd's client and peer port)."""
    for port in range(29700, 29900, 2):
        if port_free("127.0.0.1", port) and port_free("127.0.0.1", port + 1):
            return port
    raise AssertionError("no free port")


def test_doctor_flags_an_etcd_that_admits_clients_without_a_certificate(platform, tmp_path):
    [ours] = asyncio.run(security.etcd_client_auth(platform.store()))
    assert ours.severity == "ok" and ours.check == "etcd_client_auth"
    port = _free_ports()
    url, peer = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"
    etcd = subprocess.Popen([etcd_binary(), "--name", "plain", "--data-dir", str(tmp_path / "etcd"),
                             "--listen-client-urls", url, "--advertise-client-urls", url,
                             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                             "--initial-cluster", f"plain={peer}", "--log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        plain = Gateway(url)                                    # http: no certificate needed
        wait_for(plain.healthy, 30, "a plaintext etcd")
        plain.put(keys.config(), "{}")
        [finding] = asyncio.run(security.etcd_client_auth(Store(url)))
    finally:
        etcd.terminate()
        etcd.wait(30)
    assert finding.severity == "critical"
    assert url in finding.evidence and "plaintext http" in finding.evidence
    assert "1 keys under /dbplane/v1/" in finding.evidence
    assert "--client-cert-auth" in finding.fix and "dbplane up" in finding.fix



def test_components_one_by_one_reach_an_https_etcd():
    """A platform started by hand: `ca etcd-certs` issues etcd's certificate and the clients',
    etcd runs with them, and bootstrap, controller, API and agent (and the agent's proxy and
    backup worker) all work through it."""
    c = Components()
    c.etcd = c.etcd.replace("http://", "https://")
    try:
        issued = subprocess.run([sys.executable, "-m", "dbplane", "--data-dir", str(c.root), "ca",
                                 "etcd-certs", "--server-name", "127.0.0.1"],
                                capture_output=True, text=True, timeout=60)
        assert issued.returncode == 0, issued.stderr
        assert "issued the etcd server certificate (missing)" in issued.stderr
        cert, key = tls.etcd_server_certificate(c.root)
        peer = f"http://127.0.0.1:{_free_port()}"
        c.start(etcd_binary(), "--data-dir", str(c.root / "etcd"), "--listen-client-urls", c.etcd,
                "--advertise-client-urls", c.etcd, "--listen-peer-urls", peer,
                "--initial-advertise-peer-urls", peer, "--initial-cluster", f"default={peer}",
                "--cert-file", str(cert), "--key-file", str(key), "--client-cert-auth",
                "--trusted-ca-file", str(ca.cert_path(c.root)))
        etcd = Gateway(c.etcd, tls=tls.etcd_client_tls(c.root))
        wait_for(etcd.healthy, 30, "etcd")
        boot = subprocess.run([sys.executable, "-m", "dbplane", "--data-dir", str(c.root), "bootstrap",
                               "--etcd", c.etcd], capture_output=True, text=True, timeout=60)
        assert boot.returncode == 0, boot.stderr
        c.dbplane("controller", "--etcd", c.etcd)
        c.dbplane("api", "--etcd", c.etcd, "--listen", f"127.0.0.1:{c.api_port}")
        c.dbplane("agent", "--etcd", c.etcd, "--zone", "a")
        api = signed_client(c.api, c.root)
        wait_for(lambda: len(api.get("/v1/hosts").json()) == 1, 30, "the agent")
        wait_for(lambda: etcd.get(keys.controller_leader()), 30, "a leading controller")
        wait_for(lambda: etcd.get_prefix(keys.ROOT + "proxy/instances/"), 30, "the proxy")
    finally:
        c.stop()
        shutil.rmtree(c.root, ignore_errors=True)


def test_a_client_moves_to_its_renewed_certificate_after_a_failure(platform, tmp_path):
    """gRPC keeps the certificate a channel was opened with for all its reconnections: a
    Store whose certificate is refused goes on over a new channel once the files change."""
    ca.ensure_ca(tmp_path / "other")
    foreign = ca.CertificateAuthority.load(tmp_path / "other").issue([tls.ETCD_CLIENT_NAME])
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    write_private(key, foreign.key_pem)
    write_private(cert, foreign.cert_pem, mode=0o644)
    store = Store(platform.info.etcd_url, timeout=3,
                  tls=EtcdTLS(ca=str(ca.cert_path(platform.root)), cert=str(cert), key=str(key)))
    real_cert, real_key = tls.etcd_client_certificate(platform.root)

    async def main():
        try:
            with pytest.raises(StoreUnavailable):
                await store.connect()                       # refused: another CA
            write_private(key, real_key.read_text())        # "renewed" on disk
            write_private(cert, real_cert.read_text(), mode=0o644)
            with pytest.raises(StoreUnavailable):
                await store.get_raw(keys.config())          # the old channel, noticing new files
            return await store.get_raw(keys.config())       # a new channel with them
        finally:
            await store.close()
    assert asyncio.run(main()) is not None
