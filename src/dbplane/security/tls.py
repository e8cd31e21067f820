"""TLS for dbplane's components: leaf certificates from the platform CA (security/ca.py)
kept fresh on disk, SSL contexts for servers and clients, and whether a PostgreSQL build
can do TLS at all (the embedded one cannot)."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import shutil
import ssl
import subprocess
from pathlib import Path

from ..paths import write_private
from ..store.tls import EtcdTLS, is_https
from . import ca

log = logging.getLogger("dbplane.tls")


# -- leaf certificates on disk ---------------------------------------------------------------

def ensure_leaf(root: Path, cert: Path, key: Path, names: list[str],
                owner: tuple[int, int] | None) -> str:
    """Issue `cert` (0644) and its `key` (0600, owned by `owner`) from the CA under `root`
    when missing, issued by another CA, lacking one of `names`, or due for renewal.
    Returns why it was issued, or "" when the files on disk were fine."""
    authority_cert = ca.load_cert(ca.cert_path(root))
    if authority_cert is None:
        raise ca.CaMissing(f"no dbplane CA in {ca.ca_dir(root)}",
                           "run 'dbplane up' once on this data root, or copy ca.crt and ca.key "
                           "from the host that created the CA")
    reason = ca.needs_issue(ca.load_cert(cert) if key.exists() else None, authority_cert, names)
    if not reason:
        return ""
    issued = ca.CertificateAuthority.load(root).issue(names)
    # key first: a reader that sees the new certificate must find its key
    write_private(key, issued.key_pem, owner=owner)
    write_private(cert, issued.cert_pem, mode=0o644, owner=owner)
    return reason


# -- SSL contexts ------------------------------------------------------------------------------

def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def client_context(ca_file: Path | str) -> ssl.SSLContext:
    """Verifies the peer's certificate against the platform CA and its name (verify-full)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class ReloadingServerContext:
    """A server SSLContext that follows its certificate file: after the agent re-issues
    it, the next handshake uses the new one (connections already open keep theirs)."""

    def __init__(self, cert: Path, key: Path):
        self.cert, self.key = cert, key
        self._stamp: tuple[int, int] | None = None
        self.context: ssl.SSLContext | None = None
        self.refresh()

    def refresh(self) -> bool:
        """Reload if the certificate changed on disk; True if it did."""
        try:
            st = os.stat(self.cert)
        except FileNotFoundError:
            return False
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp == self._stamp:
            return False
        try:
            context = server_context(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:   # caught between the key and the certificate
            log.warning("cannot load %s yet: %s", self.cert, e)
            return False
        self._stamp, self.context = stamp, context
        log.info("loaded TLS certificate %s", self.cert)
        return True


# -- PostgreSQL builds -------------------------------------------------------------------------

@functools.cache
def postgres_tls(bin_dir: str) -> tuple[bool, str]:
    """(whether this PostgreSQL build has TLS, a sentence saying why or why not)."""
    pg_config = Path(bin_dir) / "pg_config"
    try:
        if pg_config.exists():
            flags = subprocess.run([str(pg_config), "--configure"], capture_output=True, text=True,
                                   timeout=10).stdout
            found = "--with-openssl" in flags or "--with-ssl=openssl" in flags
            evidence = "pg_config --configure"
        else:                     # no pg_config: is libssl among the server's libraries?
            found = b"libssl.so" in (Path(bin_dir) / "postgres").read_bytes()
            evidence = "the postgres binary's libraries"
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"cannot tell whether PostgreSQL in {bin_dir} has TLS: {e}"
    if found:
        return True, f"PostgreSQL in {bin_dir} is built with OpenSSL"
    return False, (f"the PostgreSQL build in {bin_dir} has no OpenSSL ({evidence} shows none): its "
                   "nodes cannot offer TLS; use a PostgreSQL built with OpenSSL "
                   "('dbplane up --pg-bin-dir' on a new data root) for TLS to the nodes")


# -- the nodes, as their clients see them ------------------------------------------------------

# Set by the agent for the processes it starts (proxy, backup worker) when the nodes'
# PostgreSQL build has TLS: the CA file to verify them against. Unset: nodes are plaintext.
NODE_CA_ENV = "DBPLANE_NODE_CA"


def node_ca() -> str | None:
    return os.environ.get(NODE_CA_ENV) or None


def node_libpq_options() -> dict[str, str]:
    """psycopg/libpq options for a connection to a node: verify-full against the CA when
    the nodes offer TLS (they then accept nothing else), else plaintext."""
    ca_file = node_ca()
    return {"sslmode": "verify-full", "sslrootcert": ca_file} if ca_file else {"sslmode": "disable"}


def node_context() -> ssl.SSLContext | None:
    """For dbplane's own protocol clients of the nodes (the proxy, the WAL archiver)."""
    ca_file = node_ca()
    return client_context(ca_file) if ca_file else None


def database_tls(require: bool, bin_dir: str) -> dict:
    """What `db describe` shows of a database's TLS: clients to the proxy, proxy to nodes."""
    nodes, reason = postgres_tls(bin_dir)
    return {"require_tls": require,
            "clients": "TLS required" if require else "TLS offered, plaintext allowed",
            "nodes": "on (hostssl only, verify-full from the proxy)" if nodes else "unavailable",
            "nodes_reason": "" if nodes else reason}


# -- the API server ------------------------------------------------------------------------------

def api_certificate(root: Path) -> tuple[Path, Path]:
    """The API server's certificate and key (issued by `dbplane up --api-tls`)."""
    return root / "tls" / "api.crt", root / "tls" / "api.key"


def verify_for(url: str, ca_file: Path | None) -> ssl.SSLContext | bool:
    """What an httpx client of `url` verifies against: the platform CA for https (when the
    file is there; otherwise the system's CAs, and the handshake says what is wrong)."""
    if url.startswith("https://") and ca_file is not None and Path(ca_file).exists():
        return client_context(ca_file)
    return True


# -- etcd's client port -------------------------------------------------------------------------
#
# `dbplane up` runs etcd with https and client-certificate authentication: the server
# certificate and every client's come from the platform CA. All dbplane components (and
# Patroni, as the service account) present the one client certificate of the data root.

ETCD_CLIENT_NAME = "dbplane-etcd-client"     # its common name (etcd's user, if auth is ever on)


def etcd_server_certificate(root: Path) -> tuple[Path, Path]:
    """etcd's own certificate and key (0600, the user that runs etcd)."""
    return root / "tls" / "etcd-server.crt", root / "tls" / "etcd-server.key"


def etcd_client_certificate(root: Path) -> tuple[Path, Path]:
    """The certificate dbplane's processes present to etcd; its key is owned by the
    service account (Patroni, the proxy and the backup worker run as it), mode 0600."""
    return root / "tls" / "etcd-client.crt", root / "tls" / "etcd-client.key"


def etcd_client_tls(root: Path | None) -> EtcdTLS | None:
    """The client certificate of this data root, or None when it has none (an etcd that
    is plain http needs none; an https one then refuses the connection and says so)."""
    if root is None:
        return None
    cert, key = etcd_client_certificate(root)
    if not cert.exists():
        return None
    return EtcdTLS(ca=str(ca.cert_path(root)), cert=str(cert), key=str(key))


@contextlib.contextmanager
def etcd_issuing(root: Path):
    """One issuer at a time: the agents of one data root renew the same files, and a key
    from one with a certificate from another would not match."""
    lock = root / "tls" / ".etcd.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure_etcd_certificates(root: Path, owner: tuple[int, int] | None,
                             server_names: list[str] | None = None) -> list[str]:
    """Issue or renew the etcd client certificate, and with `server_names` also etcd's
    server certificate for those names. etcd reads its certificate on every new
    connection, and clients read theirs at every (re)connection: nothing restarts.
    Returns what was issued and why, e.g. ["etcd client certificate (missing)"]."""
    done = []
    with etcd_issuing(root):
        why = ensure_leaf(root, *etcd_client_certificate(root), [ETCD_CLIENT_NAME], owner)
        if why:
            done.append(f"etcd client certificate ({why})")
        if server_names:
            why = ensure_leaf(root, *etcd_server_certificate(root), server_names, None)
            if why:
                done.append(f"etcd server certificate ({why})")
    return done


def renew_etcd_certificates(root: Path, etcd_url: str, owner: tuple[int, int] | None) -> list[str]:
    """For the agents, on every pass: keep the client certificate of an https etcd fresh,
    and etcd's own certificate if `dbplane up` runs etcd from this data root."""
    if not is_https(etcd_url):
        return []
    server = etcd_server_certificate(root)[0]
    names = ca.names_of(cert) if (cert := ca.load_cert(server)) else None
    return ensure_etcd_certificates(root, owner, names)


def psql_with_tls(bin_dir: str) -> str | None:
    """A psql that speaks TLS: the engine's when its build has OpenSSL, else one on PATH
    (the embedded build's psql has no TLS)."""
    if postgres_tls(bin_dir)[0]:
        return str(Path(bin_dir) / "psql")
    return shutil.which("psql")
