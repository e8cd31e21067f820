"""Bad input and faults get a one-line error naming cause and fix, a non-zero exit or a
4xx/5xx with a code, and nothing half-created."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from dbplane.system import etcd_binary
from platform_helpers import Platform, new_data_root, signed_client, wait_for

pytestmark = pytest.mark.integration


def one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> str:
    assert r.returncode != 0, r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def test_unknown_database(platform):
    r = platform.cli("db", "describe", "nosuchdb", check=False)
    one_line_error(r, "database 'nosuchdb' not found", "dbplane db list")
    resp = platform.api.get("/v1/databases/nosuchdb")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "database_not_found"
    one_line_error(platform.cli("db", "delete", "nosuchdb", check=False), "not found")
    one_line_error(platform.cli("ops", "show", "op-nope", check=False), "operation 'op-nope' not found")


@pytest.mark.parametrize("args, status, code, fragment", [
    (["--class", "huge"], 400, "invalid_class", "unknown instance class 'huge'"),
    (["--param", "no_such_thing=1", "--param", "work_mem=lots"], 400, "invalid_parameter",
     "unknown parameter 'no_such_thing'"),
    (["--param", "port=6000"], 400, "invalid_parameter", "port is managed by dbplane"),
    (["--replicas", "-1"], 400, "invalid_input", "replicas"),
])
def test_invalid_create_changes_nothing(platform, args, status, code, fragment):
    r = platform.cli("db", "create", "badone", *args, check=False)
    one_line_error(r, fragment)
    assert platform.api.get("/v1/databases/badone").status_code == 404
    assert platform.api.get("/v1/operations", params={"database": "badone"}).json() == []
    body = {"name": "badone", "class": "small", "replicas": 0, "params": {}}
    if code == "invalid_class":
        body["class"] = "huge"
    elif code == "invalid_parameter":
        body["params"] = dict(a.split("=", 1) for a in args[1::2])
    else:
        body["replicas"] = -1
    resp = platform.api.post("/v1/databases", json=body)
    assert resp.status_code == status and resp.json()["error"]["code"] == code


def test_invalid_name(platform):
    one_line_error(platform.cli("db", "create", "Bad_Name", check=False), "invalid database name")
    resp = platform.api.post("/v1/databases", json={"name": "Bad_Name"})
    assert resp.json()["error"]["code"] == "invalid_name"


def test_param_both_errors_reported_together(platform):
    r = platform.cli("db", "create", "badtwo", "--param", "no_such_thing=1",
                     "--param", "max_connections=0", check=False)
    one_line_error(r, "unknown parameter 'no_such_thing'", "max_connections=0 is out of range")


def test_duplicate_name(platform):
    platform.create("dupe", "--param", "work_mem=8MB")
    r = platform.cli("db", "create", "dupe", check=False)
    one_line_error(r, "database 'dupe' already exists", "choose another name")
    assert platform.api.post("/v1/databases", json={"name": "dupe"}).json()["error"]["code"] == \
        "database_exists"
    with platform.connect("dupe") as conn:
        assert conn.execute("SHOW work_mem").fetchone()[0] == "8MB"
    platform.cli("db", "delete", "dupe", "--wait")


def test_api_unreachable(platform):
    r = subprocess.run([sys.executable, "-m", "dbplane", "--api", "http://127.0.0.1:9", "db", "list"],
                       capture_output=True, text=True)
    one_line_error(r, "not answering", "dbplane up")


def test_no_platform_in_data_root(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dbplane", "--data-dir", str(tmp_path), "db", "list"],
                       capture_output=True, text=True, env={**os.environ, "DBPLANE_API": ""})
    one_line_error(r, f"no dbplane platform in {tmp_path}", "dbplane up")


def test_port_clash_on_up_starts_nothing():
    root = new_data_root()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = Platform(root)
        r = p.cli("up", "--port-base", str(port), check=False)
        one_line_error(r, f"port {port} on 127.0.0.1 is already in use", "--port-base")
    assert not p.layout.platform_file.exists()
    assert not p.layout.run_dir.exists()
    p.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Components:
    """Components started one by one, as on separate hosts."""

    def __init__(self):
        self.root = new_data_root("dbplane-parts-")
        self.procs: list[subprocess.Popen] = []
        self.etcd_port, self.api_port = _free_port(), _free_port()
        self.etcd = f"http://127.0.0.1:{self.etcd_port}"
        self.api = f"http://127.0.0.1:{self.api_port}"

    def start(self, *argv: str) -> subprocess.Popen:
        log = open(self.root / f"{len(self.procs)}.log", "wb")
        p = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def dbplane(self, *args: str) -> subprocess.Popen:
        return self.start(sys.executable, "-m", "dbplane", "--data-dir", str(self.root), *args)

    def stop(self):
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()


def test_components_one_by_one_and_multi_az_needs_two_zones():
    c = Components()
    try:
        peer = _free_port()
        c.start(etcd_binary(), "--data-dir", str(c.root / "etcd"), "--listen-client-urls", c.etcd,
                "--advertise-client-urls", c.etcd, "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"default=http://127.0.0.1:{peer}")
        wait_for(lambda: httpx.get(f"{c.etcd}/health").json()["health"] == "true", 30, "etcd")
        boot = subprocess.run([sys.executable, "-m", "dbplane", "--data-dir", str(c.root), "bootstrap",
                               "--etcd", c.etcd], capture_output=True, text=True, timeout=60)
        assert boot.returncode == 0, boot.stderr
        c.dbplane("controller", "--etcd", c.etcd)
        c.dbplane("api", "--etcd", c.etcd, "--listen", f"127.0.0.1:{c.api_port}")
        c.dbplane("agent", "--etcd", c.etcd, "--zone", "a")
        api = signed_client(c.api, c.root)
        wait_for(lambda: len(api.get("/v1/hosts").json()) == 1, 30, "the agent")

        def cli(*args):
            return subprocess.run([sys.executable, "-m", "dbplane", "--data-dir", str(c.root),
                                   "--api", c.api, *args], capture_output=True, text=True, timeout=300)

        r = cli("db", "create", "solo", "--multi-az")
        one_line_error(r, "Multi-AZ needs agents in two zones; only zone a has one", "--no-multi-az")
        assert api.get("/v1/databases").json() == []

        r = cli("db", "create", "solo", "--class", "micro", "--wait")
        assert r.returncode == 0, r.stderr
        d = api.get("/v1/databases/solo").json()
        assert d["status"] == "available" and d["multi_az"] is False
        assert [m["role"] for m in d["members"]] == ["primary"]

        # etcd goes away: the API answers 503 with a code, the CLI one line, no traceback
        c.procs[0].send_signal(signal.SIGKILL)
        c.procs[0].wait(10)
        resp = api.get("/v1/databases")
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "store_unavailable"
        one_line_error(cli("db", "list"), "etcd at", "is unreachable")
    finally:
        c.stop()
        shutil.rmtree(c.root, ignore_errors=True)
