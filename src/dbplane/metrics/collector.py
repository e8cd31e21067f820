"""The metrics collector: one per host, started by the agent as the service account.

It samples each local member's PostgreSQL (one reused connection per member, short
timeouts) and its processes every `metrics_interval` seconds of the member's database (1-60,
10 by default: `dbplane db modify NAME --metrics-interval 1`); every `interval` seconds
(10) the host (psutil), the local proxies' pools (their admin /stats) and, for databases
whose primary runs here, the backup catalog and archive state from etcd (so exactly one
host reports them). A member it cannot reach yields `dbplane_member_up 0` and nothing else.

The scrape is kept in memory for GET /metrics and appended to the host's history file
(`<root>/hosts/<host>/metrics/history.db`, this process its only writer). The collector
registers its https address under `metrics/collectors/<host>` with a lease, so the API
finds it; metrics never go through etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg

from dbplane.metrics import exposition, host, load, pg, services
from dbplane.metrics.catalog import Sample
from dbplane.metrics.history import HistoryWriter
from dbplane.models import (
    ArchiveStatus,
    BackupRecord,
    CollectorInstance,
    DatabaseSpec,
    MemberSpec,
    ProxyInstance,
)
from dbplane.paths import Layout
from dbplane.security import audit, db_secrets
from dbplane.security.tls import node_libpq_options
from dbplane.store import Store, keys
from dbplane.store.etcd import serve_until
from dbplane.store.tls import EtcdTLS

log = logging.getLogger("dbplane.metrics")

PG_CONNECT_TIMEOUT = 2        # seconds to open a connection to a member
PG_SCRAPE_TIMEOUT = 3.0       # seconds for one member's queries, connection included
PROXY_TIMEOUT = 1.0
DEFAULT_INTERVAL = 10.0       # host, proxy and backup samples; members follow their database's setting
TOPOLOGY_EVERY = 2.0          # seconds between reads of placement and settings from etcd


def history_path(root: Path, host_name: str) -> Path:
    return Layout(root).host_dir(host_name) / "metrics" / "history.db"


@dataclass
class MemberConn:
    conn: psycopg.AsyncConnection
    password: str


class Collector:
    def __init__(self, etcd_url: str, host_name: str, zone: str, address: str, root: Path,
                 interval: float = DEFAULT_INTERVAL, etcd_tls: EtcdTLS | None = None,
                 history_file: Path | None = None, clock=time.monotonic):
        self.etcd_url, self.etcd_tls = etcd_url, etcd_tls
        self.host, self.zone, self.address, self.root = host_name, zone, address, root
        self.interval = interval
        self.clock = clock                     # monotonic seconds: when targets are due
        self.history_file = history_file or history_path(root, host_name)
        self.history: HistoryWriter | None = None
        self.port = 0
        self.latest: list[Sample] = []
        self.latest_text = ""
        self.latest_at = 0.0
        self.scrapes = 0
        self.queries = 0                       # SQL statements sent, for the benchmark
        self._conns: dict[str, MemberConn] = {}
        self._latest: dict[str, list[Sample]] = {}      # target (member, host, proxy, backup) -> samples
        self._primary: dict[str, bool] = {}             # member -> primary at its last scrape
        self._member_due: dict[str, float] = {}         # member -> monotonic time of its next scrape
        self._host_due = 0.0
        self._load: dict[str, load.LoadWindow] = {}    # member -> its load samples since the last flush
        self._load_due = 0.0                            # next pg_stat_activity sample (every second)
        self._flush_due = self.clock() + load.FLUSH_SECONDS
        self._topology_at = -TOPOLOGY_EVERY
        self.members: list[MemberSpec] = []             # every database's placement
        self.mine: list[MemberSpec] = []                # the members on this host
        self.intervals: dict[str, float] = {}           # database -> its metrics_interval
        self.leaders: dict[str, str] = {}               # database -> Patroni leader
        self._stopping = asyncio.Event()
        self._http: httpx.AsyncClient | None = None
        host.host_samples({"host": host_name, "zone": zone}, root, time.time())   # primes cpu_percent

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self, server_start) -> None:
        """`server_start(collector)`: coroutine that starts the https server and returns it."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        self.history = HistoryWriter(self.history_file)
        self._http = httpx.AsyncClient(timeout=PROXY_TIMEOUT)
        server = await server_start(self)
        self.port = server.sockets[0].getsockname()[1]
        log.info("collector of %s serving https on %s:%d, every %gs", self.host, self.address, self.port,
                 self.interval)
        try:
            await serve_until(self._stopping, self.etcd_url, self.etcd_tls, self._serve)
        finally:
            server.close()
            for mc in self._conns.values():
                with contextlib.suppress(Exception):
                    await mc.conn.close()
            await self._http.aclose()
            self.history.close()
        log.info("collector of %s stopped", self.host)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), max(seconds, 0))

    def registration(self) -> CollectorInstance:
        return CollectorInstance(host=self.host, zone=self.zone, address=self.address, port=self.port,
                                 pid=os.getpid(), interval=self.interval)

    async def _serve(self, store: Store) -> None:
        ttl = max(10, int(self.interval * 3))
        me = self.registration()
        registration = await store.register(keys.metrics_collector(self.host), me, ttl)
        key_use_reported = time.monotonic()
        try:
            while not self._stopping.is_set():
                await registration.keep()
                await self.collect(store)
                if time.monotonic() - key_use_reported > 60:     # opening secrets uses a KMS key
                    key_use_reported = time.monotonic()
                    await audit.record_key_use(store, f"service/metrics-collector@{self.host}", self.address)
                await self._sleep(self.next_due() - self.clock())
            await store.delete(keys.metrics_collector(self.host))
        finally:
            with contextlib.suppress(Exception):
                await audit.flush(store)

    # -- scheduling: each member at its database's metrics_interval, the rest every interval

    def next_due(self) -> float:
        return min([self._host_due, self._load_due, *self._member_due.values()])

    async def _refresh_topology(self, store: Store) -> None:
        """Placement, each local database's interval and its Patroni leader, read at most every
        TOPOLOGY_EVERY seconds (a 1 s interval must not mean 1 s of etcd reads)."""
        if self.clock() - self._topology_at < TOPOLOGY_EVERY:
            return
        self.members = [m for m in await store.list(keys.members(), MemberSpec) if not m.deleting]
        mine = [m for m in self.members if m.host == self.host and not m.stopped]
        self.intervals, self.leaders = {}, {}
        for db in {m.database for m in mine}:
            spec = await store.get(keys.database_spec(db), DatabaseSpec)
            self.intervals[db] = float(spec.metrics_interval) if spec else self.interval
            raw = await store.get_raw(keys.patroni_scope(db) + "leader")
            self.leaders[db] = raw.decode() if raw else ""
        self.mine = mine
        self._topology_at = self.clock()

    async def collect(self, store: Store) -> list[Sample]:
        """Scrape what is due; keep the newest samples of every target for /metrics and append
        the new ones to the history."""
        if min([self._host_due, *self._member_due.values()]) <= self.clock():
            await self._refresh_topology(store)      # not for the load samples alone (every second)
        now, mono = time.time(), self.clock()
        names = {m.name for m in self.mine}
        for gone in set(self._member_due) - names:
            self._member_due.pop(gone)
            self._latest.pop(gone, None)
            self._primary.pop(gone, None)
            self._load.pop(gone, None)
        self._forget_connections(names)
        due = [m for m in self.mine if self._member_due.get(m.name, 0.0) <= mono]
        by_db: dict[str, list[MemberSpec]] = {}
        for m in self.members:
            by_db.setdefault(m.database, []).append(m)
        results = await asyncio.gather(*(self.scrape_member(store, m, by_db[m.database], self.leaders, now)
                                         for m in due))
        fresh: list[Sample] = []
        for m, (member_samples, is_primary) in zip(due, results, strict=True):
            self._latest[m.name] = member_samples
            self._primary[m.name] = is_primary
            self._member_due[m.name] = mono + self.intervals.get(m.database, self.interval)
            fresh += member_samples
        if self._load_due <= mono:
            fresh += await self.sample_load(time.time(), self.clock())
        if self._host_due <= mono:
            self._host_due = mono + self.interval
            primaries = [m.database for m in self.mine if self._primary.get(m.name)]
            for target, work in (
                    ("proxy", self.scrape_proxies(store, {m.database for m in self.members}, now)),
                    ("backup", self.scrape_backups(store, primaries, now)),
                    ("host", asyncio.get_running_loop().run_in_executor(
                        None, host.host_samples, {"host": self.host, "zone": self.zone}, self.root, now))):
                self._latest[target] = await self.timed(target, work)
                fresh += self._latest[target]
        if fresh:
            self.latest = [s for samples in self._latest.values() for s in samples]
            self.latest_at = now
            self.latest_text = exposition.render(self.latest)
            self.scrapes += 1
            await asyncio.get_running_loop().run_in_executor(None, self.history.write, fresh)
        return fresh

    async def timed(self, target: str, work) -> list[Sample]:
        t0 = time.monotonic()
        try:
            out = list(await work)
        except Exception as e:           # one source failing must not lose the others
            log.warning("scraping %s: %s", target, e)
            out = []
        out.append(self._duration(target, time.monotonic() - t0))
        return out

    def _duration(self, target: str, seconds: float) -> Sample:
        return Sample("dbplane_collector_scrape_duration_seconds",
                      {"host": self.host, "zone": self.zone, "target": target}, seconds, time.time())

    @staticmethod
    def member_labels(m: MemberSpec, role: str) -> dict[str, str]:
        return {"database": m.database, "member": m.name, "role": role, "zone": m.zone}

    async def scrape_member(self, store: Store, m: MemberSpec, peers: list[MemberSpec],
                            leaders: dict[str, str], now: float) -> tuple[list[Sample], bool]:
        t0 = time.monotonic()
        data_dir = self.root / "hosts" / self.host / "members" / m.name / "data"
        try:
            reading = await asyncio.wait_for(self._read(store, m), PG_SCRAPE_TIMEOUT)
        except Exception as e:
            await self._drop(m.name)
            log.debug("member %s unreachable: %s", m.name, e)
            # role as Patroni last saw it: the leader key names the primary
            role = "primary" if leaders.get(m.database) == m.name else pg.role_of(True, m.kind)
            out = pg.down_samples(self.member_labels(m, role), now)
            out.append(self._duration(m.name, time.monotonic() - t0))
            return out, False
        primary = not reading.general["in_recovery"]
        labels = self.member_labels(m, pg.role_of(reading.general["in_recovery"], m.kind))
        replicas = {p.name: self.member_labels(p, pg.role_of(True, p.kind))
                    for p in peers if p.name != m.name}
        out = pg.member_samples(reading, labels, now, replicas)
        out += await asyncio.get_running_loop().run_in_executor(
            None, host.process_samples, data_dir, labels, now)
        out.append(self._duration(m.name, time.monotonic() - t0))
        return out, primary

    async def _read(self, store: Store, m: MemberSpec) -> pg.PgReading:
        mc = self._conns.get(m.name)
        if mc is None or mc.conn.closed:
            secrets = await db_secrets.load(store, keys.secrets(m.database))
            if secrets is None:
                raise LookupError(f"no secrets for {m.database}")
            conn = await psycopg.AsyncConnection.connect(
                host=m.address, port=m.pg_port, user="postgres", password=secrets.superuser,
                dbname="postgres", autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT,
                application_name="dbplane-metrics", options="-c statement_timeout=2000",
                **node_libpq_options())
            mc = self._conns[m.name] = MemberConn(conn, secrets.superuser)
        reading = await pg.read_member(mc.conn)
        self.queries += reading.queries
        return reading

    async def sample_load(self, now: float, mono: float) -> list[Sample]:
        """Performance insights (load.py): one pg_stat_activity sample of every local member
        whose connection is open, every second; every FLUSH_SECONDS the averages as samples
        (kept in `_latest["load"]` for /metrics, and returned for the history)."""
        self._load_due = mono + load.SAMPLE_SECONDS

        async def one(m: MemberSpec) -> None:
            mc = self._conns.get(m.name)
            if mc is None or mc.conn.closed:
                return                  # the next scrape reconnects; no sample meanwhile
            try:
                rows = await asyncio.wait_for(load.sample(mc.conn), 1.0)
            except Exception as e:
                log.debug("load sample of %s: %s", m.name, e)
                await self._drop(m.name)
                return
            self.queries += 1
            self._load.setdefault(m.name, load.LoadWindow()).add(rows)

        await asyncio.gather(*(one(m) for m in self.mine))
        if mono < self._flush_due:
            return []
        self._flush_due = mono + load.FLUSH_SECONDS
        out: list[Sample] = []
        for m in self.mine:
            window = self._load.get(m.name)
            if window is not None:
                role = pg.role_of(not self._primary.get(m.name, False), m.kind)
                out += window.flush(self.member_labels(m, role), now)
        self._latest["load"] = out
        return out

    async def _drop(self, member: str) -> None:
        mc = self._conns.pop(member, None)
        if mc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(mc.conn.close(), 1.0)

    def _forget_connections(self, keep: set[str]) -> None:
        for name in set(self._conns) - keep:
            mc = self._conns.pop(name)
            asyncio.ensure_future(mc.conn.close())

    async def scrape_proxies(self, store: Store, databases: set[str], now: float) -> list[Sample]:
        proxies = [p for p in await store.list(keys.proxy_instances(), ProxyInstance) if p.host == self.host]
        if not proxies:
            return []

        async def stats(p: ProxyInstance) -> dict | None:
            address = f"[{p.address}]" if ":" in p.address else p.address
            try:
                r = await self._http.get(f"http://{address}:{p.admin_port}/stats")
                r.raise_for_status()
                return r.json()
            except (httpx.HTTPError, ValueError) as e:
                log.debug("proxy %s: %s", p.id, e)
                return None

        answers = [a for a in await asyncio.gather(*(stats(p) for p in proxies)) if a is not None]
        if not answers:
            return []
        return services.proxy_samples(answers, self.host, self.zone, now, databases)

    async def scrape_backups(self, store: Store, databases: list[str], now: float) -> list[Sample]:
        out = []
        for db in sorted(databases):
            backups = await store.list(keys.backups(db), BackupRecord)
            archive = await store.get(keys.archive_status(db), ArchiveStatus)
            out += services.backup_samples(db, backups, archive, now)
        return out
