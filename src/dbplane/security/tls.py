"""Self-signed TLS certificates, so that TLS works out of the box (the proxy offers it to
clients). A platform CA and rotation are the security issue's to add."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..paths import write_private


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def ensure_self_signed(cert: Path, key: Path, names: list[str], owner: tuple[int, int] | None,
                       days: int = 825) -> bool:
    """Write a certificate for `names` and its key (0600) unless both exist. True if written."""
    if cert.exists() and key.exists():
        return False
    private = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(private.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in dict.fromkeys(names)]), critical=False)
        .sign(private, hashes.SHA256()))
    cert.parent.mkdir(parents=True, exist_ok=True)
    write_private(key, private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()).decode(), owner=owner)
    write_private(cert, certificate.public_bytes(serialization.Encoding.PEM).decode(), owner=owner)
    cert.chmod(0o644)
    return True
