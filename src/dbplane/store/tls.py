"""How a client proves itself to an etcd that serves https with client-certificate
authentication: the CA that issued etcd's certificate, and the client's own certificate
and key. The URL's scheme decides whether they are used (http: plaintext, https: TLS);
security/tls.py finds them in a data root, and the agent hands them to the processes it
starts with `argv()`.

The files are read when a connection opens, never kept from an earlier read, so a
re-issued certificate is used from the next connection on."""

from __future__ import annotations

import argparse
import ssl
from dataclasses import dataclass


@dataclass(frozen=True)
class EtcdTLS:
    ca: str          # verifies etcd's certificate (the platform CA)
    cert: str        # presented to etcd
    key: str

    def ssl_context(self) -> ssl.SSLContext:
        """For httpx (the JSON gateway): verify etcd by CA and name, present the certificate."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def argv(self) -> list[str]:
        """The options of a dbplane process started with `--etcd URL` (see add_arguments)."""
        return ["--etcd-cacert", self.ca, "--etcd-cert", self.cert, "--etcd-key", self.key]

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--etcd-cacert", help="CA file that verifies etcd's certificate (https)")
        parser.add_argument("--etcd-cert", help="client certificate presented to etcd (https)")
        parser.add_argument("--etcd-key", help="its private key")

    @staticmethod
    def from_args(args: argparse.Namespace) -> EtcdTLS | None:
        if not (args.etcd_cacert and args.etcd_cert and args.etcd_key):
            return None
        return EtcdTLS(ca=args.etcd_cacert, cert=args.etcd_cert, key=args.etcd_key)


def is_https(url: str) -> bool:
    return url.startswith("https://")


def unreachable_hint(url: str, tls: EtcdTLS | None) -> str:
    if is_https(url) and tls is None:
        return ("this data root has no etcd client certificate (tls/etcd-client.crt): run 'dbplane up', "
                "or 'dbplane ca etcd-certs' where the CA key is, and copy it (docs/security-tls.md)")
    return "start the platform with 'dbplane up' or point --etcd at a running etcd"
