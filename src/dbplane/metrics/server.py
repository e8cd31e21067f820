"""The collector's https endpoint, for the API (never for end users directly):

  GET /metrics   the latest scrape in the Prometheus text format
  GET /history?name=M[&since=&until=&step=&agg=][&<label>=<value>...]   JSON series from the
                 history file: {"series": [{"name", "labels", "points": [[t, v], ...]}]}
  GET /log?member=NAME[&bytes=N]   JSON {"host", "member", "text": the last N bytes (by default
                 and at most 4 MiB) of the member's Patroni log, "disk": {"path", "total", "free"}
                 of its data directory}; only members under this host's directory, 400 for a name
                 that is not a member's, 404 for one not here (member_log.py)
  GET /healthz

Only clients presenting a certificate from the platform CA get past the TLS handshake (the
API presents the platform's etcd client certificate). The server certificate is
`<host dir>/tls/collector.crt`, issued by the agent and followed when it is renewed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from dbplane.metrics import exposition, member_log
from dbplane.paths import Layout
from dbplane.security import ca
from dbplane.security.tls import ReloadingServerContext

log = logging.getLogger("dbplane.metrics")

MAX_HISTORY_SPAN = 15 * 86400
MAX_HEAD = 8192


def certificate(root: Path, host_name: str) -> tuple[Path, Path]:
    tls_dir = Layout(root).host_dir(host_name) / "tls"
    return tls_dir / "collector.crt", tls_dir / "collector.key"


def require_client_cert(ctx: ssl.SSLContext, ca_file: Path) -> ssl.SSLContext:
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca_file))
    return ctx


def server_ssl(root: Path, host_name: str) -> ssl.SSLContext:
    """A context that demands a client certificate from the platform CA and switches to the
    renewed server certificate at the next handshake after the agent re-issues it."""
    ca_file = ca.cert_path(root)
    reloading = ReloadingServerContext(*certificate(root, host_name))
    if reloading.context is None:
        raise FileNotFoundError(f"no collector certificate in {certificate(root, host_name)[0].parent}")
    current = {"ctx": require_client_cert(reloading.context, ca_file)}

    def pick(sslobj: ssl.SSLObject, _name, _ctx) -> None:
        if reloading.refresh():
            current["ctx"] = require_client_cert(reloading.context, ca_file)
        if sslobj.context is not current["ctx"]:
            sslobj.context = current["ctx"]

    outer = require_client_cert(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), ca_file)
    outer.minimum_version = ssl.TLSVersion.TLSv1_2
    outer.load_cert_chain(*certificate(root, host_name))
    outer.sni_callback = pick
    return outer


def parse_history_query(query: str, now: float) -> dict:
    """/history's parameters: name (required), since/until (Unix seconds; default the last
    hour), step (seconds), agg (avg|min|max); every other parameter is a label to match."""
    params = dict(parse_qsl(query, keep_blank_values=True))
    name = params.pop("name", "")
    if not name:
        raise ValueError("name is required")
    until = float(params.pop("until", "") or now)
    since = float(params.pop("since", "") or until - 3600)
    step = params.pop("step", "")
    agg = params.pop("agg", "avg") or "avg"
    if agg not in ("avg", "min", "max"):
        raise ValueError("agg must be avg, min or max")
    if not since < until or until - since > MAX_HISTORY_SPAN:
        raise ValueError("need since < until, at most 15 days apart")
    return {"name": name, "match": params, "since": since, "until": until,
            "step": float(step) if step else None, "agg": agg}


async def _member_log(collector, query: str) -> tuple[int, str]:
    """(status, JSON body) of /log: 400 for bad parameters, 404 for a member not on this host.
    The file is read and the body encoded in an executor: a 4 MiB tail must not stall the
    scrapes."""
    try:
        member, max_bytes = member_log.parse_log_query(query)
    except ValueError as e:
        return 400, json.dumps({"error": str(e)})

    def read() -> str:
        return json.dumps(member_log.read(collector.root, collector.host, member, max_bytes))

    try:
        return 200, await asyncio.get_running_loop().run_in_executor(None, read)
    except member_log.UnknownMember as e:
        return 404, json.dumps({"error": str(e)})
    except OSError as e:
        log.warning("reading the log of %s: %s", member, e)
        return 500, json.dumps({"error": str(e)})


async def handle(collector, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        if len(head) > MAX_HEAD:
            raise ValueError("request head too long")
        method, target, _ = head.decode("latin-1").split("\r\n", 1)[0].split(" ", 2)
        url = urlsplit(target)
        ctype, status = "application/json", 200
        if method != "GET":
            status, body = 405, json.dumps({"error": "only GET"})
        elif url.path == "/metrics":
            ctype, body = exposition.CONTENT_TYPE, collector.latest_text
        elif url.path == "/healthz":
            body = json.dumps({"host": collector.host, "scrapes": collector.scrapes,
                               "queries": getattr(collector, "queries", 0), "latest_at": collector.latest_at,
                               "series": len(collector.latest_text.splitlines())})
        elif url.path == "/history":
            try:
                q = parse_history_query(url.query, time.time())
            except ValueError as e:
                status, body = 400, json.dumps({"error": str(e)})
            else:
                try:
                    series = await asyncio.get_running_loop().run_in_executor(
                        None, lambda: collector.history.query(q["name"], q["match"], since=q["since"],
                                                              until=q["until"], step=q["step"], agg=q["agg"]))
                    body = json.dumps({"host": collector.host, "series": [
                        {"name": s.name, "labels": s.labels, "points": s.points} for s in series]})
                except Exception as e:          # a damaged file: say so, keep serving /metrics
                    log.warning("history query failed: %s", e)
                    status, body = 500, json.dumps({"error": f"history unavailable: {e}"})
        elif url.path == "/log":
            status, body = await _member_log(collector, url.query)
        else:
            status, body = 404, json.dumps({"error": "not found"})
        data = body.encode()
        writer.write(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
        await writer.drain()
    except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
        pass
    finally:
        writer.close()


async def start(collector) -> asyncio.Server:
    context = server_ssl(collector.root, collector.host)
    return await asyncio.start_server(lambda r, w: handle(collector, r, w), collector.address, 0,
                                      ssl=context, ssl_handshake_timeout=5)
