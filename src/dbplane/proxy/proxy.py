"""The proxy process: one or more per host, started by the agent.

It serves every database of the platform on the database's two stable ports (writer and
reader), bound with SO_REUSEPORT so that all proxies of a machine share them and the
kernel spreads connections across them. It follows etcd (specs, placement, Patroni's
leader key) through a watch, registers itself under a lease, and answers a small HTTP
endpoint for stats and for cancel requests that reached the wrong proxy.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path

import httpx

from .. import pgwire as wire
from ..errors import DbplaneError
from ..models import (
    DatabaseSecrets,
    DatabaseSpec,
    MemberSpec,
    ProxyDrain,
    ProxyInstance,
    ProxyLimits,
    ProxyPorts,
)
from ..parameters import require_tls
from ..security import audit, db_secrets
from ..security.tls import ReloadingServerContext, node_context
from ..store import Store, keys
from ..store.etcd import serve_until
from ..store.tls import EtcdTLS
from . import server
from .allowlist import Gate, Gatekeeper
from .client import ClientConn, new_key, new_pid
from .cluster import Cluster, Topology
from .iam_login import IamLogin
from .limits import proxy_budget

log = logging.getLogger("dbplane.proxy")

INSTANCE_TTL = 6
PASS_INTERVAL = 2.0
DRAIN_MAX_AGE = 60.0      # as the controller's: an older drain is ignored
RATE_WINDOW = 10          # seconds over which tps/qps are averaged


class Listener:
    def __init__(self, cluster: Cluster, role: str, port: int):
        self.cluster = cluster
        self.role = role
        self.port = port
        self.server: asyncio.AbstractServer | None = None


class Proxy:
    def __init__(self, etcd_url: str, proxy_id: str, host: str, address: str, tls_dir: Path | None,
                 etcd_tls: EtcdTLS | None = None):
        self.etcd_url = etcd_url
        self.etcd_tls = etcd_tls                  # the client certificate for an https etcd
        self.id = proxy_id
        self.host = host
        self.address = address
        # the certificate clients see, issued by the platform CA and re-read when re-issued
        self._server_cert = ReloadingServerContext(tls_dir / "proxy.crt", tls_dir / "proxy.key") \
            if tls_dir is not None else None
        self.require_tls: dict[str, bool] = {}    # database -> refuse plaintext clients
        # where the nodes offer TLS the leg to them is verified against the CA (verify-full)
        server.node_tls = node_context()
        # the agent's host folder: if it disappears, the platform was removed under us
        self.host_dir = tls_dir.parent if tls_dir is not None else None
        self.login_timeout = 15.0
        self.clusters: dict[str, Cluster] = {}
        self.store: Store | None = None           # the etcd session of the moment (audit, IAM)
        self.iam_login: IamLogin | None = None    # checks IAM database tokens
        self.listeners: dict[int, Listener] = {}
        self.clients: dict[int, ClientConn] = {}
        self.gatekeeper = Gatekeeper()        # network allowlists, checked before anything is read
        self.peers: list[ProxyInstance] = []
        self.admin_port = 0
        self._drained: dict[str, str] = {}        # db -> operation acknowledged
        self._rates: collections.deque = collections.deque(maxlen=RATE_WINDOW + 1)
        self._stopping = asyncio.Event()
        self._http: httpx.AsyncClient | None = None

    @property
    def tls(self):
        """The SSLContext for clients' TLS handshakes, or None without a certificate."""
        return self._server_cert.context if self._server_cert is not None else None

    # -- clients -----------------------------------------------------------------------

    def client_opened(self, client: ClientConn) -> None:
        client.cluster.clients += 1

    def over_client_limit(self, client: ClientConn) -> bool:
        """Checked after the startup packet (an error before it would break the TLS
        negotiation), as PostgreSQL does for max_connections."""
        cluster = client.cluster
        limit = cluster.settings.max_client_connections
        if cluster.clients <= limit:
            return False
        client.fatal("53300", f"too many client connections to database {cluster.name} through this "
                     f"proxy (limit {limit} per proxy)",
                     "raise it with 'dbplane proxy modify " + cluster.name +
                     " --max-client-connections N', or use fewer connections")
        return True

    def register_client(self, client: ClientConn) -> tuple[int, bytes]:
        pid = new_pid()
        while pid in self.clients:
            pid = new_pid()
        self.clients[pid] = client
        return pid, new_key()

    def client_closed(self, client: ClientConn) -> None:
        client.cluster.clients -= 1
        if self.clients.get(client.pid) is client:
            del self.clients[client.pid]

    def cancel(self, pid: int, key: bytes) -> None:
        client = self.clients.get(pid)
        if client is not None:
            if client.key == key:
                client.cancel()
            return
        # the client may be connected to another proxy sharing the port
        for peer in self.peers:
            if peer.id != self.id:
                asyncio.ensure_future(self._forward_cancel(peer, pid, key))

    async def _forward_cancel(self, peer: ProxyInstance, pid: int, key: bytes) -> None:
        with contextlib.suppress(httpx.HTTPError):
            await self._http.post(f"http://{peer.address}:{peer.admin_port}/cancel",
                                  json={"pid": pid, "key": key.hex()}, timeout=2)

    def send_cancel(self, address: str, port: int, pid: int, key: bytes) -> None:
        async def send():
            with contextlib.suppress(OSError, TimeoutError):
                _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), 5)
                writer.write(wire.cancel_request(pid, key))
                await writer.drain()
                writer.close()
        asyncio.ensure_future(send())

    # -- main loop ---------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        log.info("proxy %s starting on %s (event loop %s)", self.id, self.address, type(loop).__module__)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        self._http = httpx.AsyncClient()
        admin = await asyncio.start_server(self._admin, self.address, 0)
        self.admin_port = admin.sockets[0].getsockname()[1]
        ticker = asyncio.ensure_future(self._tick())
        try:
            await serve_until(self._stopping, self.etcd_url, self.etcd_tls, self._serve,
                              "retrying (clients keep being served)")
        finally:
            ticker.cancel()
            admin.close()
            for listener in self.listeners.values():
                if listener.server is not None:
                    listener.server.close()
            for cluster in self.clusters.values():
                cluster.close()
            await self._http.aclose()
        log.info("proxy %s stopped", self.id)

    async def _serve(self, store: Store) -> None:
        self.store, self.iam_login = store, IamLogin(store)
        me = ProxyInstance(id=self.id, host=self.host, address=self.address, admin_port=self.admin_port,
                           pid=os.getpid())
        registration = await store.register(keys.proxy_instance(self.id), me, INSTANCE_TTL)
        log.info("proxy %s registered (admin port %d)", self.id, self.admin_port)
        changes = store.changes(keys.databases(), keys.members(), keys.ROOT + "secrets/", keys.proxy_root(),
                                keys.PATRONI_NAMESPACE + "/")
        key_use_reported = time.monotonic()
        try:
            while not self._stopping.is_set():
                await registration.keep()
                await self.reconcile(store)
                if time.monotonic() - key_use_reported > 60:      # IAM token checks unseal secrets
                    key_use_reported = time.monotonic()
                    await audit.record_key_use(store, f"service/proxy@{self.host}", self.address)
                # while a switchover waits for our acknowledgement, look often
                draining = any(c.draining for c in self.clusters.values())
                await changes.wait(0.1 if draining else INSTANCE_TTL / 4)
            await store.delete(keys.proxy_instance(self.id))
        finally:
            changes.close()
            with contextlib.suppress(Exception):
                await audit.record_key_use(store, f"service/proxy@{self.host}", self.address)
                await audit.flush(store)        # refusals and token logins of the last moments

    async def reconcile(self, store: Store) -> None:
        raw = {}
        for prefix in (keys.databases(), keys.members(), keys.ROOT + "secrets/", keys.proxy_root()):
            raw.update(await store.get_prefix(prefix))
        patroni = await store.get_prefix(keys.PATRONI_NAMESPACE + "/")
        self.peers = [ProxyInstance.model_validate_json(v) for k, v in raw.items()
                      if k.startswith(keys.proxy_instances())]
        wanted: dict[str, tuple[DatabaseSpec, ProxyPorts, DatabaseSecrets | None]] = {}
        for k, v in raw.items():
            if not (k.startswith(keys.databases()) and k.endswith("/spec")):
                continue
            spec = DatabaseSpec.model_validate_json(v)
            ports_raw = raw.get(keys.proxy_ports(spec.name))
            secrets_raw = raw.get(keys.secrets(spec.name))
            if spec.deleting or ports_raw is None or secrets_raw is None:
                continue
            try:
                secrets = await db_secrets.open_raw(store, keys.secrets(spec.name), secrets_raw)
            except DbplaneError as e:         # the KMS: keep serving with what we have
                log.warning("%s: %s", spec.name, e)
                if spec.name not in self.clusters:
                    continue
                secrets = None
            wanted[spec.name] = (spec, ProxyPorts.model_validate_json(ports_raw), secrets)
        for name in list(self.clusters):
            if name not in wanted:
                await self._remove(name)
        self.gatekeeper.update(store, {name: spec.allowlist for name, (spec, _, _) in wanted.items()})
        for name, (spec, ports, secrets) in wanted.items():
            cluster = self.clusters.get(name)
            if cluster is None:
                cluster = self.clusters[name] = Cluster(name, spec.proxy, secrets.superuser)
            elif secrets is not None:
                cluster.set_superuser_password(secrets.superuser)     # rotated
            members = [MemberSpec.model_validate_json(v) for k, v in raw.items()
                       if k.startswith(keys.members(name))]
            limits_raw = raw.get(keys.proxy_limits(name))
            budget = (ProxyLimits.model_validate_json(limits_raw).per_proxy if limits_raw
                      else proxy_budget(spec, len(self.peers) or 1).per_proxy)
            drain_raw = raw.get(keys.proxy_drain(name))
            drain = ProxyDrain.model_validate_json(drain_raw) if drain_raw else None
            if drain is not None and time.time() - drain.since > DRAIN_MAX_AGE:
                drain = None                  # its switchover is long over; never hold forever
            cluster.update(topology(name, members, patroni, drain), spec.proxy, budget)
            self.require_tls[name] = require_tls(spec)
            await self._listen(cluster, "writer", ports.writer)
            await self._listen(cluster, "reader", ports.reader)
            await self._acknowledge_drain(store, cluster, drain)

    async def _listen(self, cluster: Cluster, role: str, port: int) -> None:
        listener = self.listeners.get(port)
        if listener is not None and listener.cluster is cluster and listener.role == role:
            return
        if listener is not None and listener.server is not None:
            listener.server.close()
        listener = Listener(cluster, role, port)
        loop = asyncio.get_running_loop()
        try:
            listener.server = await loop.create_server(lambda: Gate(self, listener), self.address,
                                                       port, reuse_port=True, backlog=4096)
        except OSError as e:
            log.error("cannot listen on %s:%d for %s (%s): %s", self.address, port, cluster.name, role, e)
            return
        self.listeners[port] = listener
        log.info("%s %s endpoint on %s:%d", cluster.name, role, self.address, port)

    async def _remove(self, name: str) -> None:
        cluster = self.clusters.pop(name)
        self.require_tls.pop(name, None)
        for port, listener in list(self.listeners.items()):
            if listener.cluster is cluster:
                if listener.server is not None:
                    listener.server.close()
                del self.listeners[port]
        for client in list(self.clients.values()):
            if client.cluster is cluster:
                client.fatal("57P01", f"database {name} was deleted")
        cluster.close()
        log.info("%s: no longer served", name)

    async def _acknowledge_drain(self, store: Store, cluster: Cluster, drain: ProxyDrain | None) -> None:
        if drain is None or cluster.draining is None:
            self._drained.pop(cluster.name, None)
            return
        if self._drained.get(cluster.name) == drain.operation or cluster.writer_transactions():
            return
        await store.put(keys.proxy_drained(cluster.name, self.id), drain.operation)
        self._drained[cluster.name] = drain.operation
        log.info("%s: drained writer transactions for %s", cluster.name, drain.operation)

    # -- housekeeping -----------------------------------------------------------------------

    async def _tick(self) -> None:
        """Once a second: rates and idle timeouts."""
        while True:
            await asyncio.sleep(1.0)
            try:
                self._housekeeping()
            except Exception:
                log.exception("housekeeping")

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if self.host_dir is not None and not self.host_dir.exists():
            # never keep serving a deleted platform's ports (SO_REUSEPORT would let this
            # process share them with a new platform's proxies)
            log.error("%s is gone: the platform was removed; stopping", self.host_dir)
            self._stopping.set()
            return
        if self._server_cert is not None:
            self._server_cert.refresh()          # the agent re-issues it before it expires
        self._rates.append((now, {(c.name, p.dbname, p.user): (p.stats.xacts, p.stats.queries)
                                  for c in self.clusters.values() for p in c.pools.values()}))
        for cluster in self.clusters.values():
            for pool in cluster.pools.values():
                pool.close_idle(older_than=cluster.settings.idle_server_timeout)
            idle_limit = cluster.settings.idle_client_timeout
            if idle_limit:
                for pool in cluster.pools.values():
                    for client in list(pool.clients):
                        if client.server is None and client.acquiring is None and \
                                client.waiter is None and now - client.last_active > idle_limit:
                            client.fatal("57P05", "terminating connection due to idle-session timeout "
                                         f"({idle_limit:g} s without a query)")

    def rates(self, key) -> tuple[float, float]:
        if len(self._rates) < 2:
            return 0.0, 0.0
        (t0, old), (t1, new) = self._rates[0], self._rates[-1]
        a, b = old.get(key, (0, 0)), new.get(key, (0, 0))
        dt = max(t1 - t0, 1e-6)
        return round((b[0] - a[0]) / dt, 1), round((b[1] - a[1]) / dt, 1)

    def stats(self, database: str | None = None) -> dict:
        pools = []
        for cluster in self.clusters.values():
            if database and cluster.name != database:
                continue
            for snap in cluster.snapshot():
                snap["tps"], snap["qps"] = self.rates((cluster.name, snap["dbname"], snap["user"]))
                pools.append(snap)
        return {"id": self.id, "host": self.host, "pid": os.getpid(), "pools": pools,
                "clients": len(self.clients),
                "budgets": {c.name: c.budget for c in self.clusters.values()},
                "routing": {c.name: {"primary": c.primary, "readable_replicas": c.readable_replicas(),
                                     "lag_bytes": {m: c.monitor.lag(m) for m in c.replicas},
                                     "reader_max_lag_bytes": c.settings.reader_max_lag_bytes,
                                     "draining": c.draining}
                            for c in self.clusters.values() if not database or c.name == database}}

    # -- admin HTTP: GET /stats[?database=], POST /cancel ----------------------------------

    async def _admin(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = {h.split(":", 1)[0].lower(): h.split(":", 1)[1].strip()
                       for h in header_lines if ":" in h}
            body = await reader.readexactly(min(int(headers.get("content-length", "0")), 4096))
            path, _, query = target.partition("?")
            status, payload = 404, {"error": "not found"}
            if method == "GET" and path == "/stats":
                params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
                status, payload = 200, self.stats(params.get("database"))
            elif method == "POST" and path == "/cancel":
                req = json.loads(body or b"{}")
                client = self.clients.get(int(req["pid"]))
                if client is not None and client.key == bytes.fromhex(req["key"]):
                    client.cancel()
                status, payload = 200, {"ok": True}
            data = json.dumps(payload).encode()
            writer.write(f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\nContent-Length: "
                         f"{len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
            await writer.drain()
        except (OSError, ValueError, KeyError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()


def topology(db: str, members: list[MemberSpec], patroni_raw: dict[str, bytes],
             drain: ProxyDrain | None) -> Topology:
    """Who leads and who can serve reads, from Patroni's keys of this database."""
    prefix = keys.patroni_scope(db)
    leader = patroni_raw.get(prefix + "leader", b"").decode() or None
    nodes = {m.name: (m.address, m.pg_port) for m in members if not m.deleting and not m.stopped}
    states = {}
    for key, value in patroni_raw.items():
        if key.startswith(prefix + "members/"):
            with contextlib.suppress(ValueError):
                states[key[len(prefix) + 8:]] = json.loads(value)
    primary = None
    if leader in nodes and states.get(leader, {}).get("role") in ("primary", "master") and \
            states[leader].get("state") == "running":
        primary = leader
    replicas = tuple(sorted(name for name, st in states.items()
                            if name in nodes and name != leader
                            and st.get("state") in ("running", "streaming")
                            and st.get("role") not in ("primary", "master")))
    return Topology(members=nodes, primary=primary, replicas=replicas,
                    draining=drain.primary if drain else None)
