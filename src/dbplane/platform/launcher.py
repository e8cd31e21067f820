"""`dbplane up`: one etcd member, the controller, the API and three agents (zones a, b, c)
on 127.0.0.1, each a detached process with a pidfile and a log under the data root.
etcd serves https and accepts only clients with a certificate from the platform CA.
`dbplane down` stops them in reverse order, keeping all data."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx

from .. import process
from ..agent.postgres import stop_postgres
from ..errors import DbplaneError, InvalidInput, StoreUnavailable
from ..models import DatabaseStatus, MemberSpec, PlatformConfig, RepositorySpec
from ..paths import Layout, PlatformInfo
from ..security import ca, credentials, iam, kms, tls
from ..security.sealed import SECRETS_KEY_ALIAS
from ..security.signing import SigningAuth
from ..store import keys
from ..store.gateway import Gateway
from ..store.tls import is_https
from ..system import (
    check_account_can_use,
    ensure_service_account,
    etcd_binary,
    port_free,
    postgres_bin_dir,
    postgres_major_version,
    venv_python,
)

ZONES = ("a", "b", "c")
ADDRESS = "127.0.0.1"
START_TIMEOUT = 60.0


def agent_name(zone: str) -> str:
    return f"host-{zone}"


def components() -> list[str]:
    """In start order; stopped in reverse."""
    return ["etcd", "controller", "api"] + [f"agent-{z}" for z in ZONES]


def _port_free(port: int) -> bool:
    return port_free(ADDRESS, port)


def choose_ports(port_base: int | None) -> PlatformInfo:
    """etcd client/peer and API on base..base+2, members on base+10..base+999."""
    bases = [port_base] if port_base else range(24000, 60000, 1000)
    for base in bases:
        if all(_port_free(p) for p in (base, base + 1, base + 2)):
            return PlatformInfo(
                etcd_url=f"https://{ADDRESS}:{base}", api_url=f"http://{ADDRESS}:{base + 2}",
                etcd_client_port=base, etcd_peer_port=base + 1, api_port=base + 2,
                member_port_start=base + 10, member_port_end=base + 1000)
        if port_base:
            busy = [p for p in (base, base + 1, base + 2) if not _port_free(p)]
            raise InvalidInput(f"port {busy[0]} on {ADDRESS} is already in use",
                               "pick another range with --port-base, or stop what holds it",
                               code="port_in_use")
    raise InvalidInput("no free port range found", "pass --port-base", code="port_in_use")


def _dbplane(root: Path, *args: str) -> list[str]:
    return [venv_python(), "-m", "dbplane", "--data-dir", str(root), *args]


def _argv(component: str, root: Path, info: PlatformInfo) -> list[str]:
    if component == "etcd":
        peer = f"http://{ADDRESS}:{info.etcd_peer_port}"
        argv = [etcd_binary(), "--name", "dbplane", "--data-dir", str(root / "etcd"),
                "--listen-client-urls", info.etcd_url, "--advertise-client-urls", info.etcd_url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"dbplane={peer}", "--log-level", "warn",
                "--quota-backend-bytes", str(2 * 1024**3),
                # old revisions (every audit append, status write, ...) must not fill the quota
                "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1h"]
        if is_https(info.etcd_url):
            # etcd re-reads its certificate on every new connection: renewal needs no restart
            cert, key = tls.etcd_server_certificate(root)
            argv += ["--cert-file", str(cert), "--key-file", str(key),
                     "--client-cert-auth", "--trusted-ca-file", str(ca.cert_path(root))]
        return argv
    if component == "controller":
        return _dbplane(root, "controller", "--etcd", info.etcd_url)
    if component == "api":
        argv = _dbplane(root, "api", "--etcd", info.etcd_url, "--listen", f"{ADDRESS}:{info.api_port}")
        if info.api_url.startswith("https://"):
            cert, key = tls.api_certificate(root)
            argv += ["--tls-cert", str(cert), "--tls-key", str(key)]
        return argv
    zone = component.removeprefix("agent-")
    return _dbplane(root, "agent", "--etcd", info.etcd_url, "--zone", zone,
                    "--name", agent_name(zone), "--address", ADDRESS)


def _last_line(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip(" │╭╰─") if lines else ""


def _wait(check, what: str, log: Path, layout: Layout, timeout: float = START_TIMEOUT) -> None:
    """Wait for check() to pass, failing fast with the cause if a component exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in components():
            if layout.pidfile(c).exists() and not process.running_pid(layout.pidfile(c)):
                raise DbplaneError(f"{c} exited while starting: {_last_line(layout.logfile(c))}",
                                   f"see {layout.logfile(c)}", code="start_failed")
        try:
            if check():
                return
        except (httpx.HTTPError, StoreUnavailable):
            pass
        time.sleep(0.2)
    raise DbplaneError(f"{what} did not come up within {timeout:.0f}s",
                       f"see {log}", code="start_timeout")


def etcd_gateway(root: Path, url: str, timeout: float = 5.0) -> Gateway:
    """The JSON gateway of the platform's etcd, with this data root's client certificate."""
    return Gateway(url, timeout=timeout, tls=tls.etcd_client_tls(root))


def _etcd_tls(root: Path, info: PlatformInfo, running: bool, owner, say) -> PlatformInfo:
    """etcd over https with client certificates: its certificate and the clients' issued
    or renewed. A platform first started in plaintext switches once nothing of it runs
    (its components were started with the http URL)."""
    if not is_https(info.etcd_url):
        if running:
            say("etcd is plaintext http on this platform; run 'dbplane down' and 'dbplane up' to "
                "switch it to TLS with client certificates")
            return info
        info = info.model_copy(update={"etcd_url": f"https://{ADDRESS}:{info.etcd_client_port}"})
    for what in tls.ensure_etcd_certificates(root, owner, [ADDRESS, "localhost"]):
        say(f"issued the {what}")
    return info


def kms_runtime_file(layout: Layout) -> Path:
    """Where `up` unseals a passphrase-sealed KMS root key; `down` removes it."""
    return layout.run_dir / "kms-root.key"


def up(root: Path, port_base: int | None = None, pg_bin_dir: str | None = None,
       say=print, kms_passphrase_file: Path | None = None, api_tls: bool = False) -> PlatformInfo:
    layout = Layout(root)
    os.environ.pop("DBPLANE_PG_BIN_DIR", None)
    if pg_bin_dir:
        os.environ["DBPLANE_PG_BIN_DIR"] = pg_bin_dir
    if layout.platform_file.exists():
        info = layout.read_platform()
        if pg_bin_dir and postgres_bin_dir() != info.pg_bin_dir:
            raise InvalidInput(f"this platform runs PostgreSQL from {info.pg_bin_dir}",
                               "its databases cannot change engine binaries; use another data root",
                               code="engine_mismatch")
        if not info.pg_bin_dir:                  # recorded before engines were selectable
            info = info.model_copy(update={"pg_bin_dir": postgres_bin_dir()})
        os.environ["DBPLANE_PG_BIN_DIR"] = info.pg_bin_dir    # components inherit it
    else:
        major = int(postgres_major_version())
        if major < 15:
            raise InvalidInput(f"PostgreSQL {major} in {postgres_bin_dir()} is too old",
                               "use PostgreSQL 15 or newer, or the embedded 18 (no --pg-bin-dir)",
                               code="engine_unsupported")
        info = choose_ports(port_base).model_copy(update={"pg_bin_dir": postgres_bin_dir()})
        os.environ["DBPLANE_PG_BIN_DIR"] = info.pg_bin_dir
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    run_as = ensure_service_account()
    check_account_can_use(run_as, [str(root), venv_python(), info.pg_bin_dir + "/postgres"])
    if ca.ensure_ca(root):
        say(f"created the platform CA in {ca.ca_dir(root)} (export it with 'dbplane ca cert')")
    owner = (run_as.uid, run_as.gid) if run_as else None
    running = any(process.running_pid(layout.pidfile(c)) for c in components())
    info = _etcd_tls(root, info, running, owner, say)
    if api_tls or info.api_url.startswith("https://"):      # once https, always https
        info = info.model_copy(update={"api_url": f"https://{ADDRESS}:{info.api_port}"})
        why = tls.ensure_leaf(root, *tls.api_certificate(root), [ADDRESS, "localhost"], None)
        if why:
            say(f"issued the API's TLS certificate ({why})")
    kms_root = kms.ensure_root_key(root / "kms", kms_runtime_file(layout), owner=owner,
                                   passphrase_file=kms_passphrase_file)
    layout.write_platform(info)
    # every component uses the engine recorded at the first `up`
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for component in components():
        pidfile = layout.pidfile(component)
        if process.running_pid(pidfile):
            continue
        if component == "etcd" and not _port_free(info.etcd_client_port):
            raise InvalidInput(f"port {info.etcd_client_port} (etcd) is in use by another process",
                               f"stop it, or remove {layout.platform_file} and run 'dbplane up "
                               "--port-base N' to choose other ports", code="port_in_use")
        if component == "api" and not _port_free(info.api_port):
            raise InvalidInput(f"port {info.api_port} (API) is in use by another process",
                               f"stop it, or remove {layout.platform_file} and run 'dbplane up "
                               "--port-base N'", code="port_in_use")
        process.start(_argv(component, root, info), pidfile, layout.logfile(component), env=env)
        say(f"started {component}")
        if component == "etcd":
            _wait(etcd_gateway(root, info.etcd_url, timeout=1).healthy, "etcd", layout.logfile("etcd"),
                  layout)
            etcd = etcd_gateway(root, info.etcd_url)
            _put_config(etcd, info, kms_root)
            _ensure_local_repository(layout, etcd, run_as)
    verify = tls.verify_for(info.api_url, ca.cert_path(root))
    _wait(lambda: httpx.get(f"{info.api_url}/healthz", timeout=1, verify=verify).status_code == 200,
          "the API", layout.logfile("api"), layout)
    _ensure_platform_keys(layout, etcd_gateway(root, info.etcd_url), kms_root, say)
    admin = credentials.read_profile(credentials.data_root_file(root), credentials.DEFAULT_PROFILE)
    api = httpx.Client(base_url=info.api_url, timeout=1, auth=SigningAuth(admin.key_id, admin.secret),
                       verify=verify)
    _wait(lambda: len(api.get("/v1/hosts").json()) >= len(ZONES),
          "the agents", layout.logfile("agent-a"), layout)
    return info


def bootstrap(root: Path, etcd_url: str, say=print, kms_passphrase_file: Path | None = None) -> Path:
    """For components started one by one (`dbplane bootstrap --etcd URL`): the KMS root
    key under this data root, the platform config naming it (if etcd has none), the
    platform's KMS keys and user admin with its credentials in <root>/credentials.
    An https etcd is reached with the data root's client certificate, issued here when
    this machine holds the CA key (`dbplane ca etcd-certs` issues etcd's own)."""
    layout = Layout(root)
    root.mkdir(parents=True, exist_ok=True)
    run_as = ensure_service_account()
    owner = (run_as.uid, run_as.gid) if run_as else None
    kms_root = kms.ensure_root_key(root / "kms", kms_runtime_file(layout), owner=owner,
                                   passphrase_file=kms_passphrase_file)
    if is_https(etcd_url) and ca.key_path(root).exists():
        for what in tls.ensure_etcd_certificates(root, owner):
            say(f"issued the {what}")
    etcd = etcd_gateway(root, etcd_url)
    raw = etcd.get(keys.config())
    config = PlatformConfig.model_validate_json(raw) if raw else PlatformConfig()
    if not config.kms_root_file:
        etcd.put(keys.config(), config.model_copy(update={"kms_root_file": str(kms_root)}).model_dump_json())
    _ensure_platform_keys(layout, etcd, kms_root, say)
    return credentials.data_root_file(root)


def _ensure_platform_keys(layout: Layout, etcd: Gateway, kms_root: Path, say) -> None:
    for alias, what in ((kms.DEFAULT_ALIAS, "default key of backups and WAL archives"),
                        (SECRETS_KEY_ALIAS, "key of the secrets dbplane stores in etcd")):
        if kms.ensure_default_key(etcd, kms_root, alias, what):
            say(f"created KMS key {alias}")
    _ensure_admin(layout, etcd, kms_root, say)


def _ensure_admin(layout: Layout, etcd: Gateway, kms_root: Path, say) -> None:
    """User admin (AdministratorAccess) and its access key in <root>/credentials (0600,
    profile default), which the CLI on this machine uses by default."""
    path = credentials.data_root_file(layout.root)
    current = credentials.read_profile(path, credentials.DEFAULT_PROFILE)
    new = iam.bootstrap(etcd, str(kms_root), current.key_id if current else None)
    if new:
        credentials.write_profile(path, credentials.DEFAULT_PROFILE, *new)
        say(f"admin credentials: {path} (profile default; user admin, AdministratorAccess)")


def _put_config(etcd: Gateway, info: PlatformInfo, kms_root: Path) -> None:
    config = PlatformConfig(member_port_start=info.member_port_start,
                            member_port_end=info.member_port_end, kms_root_file=str(kms_root))
    etcd.put(keys.config(), config.model_dump_json())


def _ensure_local_repository(layout: Layout, etcd: Gateway, run_as) -> None:
    """The default backup repository: a directory under the data root, written by the
    backup workers (the service account)."""
    path = layout.root / "backups"
    path.mkdir(mode=0o750, exist_ok=True)
    if run_as:
        os.chown(path, run_as.uid, run_as.gid)
    if etcd.get(keys.repository("local")) is None:
        etcd.put(keys.repository("local"),
                 RepositorySpec(name="local", kind="filesystem", path=str(path)).model_dump_json())


def pause_clusters(etcd: Gateway, ca_file: Path, timeout: float = 15.0) -> list[str]:
    """Put every database's Patroni into maintenance mode so that stopping the hosts one
    by one causes no failover; the controller resumes them after the next `up`.
    Returns the databases paused."""
    members = [MemberSpec.model_validate_json(v) for v in etcd.get_prefix(keys.members()).values()]
    paused = []
    for db in sorted({m.database for m in members}):
        raw = etcd.get(f"{keys.patroni_scope(db)}config")
        if raw is None:
            continue
        config = json.loads(raw)
        etcd.put(keys.paused_by_down(db), str(time.time()))
        status = etcd.get(keys.database_status(db))
        if status is not None:       # say so until the controller sees it running again
            etcd.put(keys.database_status(db), DatabaseStatus.model_validate_json(status).model_copy(
                update={"phase": "stopped", "message": "stopped by 'dbplane down'"}).model_dump_json())
        if not config.get("pause"):
            etcd.put(f"{keys.patroni_scope(db)}config", json.dumps({**config, "pause": True}))
        paused.append(db)
    deadline = time.monotonic() + timeout
    verify = tls.client_context(ca_file) if ca_file.exists() else True
    for m in members:
        if m.database not in paused:
            continue
        while time.monotonic() < deadline:      # each Patroni notices within its loop_wait
            try:
                if httpx.get(f"https://{m.address}:{m.api_port}/patroni", timeout=1,
                             verify=verify).json().get("pause"):
                    break
            except (httpx.HTTPError, ValueError):
                break                            # not running: nothing to pause
            time.sleep(0.2)
    return paused


def down(root: Path, say=print) -> list[str]:
    """Pause Patroni, stop agents (they stop Patroni and PostgreSQL), then the rest."""
    layout = Layout(root)
    stopped = []
    if process.running_pid(layout.pidfile("etcd")):
        try:
            paused = pause_clusters(etcd_gateway(root, layout.read_platform().etcd_url),
                                    ca.cert_path(root))
            if paused:
                say(f"paused failover for {', '.join(paused)}")
        except DbplaneError as e:
            say(f"could not pause failover ({e}); stopping anyway")
    agents = [c for c in components() if c.startswith("agent-")]
    signalled = set()
    for c in agents:                         # signal all agents at once, then wait for each
        pid = process.running_pid(layout.pidfile(c))
        if pid:
            os.kill(pid, signal.SIGTERM)
            signalled.add(c)
    for c in reversed(components()):
        if process.stop(layout.pidfile(c), timeout=120 if c.startswith("agent-") else 30) \
                or c in signalled:
            stopped.append(c)
            say(f"stopped {c}")
    stopped += stop_left_behind(layout, say)
    if kms.remove_runtime_key(kms_runtime_file(layout)):
        say("removed the unsealed KMS root key")
    return stopped


def stop_left_behind(layout: Layout, say=print) -> list[str]:
    """Proxies, backup workers and Patroni processes whose agent was not running to stop
    them (it was killed): they would keep ports of this platform busy after it is gone."""
    stopped = []
    hosts = layout.root / "hosts"
    for pidfile in (sorted(hosts.glob("*/proxy-*.pid")) + sorted(hosts.glob("*/backup.pid"))
                    + sorted(hosts.glob("*/metrics.pid"))
                    + sorted(hosts.glob("*/members/*/prefetch.pid"))
                    + sorted(hosts.glob("*/members/*/patroni.pid"))):
        if process.stop(pidfile, timeout=30):
            name = f"{pidfile.parent.name}/{pidfile.stem}" if pidfile.stem != "patroni" else \
                f"patroni of {pidfile.parent.name}"
            stopped.append(name)
            say(f"stopped {name}, left behind by its agent")
    for pm in sorted(hosts.glob("*/members/*/data/postmaster.pid")):
        stop_postgres(pm.parent)
    return stopped


def status(root: Path) -> dict[str, int | None]:
    layout = Layout(root)
    return {c: process.running_pid(layout.pidfile(c)) for c in components()}


