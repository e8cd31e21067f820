"""The platform's internal certificate authority.

One EC P-256 key and a self-signed CA certificate under the data root:

  <root>/ca/ca.crt   the CA certificate (0644): what clients trust (`dbplane ca cert`)
  <root>/ca/ca.key   its private key (0600, never printed, never leaves the host)

Leaf certificates for the proxy, PostgreSQL, Patroni's REST API, the API server and
etcd's client port (its server and the client certificate every component presents) are
issued from it with the names clients connect to as SANs, live LEAF_DAYS and are
re-issued once less than a third of their lifetime is left (security/tls.py). The CA
itself lives CA_DAYS; rotating it is a manual step (docs/security-tls.md).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import DbplaneError
from ..paths import write_private

CA_DAYS = 3650
LEAF_DAYS = 90
RENEW_FRACTION = 1 / 3          # re-issue a leaf when less than this part of its life is left
CA_NAME = "dbplane internal CA"


def ca_dir(root: Path) -> Path:
    return root / "ca"


def cert_path(root: Path) -> Path:
    return ca_dir(root) / "ca.crt"


def key_path(root: Path) -> Path:
    return ca_dir(root) / "ca.key"


class CaMissing(DbplaneError):
    code = "ca_missing"
    status = 503


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _pem_cert(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def ensure_ca(root: Path) -> bool:
    """Create the CA under `root` unless it exists. True if created. Safe when several
    processes race (agents started at once): the CA is built in a private folder that is
    renamed into place, and the loser's is thrown away."""
    if cert_path(root).exists() and key_path(root).exists():
        return False
    if ca_dir(root).exists():
        if cert_path(root).exists() and key_path(root).exists():
            return False                     # another process renamed its CA in just now
        raise CaMissing(f"half a CA in {ca_dir(root)}: ca.crt or ca.key is missing",
                        "restore the missing file from a backup of the data root, or remove "
                        "the folder to create a new CA (every client must then trust the new one)")
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dbplane")])
    now = _now()
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(private.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(private.public_key()), critical=False)
        .sign(private, hashes.SHA256()))
    root.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".ca-", dir=root))
    try:
        write_private(building / "ca.key", _pem_key(private))   # 0600, whoever runs `up`
        write_private(building / "ca.crt", _pem_cert(certificate), mode=0o644)
        building.chmod(0o755)                # the service account reads ca.crt, not ca.key
        try:
            os.rename(building, ca_dir(root))
        except OSError:                      # another process created it first
            if not cert_path(root).exists():
                raise
            return False
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return True


@dataclass(frozen=True)
class Issued:
    cert_pem: str
    key_pem: str


class CertificateAuthority:
    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey):
        self.cert = cert
        self._key = key

    @classmethod
    def load(cls, root: Path) -> CertificateAuthority:
        try:
            cert = x509.load_pem_x509_certificate(cert_path(root).read_bytes())
            key = serialization.load_pem_private_key(key_path(root).read_bytes(), password=None)
        except FileNotFoundError:
            raise CaMissing(f"no dbplane CA in {ca_dir(root)}",
                            "run 'dbplane up' once on this data root, or copy ca.crt and ca.key "
                            "from the host that created the CA") from None
        except PermissionError:
            raise CaMissing(f"cannot read the CA key in {ca_dir(root)} (permission denied)",
                            "run this as the user that ran 'dbplane up'") from None
        return cls(cert, key)

    @property
    def cert_pem(self) -> str:
        return _pem_cert(self.cert)

    def issue(self, names: list[str], days: int = LEAF_DAYS,
              now: datetime.datetime | None = None) -> Issued:
        """A server (and client) certificate for `names`: the first is the common name,
        all are SANs (IP addresses as IP SANs, so verify-full works against an address).
        `now`: when its validity starts (tests make old certificates with it)."""
        names = list(dict.fromkeys(n for n in names if n))
        private = ec.generate_private_key(ec.SECP256R1())
        now = now or _now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(private.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + datetime.timedelta(days=days), self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=True, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([san(n) for n in names]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.cert.public_key()),
                           critical=False)
            .sign(self._key, hashes.SHA256()))
        return Issued(_pem_cert(certificate), _pem_key(private))


# -- reading certificates (ca describe, rotation checks) -----------------------------------

def load_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def names_of(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n.value) for n in ext]


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def renew_at(cert: x509.Certificate) -> datetime.datetime:
    """When a leaf is due for re-issue: with a third of its lifetime left."""
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - life * RENEW_FRACTION


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def needs_issue(cert: x509.Certificate | None, ca: x509.Certificate, names: list[str],
                now: datetime.datetime | None = None) -> str:
    """Why a leaf must be (re-)issued, or "" if it is fine."""
    if cert is None:
        return "missing"
    if not issued_by(cert, ca):
        return "not issued by the platform CA"
    missing = [n for n in names if n and n not in names_of(cert)]
    if missing:
        return f"does not name {', '.join(missing)}"
    if (now or _now()) >= renew_at(cert):
        return f"expires {cert.not_valid_after_utc:%Y-%m-%d}"
    return ""


def leaf_files(root: Path) -> list[tuple[str, Path]]:
    """(what, path) of every leaf certificate issued under this data root."""
    out = [("API server", root / "tls" / "api.crt"),
           ("etcd server", root / "tls" / "etcd-server.crt"),
           ("etcd client (every component)", root / "tls" / "etcd-client.crt")]
    for cert in sorted(root.glob("hosts/*/tls/proxy.crt")):
        out.append((f"proxy on {cert.parent.parent.name}", cert))
    for cert in sorted(root.glob("hosts/*/members/*/tls/server.crt")):
        out.append((f"member {cert.parent.parent.name} (PostgreSQL, Patroni REST API)", cert))
    return [(what, path) for what, path in out if path.exists()]
