"""`dbplane ca ...`: the platform's internal certificate authority. `ca cert` exports the
CA certificate clients trust (sslmode=verify-full); `ca describe` shows it and every
certificate issued from it, with expiry dates. Both read the local data root; the CA's
private key is never shown."""

from __future__ import annotations

import datetime
from pathlib import Path

import typer

from ..errors import PlatformNotRunning
from ..paths import Layout, write_private
from ..security import ca, tls
from ..system import ensure_service_account, postgres_bin_dir
from . import render
from .common import Output, OutputOpt, root

ca_app = typer.Typer(no_args_is_help=True, help="The platform's certificate authority: export "
                     "it for clients, see what it issued and when that expires.")


def _authority_cert(data_root: Path):
    cert = ca.load_cert(ca.cert_path(data_root))
    if cert is None:
        raise ca.CaMissing(f"no dbplane CA in {ca.ca_dir(data_root)}",
                           "start the platform once with 'dbplane up', or pass --data-dir")
    return cert


@ca_app.command("cert")
def ca_cert(out: Path | None = typer.Option(None, "--out", help="write it to this file "
                                             "(default: print it)")):
    """The CA certificate (PEM) for clients: e.g. psql 'sslmode=verify-full sslrootcert=FILE'."""
    data_root = root()
    _authority_cert(data_root)
    pem = ca.cert_path(data_root).read_text()
    if out is None:
        render.console.out(pem, end="", highlight=False)
        return
    write_private(out, pem, mode=0o644)
    render.err_console.print(f"wrote the dbplane CA certificate to {out}")


def _day(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _leaf_row(what: str, path: Path, authority, now: datetime.datetime) -> dict:
    cert = ca.load_cert(path)
    if cert is None:
        return {"certificate": what, "path": str(path), "state": "unreadable"}
    left = cert.not_valid_after_utc - now
    state = ("expired" if left.total_seconds() <= 0 else
             "not from this CA" if not ca.issued_by(cert, authority) else
             "renewing" if now >= ca.renew_at(cert) else "valid")
    return {"certificate": what, "path": str(path), "names": ca.names_of(cert),
            "not_after": _day(cert.not_valid_after_utc), "renews_after": _day(ca.renew_at(cert)),
            "days_left": max(0, left.days), "state": state}


@ca_app.command("etcd-certs")
def ca_etcd_certs(server_name: list[str] = typer.Option(
        [], "--server-name", help="also issue etcd's server certificate for this address or host "
        "name (repeatable): for an etcd you run yourself")):
    """Issue the etcd client certificate of this data root (and with --server-name etcd's own),
    for components started one by one: copy them to the other hosts' data roots."""
    data_root = root()
    if ca.ensure_ca(data_root):            # the first step of a platform started by hand
        render.err_console.print(f"created the platform CA in {ca.ca_dir(data_root)}")
    run_as = ensure_service_account()
    owner = (run_as.uid, run_as.gid) if run_as else None
    for what in tls.ensure_etcd_certificates(data_root, owner, server_name or None):
        render.err_console.print(f"issued the {what}")
    client, client_key = tls.etcd_client_certificate(data_root)
    say = render.console.print
    say(f"client certificate  {client}, {client_key} (0600, the service account)", highlight=False)
    say(f"CA                  {ca.cert_path(data_root)}", highlight=False)
    if server_name:
        cert, key = tls.etcd_server_certificate(data_root)
        say(f"run etcd with       --cert-file {cert} --key-file {key} --client-cert-auth "
            f"--trusted-ca-file {ca.cert_path(data_root)} and https:// client URLs", highlight=False)
    say("on another host, copy the CA certificate and the client certificate and key to the same "
        "paths under its data root (the key owned by the service account, 0600)", highlight=False)


@ca_app.command("describe")
def ca_describe(output: Output = OutputOpt):
    """The CA (fingerprint, validity), node TLS, and every certificate issued from it."""
    data_root = root()
    authority = _authority_cert(data_root)
    now = datetime.datetime.now(datetime.UTC)
    try:
        bin_dir = Layout(data_root).read_platform().pg_bin_dir or postgres_bin_dir()
    except PlatformNotRunning:           # a data root of components started one by one
        bin_dir = postgres_bin_dir()
    node_tls, reason = tls.postgres_tls(bin_dir)
    data = {
        "ca": {"subject": authority.subject.rfc4514_string(), "path": str(ca.cert_path(data_root)),
               "sha256_fingerprint": ca.fingerprint(authority),
               "not_before": _day(authority.not_valid_before_utc),
               "not_after": _day(authority.not_valid_after_utc),
               "days_left": max(0, (authority.not_valid_after_utc - now).days)},
        "node_tls": {"state": "on (hostssl only)" if node_tls else "unavailable", "reason": reason},
        "certificates": [_leaf_row(what, path, authority, now) for what, path in ca.leaf_files(data_root)],
    }
    if output == Output.json:
        render.as_json(data)
        return
    c = data["ca"]
    con = render.console
    con.print(f"[bold]{c['subject']}[/bold]  {c['path']}", highlight=False)
    con.print(f"  sha256       {c['sha256_fingerprint']}", highlight=False)
    con.print(f"  valid        {c['not_before']} .. {c['not_after']} ({c['days_left']} days left)")
    con.print(f"  node TLS     {data['node_tls']['state']}: {data['node_tls']['reason']}", highlight=False)
    rows = [{**r, "names": ", ".join(r.get("names", []))} for r in data["certificates"]]
    render.table(rows, [("certificate", "CERTIFICATE"), ("names", "NAMES"), ("not_after", "EXPIRES"),
                        ("renews_after", "RENEWS AFTER"), ("state", "STATE")])
