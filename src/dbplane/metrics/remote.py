"""The collectors as the API sees them: find them in etcd, fetch their /metrics and /history
concurrently over https (presenting the platform's etcd client certificate, the internal
identity they demand), and merge what they return; fetch members' log tails and disk space
from their hosts' /log for the doctor and performance insights.

Merging expositions: every collector renders whole families, so the same family arrives
once per host. The platform's scrape has each family once (one HELP, one TYPE, in catalogue
order) with the series of every host; a series that two collectors both report (only during
a failover, for the database-level backup series) is kept once, from the first answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from dbplane.metrics import catalog, exposition
from dbplane.metrics.catalog import Sample
from dbplane.models import CollectorInstance, Host
from dbplane.security import ca
from dbplane.security.tls import client_context, etcd_client_tls
from dbplane.store import Store, keys

log = logging.getLogger("dbplane.metrics")

SCRAPE_TIMEOUT = 3.0        # per collector: the platform scrape waits no longer for a slow host
LOG_TIMEOUT = 5.0           # per member: a log tail of up to 4 MiB from its host's collector


@dataclass
class Family:
    help: str = ""
    type: str = ""
    series: dict[str, str] = field(default_factory=dict)     # series text (name{labels}) -> value


def _series_key(line: str) -> tuple[str, str, str]:
    """(metric name, series text, value) of a sample line; the value is the last field."""
    series, _, value = line.rstrip().rpartition(" ")
    name = series.split("{", 1)[0]
    return name, series, value


def merge(texts: list[str]) -> str:
    """One exposition from several: families merged by name, each HELP and TYPE once, in the
    catalogue's order (unknown families after, by name); the first of duplicate series wins."""
    families: dict[str, Family] = {}
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                kind, _, rest = line[2:].partition(" ")
                name, _, what = rest.partition(" ")
                fam = families.setdefault(name, Family())
                if kind == "HELP" and not fam.help:
                    fam.help = what
                elif kind == "TYPE" and not fam.type:
                    fam.type = what
                continue
            if line.startswith("#"):
                continue
            name, series, value = _series_key(line)
            families.setdefault(name, Family()).series.setdefault(series, value)
    order = [m.name for m in catalog.METRICS if m.name in families]
    order += sorted(set(families) - set(order))
    out = []
    for name in order:
        fam = families[name]
        if not fam.series:
            continue
        if fam.help:
            out.append(f"# HELP {name} {fam.help}")
        if fam.type:
            out.append(f"# TYPE {name} {fam.type}")
        out += [f"{series} {value}" for series, value in fam.series.items()]
    return "".join(line + "\n" for line in out)


def client(root: Path | None, timeout: float = SCRAPE_TIMEOUT) -> httpx.AsyncClient | None:
    """An https client that verifies collectors by the platform CA and presents the etcd
    client certificate; None when this data root has none (the API then reports every
    collector down, with a log line)."""
    etcd_tls = etcd_client_tls(root)
    if root is None or etcd_tls is None:
        return None
    ctx = client_context(ca.cert_path(root))
    ctx.load_cert_chain(etcd_tls.cert, etcd_tls.key)
    return httpx.AsyncClient(verify=ctx, timeout=timeout)


def base_url(c: CollectorInstance) -> str:
    address = f"[{c.address}]" if ":" in c.address else c.address
    return f"https://{address}:{c.port}"


async def collectors(store: Store) -> list[CollectorInstance]:
    return sorted(await store.list(keys.metrics_collectors(), CollectorInstance), key=lambda c: c.host)


async def scrape(store: Store, root: Path | None) -> str:
    """The whole platform's exposition: every registered collector's latest scrape, plus
    `dbplane_collector_up` per host (0 for a host whose collector did not answer or is not
    registered)."""
    found = await collectors(store)
    hosts = {h.name: h for h in await store.list(keys.hosts(), Host)}
    http = client(root)
    if http is None:
        log.warning("cannot reach the metrics collectors: no etcd client certificate in %s", root)

    async def one(c: CollectorInstance) -> str | None:
        if http is None:
            return None
        try:
            r = await http.get(base_url(c) + "/metrics")
            r.raise_for_status()
            return r.text
        except httpx.HTTPError as e:
            log.warning("metrics collector of %s (%s) did not answer: %s", c.host, base_url(c), e)
            return None

    try:
        texts = await asyncio.gather(*(one(c) for c in found))
    finally:
        if http is not None:
            await http.aclose()
    now = time.time()
    up = {c.host: (c.zone, 1.0 if text is not None else 0.0) for c, text in zip(found, texts, strict=True)}
    for name, h in hosts.items():
        up.setdefault(name, (h.zone, 0.0))
    own = exposition.render(Sample("dbplane_collector_up", {"host": name, "zone": zone}, value, now)
                            for name, (zone, value) in sorted(up.items()))
    return merge([own, *(t for t in texts if t is not None)])


async def history(store: Store, root: Path | None, name: str, match: dict[str, str], since: float,
                  until: float, step: float | None) -> tuple[list[dict], list[str]]:
    """Series of metric `name` matching `match` from every collector's history, merged by
    labels (a series that moved between hosts, such as a database's backup age after a
    failover, has its points joined in time order). Also: hosts whose collector failed."""
    found = await collectors(store)
    http = client(root)
    failed: list[str] = []
    if http is None:
        return [], [c.host for c in found]
    params = {**match, "name": name, "since": str(since), "until": str(until)}
    if step:
        params["step"] = str(step)

    async def one(c: CollectorInstance) -> list[dict]:
        try:
            r = await http.get(base_url(c) + "/history", params=params)
            r.raise_for_status()
            return r.json()["series"]
        except (httpx.HTTPError, ValueError, KeyError) as e:
            log.warning("metrics history of %s: %s", c.host, e)
            failed.append(c.host)
            return []

    try:
        answers = await asyncio.gather(*(one(c) for c in found))
    finally:
        await http.aclose()
    merged: dict[tuple, dict] = {}
    for series_list in answers:
        for s in series_list:
            key = tuple(sorted(s["labels"].items()))
            into = merged.setdefault(key, {"name": s["name"], "labels": s["labels"], "points": []})
            into["points"].extend(s["points"])
    out = []
    for key in sorted(merged):
        s = merged[key]
        s["points"] = sorted({p[0]: p for p in s["points"]}.values())
        out.append(s)
    return out, sorted(failed)


@dataclass
class MemberLog:
    """A member's log tail and disk as its host's collector read them, or why they could not
    be read (`error`)."""
    member: str
    host: str
    text: str = ""
    disk: dict | None = None            # {"path", "total", "free"} of the member's data directory
    error: str = ""

    @property
    def note(self) -> str:
        return f"the log of {self.member} could not be read: {self.error}"


async def member_logs(store: Store, root: Path | None, members: list[tuple[str, str]],
                      max_bytes: int) -> list[MemberLog]:
    """The last `max_bytes` of each (member, host)'s log and its disk space, from the member's
    host's collector (GET /log), every member at once, in the order given. A host without a
    registered collector, one that does not answer within LOG_TIMEOUT or refuses leaves the
    member's `error` set (and a log line); nothing raises."""
    found = {c.host: c for c in await collectors(store)}
    http = client(root, LOG_TIMEOUT)

    async def one(member: str, host: str) -> MemberLog:
        out = MemberLog(member=member, host=host)
        c = found.get(host)
        if http is None:
            out.error = f"no etcd client certificate in {root} to reach the collector on host {host}"
        elif c is None:
            out.error = f"no collector is registered for host {host} (is its agent running?)"
        else:
            await _fetch_log(http, c, out, max_bytes)
        if out.error:
            log.warning("log of %s: %s", member, out.error)
        return out

    try:
        return list(await asyncio.gather(*(one(m, h) for m, h in members)))
    finally:
        if http is not None:
            await http.aclose()


async def _fetch_log(http: httpx.AsyncClient, c: CollectorInstance, out: MemberLog, max_bytes: int) -> None:
    """Fill in `out` from c's GET /log: its text and disk, or its error."""
    try:
        r = await http.get(base_url(c) + "/log", params={"member": out.member, "bytes": str(max_bytes)})
        if r.status_code != 200:
            out.error = f"collector on host {c.host} answered {r.status_code}: {_error_of(r)}"
            return
        data = r.json()
        disk = data.get("disk")
        out.text = str(data["text"])
        out.disk = None if disk is None else {
            "path": str(disk["path"]), "total": int(disk["total"]), "free": int(disk["free"])}
    except httpx.HTTPError as e:
        why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        out.error = f"collector on host {c.host} did not answer: {why}"
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        out.text, out.disk = "", None
        out.error = f"collector on host {c.host} gave an answer that does not read: {e!r}"


def _error_of(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"])
    except (ValueError, KeyError, TypeError):
        return r.text[:200]
