"""Drive a real dbplane platform from tests: the CLI as a user runs it, the API with
httpx, SQL with psycopg, and real faults (kill -9 of a whole node)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import psycopg

from dbplane.paths import Layout
from dbplane.security import ca, credentials
from dbplane.security.signing import SigningAuth
from dbplane.security.tls import etcd_client_tls, verify_for
from dbplane.store import Store
from dbplane.store.gateway import Gateway


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    """Poll predicate until it returns something truthy; fail with what we waited for."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:   # the thing may not exist yet
            last_error = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                         + (f" (last error: {last_error})" if last_error else ""))


def one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> str:
    """A CLI refusal: exit 1 and one line `error: ...` on stderr holding every fragment."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def new_data_root(prefix: str = "dbplane-test-") -> Path:
    """A data root the service account can enter (mkdtemp makes 0700 directories)."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    root.chmod(0o755)
    return root


def signed_client(api_url: str, root: Path, profile: str = "default") -> httpx.Client:
    creds = credentials.read_profile(credentials.data_root_file(root), profile)
    return httpx.Client(base_url=api_url, timeout=30, auth=SigningAuth(creds.key_id, creds.secret),
                        verify=verify_for(api_url, ca.cert_path(root)))    # https: the platform CA


def iam_user_client(platform: Platform, name: str, iam_document: dict) -> httpx.Client:
    """A new IAM user with one policy of its own and an access key; a client signed with it."""
    api = platform.api
    assert api.post("/v1/iam/users", json={"name": name}).status_code == 201
    r = api.post("/v1/iam/policies", json={"name": f"{name}-policy", "document": json.dumps(iam_document)})
    assert r.status_code == 201, r.text
    api.post(f"/v1/iam/users/{name}/policies", json={"policy": f"{name}-policy"}).raise_for_status()
    key = api.post(f"/v1/iam/users/{name}/access-keys").json()
    return httpx.Client(base_url=platform.info.api_url, timeout=30, verify=platform.verify,
                        auth=SigningAuth(key["id"], key["secret_access_key"]))


class Platform:
    def __init__(self, root: Path):
        self.root = root
        self.layout = Layout(root)

    # -- CLI -------------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True, timeout: float = 300,
            input: str | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "dbplane", "--data-dir", str(self.root), *args],
                           capture_output=True, text=True, timeout=timeout, input=input,
                           env={**os.environ, "DBPLANE_API": ""})
        if check and r.returncode != 0:
            raise AssertionError(f"dbplane {' '.join(args)} exited {r.returncode}:\n{r.stderr}{r.stdout}")
        return r

    def cli_json(self, *args: str, timeout: float = 300):
        return json.loads(self.cli(*args, "--output", "json", timeout=timeout).stdout)

    def up(self, *args: str) -> None:
        self.cli("up", *args)

    def down(self) -> None:
        self.cli("down", check=False)

    @property
    def info(self):
        return self.layout.read_platform()

    @property
    def etcd(self) -> Gateway:
        """etcd's JSON gateway with the data root's client certificate (etcd admits no other)."""
        return Gateway(self.info.etcd_url, tls=etcd_client_tls(self.root))

    def store(self) -> Store:
        """An asyncio etcd client with the client certificate: `async with p.store() as s:`."""
        return Store(self.info.etcd_url, tls=etcd_client_tls(self.root))

    @property
    def verify(self):
        """What httpx should verify the API's certificate with (the platform CA)."""
        return verify_for(self.info.api_url, ca.cert_path(self.root))

    @property
    def api(self) -> httpx.Client:
        """Signed with user admin's access key, which `up` wrote into the data root."""
        return signed_client(self.info.api_url, self.root)

    # -- databases ---------------------------------------------------------------------

    def describe(self, name: str) -> dict:
        r = self.api.get(f"/v1/databases/{name}")
        r.raise_for_status()
        return r.json()

    def create(self, name: str, *args: str) -> dict:
        """A micro database; without backups unless asked for with "--backups" (dozens of
        databases share the session's platform on 2 cores: only the backup tests need
        their archives and backups)."""
        if "--backups" not in args:
            args = (*args, "--no-backups")
        self.cli("db", "create", name, "--class", "micro", "--wait", *args)
        return self.describe(name)

    def wait_available(self, name: str, timeout: float = 120) -> dict:
        return wait_for(lambda: (d := self.describe(name))["status"] == "available" and d,
                        timeout, f"{name} to be available")

    def member(self, name: str, role: str) -> dict:
        return next(m for m in self.describe(name)["members"] if m["role"] == role)

    def delete_all(self, prefix: str) -> None:
        """Delete (without waiting) every database whose name starts with prefix: a test
        module's databases should not load the shared platform for the modules after it."""
        for d in self.api.get("/v1/databases").json():
            if d["name"].startswith(prefix):
                self.api.delete(f"/v1/databases/{d['name']}")

    def connect(self, name: str, endpoint: str = "writer", **kw) -> psycopg.Connection:
        """Through the proxy's writer or reader endpoint, or to "host:port" (a node)."""
        d = self.describe(name)
        host, port = d["endpoints"].get(endpoint, endpoint).rsplit(":", 1)
        kw = {"dbname": "postgres", "connect_timeout": 5, **kw}
        return psycopg.connect(host=host, port=int(port), user=d["admin_user"],
                               passfile=str(self.layout.pgpass(name)), **kw)

    def connect_node(self, name: str, role: str = "primary", **kw) -> psycopg.Connection:
        """Straight to a node (not through the proxy), by its role."""
        m = self.member(name, role)
        return self.connect(name, f"{m['address']}:{m['port']}", **kw)

    def proxy_processes(self) -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"])
                if "dbplane.proxy" in " ".join(p.info["cmdline"] or [])
                and str(self.root) in " ".join(p.info["cmdline"] or [])]

    # -- faults ------------------------------------------------------------------------

    def agent_pid(self, zone: str) -> int | None:
        from dbplane.process import running_pid
        return running_pid(self.layout.pidfile(f"agent-{zone}"))

    def kill_node(self, zone: str) -> None:
        """kill -9 the host's agent, every Patroni it runs and every PostgreSQL process."""
        victims = []
        agent = self.agent_pid(zone)
        if agent:
            victims.append(psutil.Process(agent))
        members = self.layout.host_dir(f"host-{zone}") / "members"
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if str(members) in cmd:
                victims.append(proc)
        for mdir in members.iterdir() if members.exists() else []:
            pidfile = mdir / "data" / "postmaster.pid"
            if pidfile.exists():
                try:
                    pm = psutil.Process(int(pidfile.read_text().split()[0]))
                    victims += [pm, *pm.children(recursive=True)]
                except (psutil.Error, ValueError):
                    pass
        for p in victims:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(victims, timeout=10)

    def destroy(self) -> None:
        self.down()
        if not os.environ.get("DBPLANE_TEST_KEEP_DATA"):     # =1: keep logs to investigate a failure
            shutil.rmtree(self.root, ignore_errors=True)
