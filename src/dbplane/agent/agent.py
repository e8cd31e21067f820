"""The agent: one per host, labelled with a zone.

Each pass reads the members placed on this host from etcd and makes the host match:
a Patroni process per member (running as the service account), config files written,
deleted members stopped and removed. It reports what it sees under member-status/ and
keeps its host key alive under a lease, so the controller knows which hosts are up.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import signal
import ssl
import time
from datetime import datetime
from pathlib import Path

import httpx
import psutil

from .. import process
from ..errors import DbplaneError, StoreUnavailable
from ..models import DatabaseSecrets, DatabaseSpec, Host, MemberSpec, MemberStatus, PlatformConfig
from ..paths import write_private
from ..process import RunAs
from ..security import ca, db_secrets, tls
from ..store import Store, keys
from ..store.etcd import Registration
from ..store.tls import EtcdTLS, is_https
from ..system import check_account_can_use, port_free, postgres_bin_dir, venv_python
from . import adopt, patroni
from .postgres import stop_postgres

log = logging.getLogger("dbplane.agent")

HOST_TTL = 6           # seconds without the agent before its host counts as down
PASS_INTERVAL = 2.0    # longest wait between passes when nothing changes
HEALTHY_AFTER = 60.0   # seconds a Patroni must run before its exit count is forgotten
STORAGE_INTERVAL = 10.0  # seconds between measurements of a member's data directory
MIB = 1024 * 1024


def dir_size(path: Path) -> int | None:
    """Bytes used by the files under path, rounded down to MiB so that small changes do
    not cause a status write every pass."""
    total = 0
    try:
        for dirpath, _, files in os.walk(path):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass      # removed while walking (WAL recycling, temp files)
    except OSError:
        return None
    return total // MIB * MIB


def last_error(log: Path, lines: int = 80) -> str:
    """The most telling recent line of a log: the last error, else the last line."""
    try:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "no log"
    # most specific first: the root cause beats the exception that reports it
    for markers in (("No space left", "Permission denied", "could not bind"),
                    ("FATAL", "PANIC"), ("ERROR", "error:", "Error", "Exception")):
        for line in reversed(tail):
            if any(m in line for m in markers):
                return line.strip()[:300]
    return tail[-1].strip()[:300] if tail else "no log output"


class Agent:
    def __init__(self, etcd_url: str, name: str, zone: str, address: str, host_dir: Path,
                 run_as: RunAs | None, proxy_workers: int = 1, backup_worker: bool = True):
        self.etcd_url = etcd_url
        self.host = Host(name=name, zone=zone, address=address, data_dir=str(host_dir))
        self.host_dir = host_dir
        self.members_dir = host_dir / "members"
        self.run_as = run_as
        self.python = venv_python()
        self.bin_dir = postgres_bin_dir()
        self._stopping = asyncio.Event()
        self._reported: dict[str, tuple] = {}
        self._crashes: dict[str, int] = {}         # member -> exits since it last ran well
        self._next_start: dict[str, float] = {}    # member -> monotonic time of next start
        self._storage: dict[str, tuple[int | None, float]] = {}   # member -> (bytes, when)
        self.proxy_workers = proxy_workers
        self.tls_dir = host_dir / "tls"
        self.root = host_dir.parent.parent         # the data root: the platform CA is under it
        self.node_tls, self.node_tls_reason = tls.postgres_tls(self.bin_dir)
        self.backup_worker = backup_worker
        self._service_exits: dict[str, int] = {}      # service -> exits in a row
        self._service_next_start: dict[str, float] = {}
        self.node_addresses: list[str] = [address]     # the platform's hosts, for pg_hba
        self._etcd_cert_problem = ""

    # -- lifecycle ---------------------------------------------------------------------

    def prepare(self) -> None:
        self.members_dir.mkdir(parents=True, exist_ok=True)
        for d in (self.host_dir, self.members_dir):
            os.chmod(d, 0o755)
        metrics_dir = self.host_dir / "metrics"          # the collector's history file (its account)
        metrics_dir.mkdir(mode=0o750, exist_ok=True)
        if self.run_as:
            os.chown(metrics_dir, self.run_as.uid, self.run_as.gid)
        check_account_can_use(self.run_as, [self.python, self.bin_dir + "/postgres",
                                            str(self.members_dir)])
        if ca.ensure_ca(self.root):               # a platform started component by component
            log.info("created the platform CA in %s", ca.ca_dir(self.root))
        if not self.node_tls:
            log.warning("node TLS unavailable: %s", self.node_tls_reason)
        self.ensure_proxy_certificate()
        self.ensure_etcd_certificates()
        if self.etcd_tls:          # Patroni, the proxy and the backup worker present it as the account
            check_account_can_use(self.run_as, [self.etcd_tls.cert, self.etcd_tls.key])

    def ensure_etcd_certificates(self) -> None:
        """The client certificate every process of this host presents to an https etcd
        (and etcd's own, when `dbplane up` runs etcd from this data root), renewed before
        they expire. Without the CA key here they are copied in by hand."""
        owner = (self.run_as.uid, self.run_as.gid) if self.run_as else None
        try:
            for what in tls.renew_etcd_certificates(self.root, self.etcd_url, owner):
                log.info("issued the %s", what)
        except ca.CaMissing as e:
            if str(e) != self._etcd_cert_problem:          # once, not every pass
                log.warning("cannot renew the etcd certificates: %s", e)
            self._etcd_cert_problem = str(e)

    @property
    def etcd_tls(self) -> EtcdTLS | None:
        return tls.etcd_client_tls(self.root) if is_https(self.etcd_url) else None

    def ensure_proxy_certificate(self, proxy_host: str = "") -> None:
        """The proxy's certificate, for the names clients reach it by; re-issued before it
        expires (the proxy reloads it by itself)."""
        owner = (self.run_as.uid, self.run_as.gid) if self.run_as else None
        why = tls.ensure_leaf(self.root, self.tls_dir / "proxy.crt", self.tls_dir / "proxy.key",
                              [self.host.address, "localhost", self.host.name, proxy_host], owner)
        if why:
            log.info("issued the proxy's TLS certificate in %s (%s)", self.tls_dir, why)
        why = tls.ensure_leaf(self.root, self.tls_dir / "collector.crt", self.tls_dir / "collector.key",
                              [self.host.address, "localhost", self.host.name], owner)
        if why:      # the metrics collector's https endpoint; it follows renewals by itself
            log.info("issued the metrics collector's TLS certificate in %s (%s)", self.tls_dir, why)

    @functools.cached_property
    def ca_context(self) -> ssl.SSLContext:
        """Verifies Patroni's REST API (https, certificates from the platform CA)."""
        return tls.client_context(ca.cert_path(self.root))

    def member_tls(self, member: MemberSpec, mdir: Path, owner: tuple[int, int] | None
                   ) -> tuple[patroni.MemberTls, str]:
        """The member's certificate (PostgreSQL and Patroni's REST API), issued or renewed;
        and why it was (re-)issued, "" if it was not."""
        cert, key = mdir / "tls" / "server.crt", mdir / "tls" / "server.key"
        why = tls.ensure_leaf(self.root, cert, key, [member.address, member.host, "localhost"], owner)
        return patroni.MemberTls(cert=str(cert), key=str(key), ca=str(ca.cert_path(self.root)),
                                 postgres=self.node_tls), why

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        self.prepare()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        while not self._stopping.is_set():
            try:
                async with Store(self.etcd_url, tls=self.etcd_tls) as store:
                    await self._serve(store)
            except StoreUnavailable as e:
                log.warning("%s; retrying", e)   # Patroni keeps running meanwhile
                await self._wait_stop(2.0)
        await asyncio.get_running_loop().run_in_executor(None, self.stop_services)
        await asyncio.get_running_loop().run_in_executor(None, self.stop_all_members)
        log.info("agent %s stopped", self.host.name)

    async def _wait_stop(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout)
        except TimeoutError:
            pass

    async def _keep_alive(self, registration: Registration) -> None:
        """Refresh the host's lease on its own schedule, so that a long pass (stopping a
        member can take a minute) never makes a live host look dead."""
        while True:
            await asyncio.sleep(HOST_TTL / 4)
            try:
                await registration.keep(force=True)
            except StoreUnavailable:
                continue                                       # the pass loop reconnects
            except Exception:
                await registration.start()

    async def _serve(self, store: Store) -> None:
        registration = await store.register(keys.host(self.host.name), self.host, HOST_TTL)
        log.info("agent %s (zone %s) registered", self.host.name, self.host.zone)
        # hosts/: pg_hba follows the hosts that join and leave
        changes = store.changes(keys.members(), keys.ROOT + "secrets/", keys.hosts())
        keepalive = asyncio.create_task(self._keep_alive(registration))
        try:
            while not self._stopping.is_set():
                if keepalive.done():
                    keepalive.result()              # surface why it stopped
                await self.reconcile(store)
                wait = asyncio.create_task(changes.wait(PASS_INTERVAL))
                stop = asyncio.create_task(self._stopping.wait())
                await asyncio.wait({wait, stop}, return_when=asyncio.FIRST_COMPLETED)
                for t in (wait, stop):
                    t.cancel()
            await store.delete(keys.host(self.host.name))
        finally:
            keepalive.cancel()
            changes.close()

    # -- one pass ------------------------------------------------------------------------

    async def reconcile(self, store: Store) -> None:
        self.ensure_services()
        config = await store.get(keys.config(), PlatformConfig)
        self.ensure_proxy_certificate(config.proxy_host if config else "")
        self.ensure_etcd_certificates()
        members = await store.list(keys.members(), MemberSpec)
        mine = [m for m in members if m.host == self.host.name]
        self.node_addresses = await self.platform_addresses(store, members)
        for member in mine:
            try:
                await self.ensure_member(store, member)
            except StoreUnavailable:
                raise
            except Exception as e:   # one broken member must not stop the others
                log.exception("member %s", member.name)
                await self.report(store, member, "failed", f"agent error: {e}")
        await self.stop_orphans({m.name for m in mine})

    @staticmethod
    async def platform_addresses(store: Store, members: list[MemberSpec]) -> list[str]:
        """Addresses PostgreSQL accepts connections from (pg_hba): the live hosts, and the
        hosts members are placed on, so that a host whose agent restarts (its key gone
        for a moment) keeps replicating."""
        hosts = await store.list(keys.hosts(), Host)
        return sorted({h.address for h in hosts} | {m.address for m in members if not m.deleting})

    async def ensure_member(self, store: Store, member: MemberSpec) -> None:
        mdir = self.members_dir / member.name
        pidfile = mdir / "patroni.pid"
        if member.deleting:
            await asyncio.get_running_loop().run_in_executor(None, self.remove_member, mdir)
            await self.report(store, member, "deleted", "stopped and removed")
            return
        if member.stopped:        # a replica being promoted: stop it, keep its data
            await asyncio.get_running_loop().run_in_executor(None, self.stop_member, mdir)
            await self.report(store, member, "stopped", "stopped; data directory kept")
            return
        spec = await store.get(keys.database_spec(member.database), DatabaseSpec)
        try:
            secrets = await db_secrets.load(store, keys.secrets(member.database))
        except DbplaneError as e:     # no KMS root key on this host, the secrets key disabled, ...
            log.warning("%s: %s", member.name, e)
            await self.report(store, member, "failed", f"cannot open the database's secrets: {e.message}",
                              reason="secrets_unreadable")
            return
        if spec is None or secrets is None:
            await self.report(store, member, "starting", "waiting for the database's spec and secrets")
            return
        changed = self.write_config(member, spec, secrets, mdir)
        pid = process.running_pid(pidfile)
        if pid is not None:
            if changed:
                os.kill(pid, signal.SIGHUP)       # Patroni reloads its local configuration
            if time.time() - psutil.Process(pid).create_time() > HEALTHY_AFTER:
                self._crashes.pop(member.name, None)
            await self.report(store, member, "running", "patroni running", pid,
                              replayed_at=await self.replayed_at(member),
                              storage_bytes=await self.storage_bytes(member.name, mdir / "data"))
            return
        if pidfile.exists():
            # Patroni exited although nobody stopped it: killed, crashed or failed to
            # bootstrap. Restart at once the first time, then back off.
            pidfile.unlink()
            count = self._crashes.get(member.name, 0) + 1
            self._crashes[member.name] = count
            self._next_start[member.name] = time.monotonic() + (0 if count == 1 else min(60, 2 ** count))
            await self.report(store, member, "failed",
                              f"patroni exited: {last_error(mdir / 'patroni.log')}",
                              reason="patroni_exited", restarts=count)
        if time.monotonic() < self._next_start.get(member.name, 0):
            return
        if member.adopt_from:     # first member of a promoted database
            waiting = adopt.take_over(self.members_dir / member.adopt_from, mdir)
            if waiting:
                await self.report(store, member, "starting", waiting)
                return
        for port in (member.pg_port, member.api_port):
            if not port_free(member.address, port):
                await self.report(store, member, "failed",
                                  f"port {port} on {member.address} is in use by another process",
                                  reason="port_in_use")
                return
        pid = process.start([self.python, "-m", "patroni", str(mdir / "patroni.yml")], pidfile,
                            mdir / "patroni.log", env=self.child_env(), cwd=str(mdir),
                            run_as=self.run_as)
        log.info("started patroni for %s (pid %d)", member.name, pid)
        await self.report(store, member, "starting", "patroni started", pid,
                          restarts=self._crashes.get(member.name, 0))

    def write_config(self, member: MemberSpec, spec: DatabaseSpec, secrets: DatabaseSecrets,
                     mdir: Path) -> bool:
        owner = (self.run_as.uid, self.run_as.gid) if self.run_as else None
        if not mdir.exists():
            mdir.mkdir(parents=True, mode=0o700)
            if owner:
                os.chown(mdir, *owner)
        member_tls, reissued = self.member_tls(member, mdir, owner)
        if reissued:
            log.info("%s: issued its TLS certificate (%s)", member.name, reissued)
        text = patroni.render(member, spec, secrets, [self.etcd_url], self.bin_dir, str(mdir),
                              node_addresses=self.node_addresses, tls=member_tls,
                              etcd_tls=self.etcd_tls)
        path = mdir / "patroni.yml"
        if path.exists() and path.read_text() == text:
            return bool(reissued)      # a SIGHUP makes Patroni and PostgreSQL load it
        write_private(path, text, owner=owner)
        return True

    def child_env(self) -> dict:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8",
               "PYTHONUNBUFFERED": "1", "HOME": "/tmp"}
        if self.node_tls:           # the proxy and backup worker reach the nodes over TLS only
            env[tls.NODE_CA_ENV] = str(ca.cert_path(self.root))
        return env

    async def replayed_at(self, member: MemberSpec) -> float | None:
        """When the last transaction this replica replayed was committed on the primary
        (from Patroni's REST API); None on a primary or if Patroni does not answer."""
        try:
            async with httpx.AsyncClient(timeout=1.0, verify=self.ca_context) as http:
                r = await http.get(f"https://{member.address}:{member.api_port}/patroni")
            stamp = r.json().get("xlog", {}).get("replayed_timestamp")
            return datetime.fromisoformat(stamp).timestamp() if stamp else None
        except (httpx.HTTPError, ValueError):
            return None

    async def storage_bytes(self, member: str, data_dir: Path) -> int | None:
        """The data directory's size, measured at most every STORAGE_INTERVAL seconds."""
        size, measured = self._storage.get(member, (None, 0.0))
        if time.monotonic() - measured >= STORAGE_INTERVAL:
            size = await asyncio.get_running_loop().run_in_executor(None, dir_size, data_dir)
            self._storage[member] = (size, time.monotonic())
        return size

    async def report(self, store: Store, member: MemberSpec, state: str, message: str,
                     pid: int | None = None, reason: str = "",
                     replayed_at: float | None = None, restarts: int = 0,
                     storage_bytes: int | None = None) -> None:
        """Write member status only when it changed: status writes wake the controller."""
        key = (state, message, pid, member.pg_port, replayed_at, restarts, reason, storage_bytes)
        if self._reported.get(member.name) == key:
            return
        await store.put(keys.member_status(member.database, member.name),
                        MemberStatus(name=member.name, database=member.database,
                                     host=self.host.name, state=state, message=message, pid=pid,
                                     reason=reason, replayed_at=replayed_at,
                                     restarts=restarts, storage_bytes=storage_bytes))
        self._reported[member.name] = key

    # -- host services: proxies and the backup worker --------------------------------------

    def keep_running(self, name: str, argv: list[str]) -> None:
        """Keep one service process running (pidfile and log named after it); one that
        exits is restarted at once, then with back-off if it keeps exiting."""
        pidfile, logfile = self.host_dir / f"{name}.pid", self.host_dir / f"{name}.log"
        pid = process.running_pid(pidfile)
        if pid is not None:
            if time.time() - psutil.Process(pid).create_time() > HEALTHY_AFTER:
                self._service_exits.pop(name, None)
            return
        if pidfile.exists():
            pidfile.unlink()
            exits = self._service_exits.get(name, 0) + 1
            self._service_exits[name] = exits
            self._service_next_start[name] = time.monotonic() + (0 if exits == 1 else min(60, 2 ** exits))
            log.warning("%s exited (%s); restarting", name, last_error(logfile))
        if time.monotonic() < self._service_next_start.get(name, 0):
            return
        pid = process.start(argv, pidfile, logfile, env=self.child_env(), cwd=str(self.host_dir),
                            run_as=self.run_as)
        log.info("started %s (pid %d)", name, pid)

    def services(self) -> dict[str, list[str]]:
        """name -> argv of every service process this host runs."""
        out = {}
        etcd = ["--etcd", self.etcd_url, *(self.etcd_tls.argv() if self.etcd_tls else [])]
        for worker in range(1, self.proxy_workers + 1):
            out[f"proxy-{worker}"] = [
                self.python, "-m", "dbplane.proxy", *etcd,
                "--id", f"{self.host.name}-{worker}", "--host", self.host.name,
                "--address", self.host.address, "--tls-dir", str(self.tls_dir)]
        if self.backup_worker:
            out["backup"] = [self.python, "-m", "dbplane.backup", *etcd,
                             "--host", self.host.name, "--bin-dir", self.bin_dir]
        out["metrics"] = [self.python, "-m", "dbplane.metrics", "collect", *etcd, "--host", self.host.name,
                          "--zone", self.host.zone, "--address", self.host.address,
                          "--data-root", str(self.root)]
        return out

    def ensure_services(self) -> None:
        for name, argv in self.services().items():
            self.keep_running(name, argv)

    def stop_services(self) -> None:
        for name in self.services():
            process.stop(self.host_dir / f"{name}.pid", timeout=10)

    # -- stopping ------------------------------------------------------------------------

    def stop_member(self, mdir: Path) -> None:
        process.stop(mdir / "patroni.pid", timeout=60)
        stop_postgres(mdir / "data")

    def remove_member(self, mdir: Path) -> None:
        """Stop and delete a member; its Patroni log (and a restore's WAL prefetcher log)
        is kept for troubleshooting."""
        if mdir.exists():
            self.stop_member(mdir)
            process.stop(mdir / "prefetch.pid", timeout=5)
            for log_name, suffix in (("patroni.log", ".log"), ("prefetch.log", "-prefetch.log")):
                if (mdir / log_name).exists():
                    kept = self.host_dir / "removed" / f"{mdir.name}-{int(time.time())}{suffix}"
                    kept.parent.mkdir(exist_ok=True)
                    shutil.move(mdir / log_name, kept)
            shutil.rmtree(mdir)

    async def stop_orphans(self, wanted: set[str]) -> None:
        """Members on disk that are no longer placed here: stop them, keep their data."""
        if not self.members_dir.exists():
            return
        for mdir in self.members_dir.iterdir():
            if mdir.name not in wanted and process.running_pid(mdir / "patroni.pid"):
                log.warning("member %s is no longer placed on this host; stopping it, keeping "
                            "its data in %s", mdir.name, mdir)
                await asyncio.get_running_loop().run_in_executor(None, self.stop_member, mdir)

    def stop_all_members(self) -> None:
        if not self.members_dir.exists():
            return
        for mdir in self.members_dir.iterdir():
            if process.running_pid(mdir / "patroni.pid"):
                self.stop_member(mdir)
