"""Alarms on a real platform: the defaults appear for a new database; connections opened
straight to the node past 80% of a micro database's max_connections (50) take the
connections alarm OK -> ALARM, with the reason, an event and a webhook POST to a server
this test runs; closing them brings it back to OK; a metric without data and a frozen
member give INSUFFICIENT_DATA, not a stale OK; invalid definitions are refused with one
line and nothing stored; a deleted default is not made again. One database, alm-*."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import psycopg
import pytest

from dbplane.store import keys
from platform_helpers import iam_user_client, one_line_error, wait_for

pytestmark = pytest.mark.integration

PREFIX = "alm-"
CONNECTIONS_OPENED = 42        # with the platform's own backends: over 80% of micro's 50


@pytest.fixture(scope="module")
def db(platform):
    name = PREFIX + uuid.uuid4().hex[:6]
    platform.create(name, "--param", "require_tls=off")
    platform.cli("db", "modify", name, "--metrics-interval", "1", "--wait")
    yield name
    platform.delete_all(PREFIX)


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802
        type(self).received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def webhook():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks/T0KEN-SECRET", _Hook.received
    server.shutdown()
    server.server_close()


def alarm(platform, name: str) -> dict:
    r = platform.api.get(f"/v1/alarms/{name}")
    r.raise_for_status()
    return r.json()


def wait_state(platform, name: str, state: str, timeout: float) -> dict:
    return wait_for(lambda: (a := alarm(platform, name))["state"] == state and a, timeout,
                    f"alarm {name} to be {state}")


def test_the_defaults_exist_for_a_new_database(platform, db):
    expected = {f"{db}-{k}" for k in ("connections", "pool-waiting", "deadlocks", "storage", "cpu")}
    found = wait_for(lambda: (n := {a["name"] for a in platform.cli_json("alarms", "list", "--database", db)})
                     >= expected and n, 30, "the default alarms")
    assert not any("replication" in n or "backup" in n for n in found), found   # single node, no backups
    a = alarm(platform, f"{db}-connections")
    assert a["default"] and a["metric"] == "dbplane_pg_connections"
    assert a["denominator"] == "dbplane_pg_max_connections" and a["threshold"] == 0.8
    platform.cli("alarms", "list", "--database", db, "--state", "ok")          # the table renders


def test_invalid_definitions_are_refused_and_nothing_is_stored(platform, db):
    name = f"{db}-bad"
    r = platform.cli("alarms", "set", name, "--database", db, "--metric", "dbplane_no_such_metric",
                     "--threshold", "1", "--comparison", "=>", check=False)
    one_line_error(r, "invalid alarm", "unknown metric 'dbplane_no_such_metric'", "comparison")
    r = platform.cli("alarms", "set", name, "--database", "alm-ghost", "--metric", "dbplane_pg_connections",
                     "--threshold", "1", check=False)
    one_line_error(r, "database 'alm-ghost' does not exist")
    r = platform.api.put(f"/v1/alarms/{name}", json={"database": db, "metric": "dbplane_pg_connections",
                                                      "threshold": 1, "period": 5,
                                                      "webhooks": ["ftp://hooks.example/x"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_alarm"
    assert "period 5 is out of range" in r.json()["error"]["message"]
    assert "http:// or https://" in r.json()["error"]["message"]
    assert platform.api.get(f"/v1/alarms/{name}").status_code == 404
    assert platform.etcd.get(keys.alarm(name)) is None


def test_a_metric_without_data_is_insufficient_data(platform, db):
    """A single-node database has no replication lag series."""
    name = f"{db}-lag"
    platform.cli("alarms", "set", name, "--database", db, "--metric", "dbplane_pg_replication_lag_seconds",
                 "--threshold", "1", "--period", "10")
    a = wait_for(lambda: (a := alarm(platform, name))["evaluated_at"] and a, 30, f"{name} to be evaluated")
    assert a["state"] == "INSUFFICIENT_DATA" and "no data" in a["reason"]
    platform.cli("alarms", "delete", name)
    assert platform.api.get(f"/v1/alarms/{name}").status_code == 404


def test_the_list_shows_a_user_only_the_alarms_it_may_describe(platform, db):
    viewer = iam_user_client(platform, f"{PREFIX}viewer-{uuid.uuid4().hex[:4]}", {
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "alarms:DescribeAlarms",
                                                "Resource": f"alarm/{db}-c*"}]})
    r = viewer.get("/v1/alarms")
    assert r.status_code == 200, r.text
    assert {a["name"] for a in r.json()} == {f"{db}-connections", f"{db}-cpu"}
    assert viewer.get(f"/v1/alarms/{db}-storage").status_code == 403


def test_deleting_a_default_records_it(platform, db):
    name = f"{db}-deadlocks"
    platform.cli("alarms", "delete", name)
    assert platform.etcd.get(keys.alarm_deleted_default(name)) is not None


def test_too_many_connections_alarm_then_ok(platform, db, webhook):
    url, received = webhook
    name = f"{db}-connections"
    platform.cli("alarms", "set", name, "--database", db, "--metric", "dbplane_pg_connections",
                 "--denominator", "dbplane_pg_max_connections", "--statistic", "max", "--threshold", "0.8",
                 "--period", "10", "--evaluation-periods", "1", "--webhook", url)
    assert alarm(platform, name)["default"]            # edited, still the database's default
    wait_state(platform, name, "OK", 40)
    conns = []
    try:
        for _ in range(CONNECTIONS_OPENED):
            try:
                conns.append(platform.connect_node(db))
            except psycopg.OperationalError:       # only the superuser slots are left: that is > 80%
                break
        assert len(conns) >= 30, len(conns)
        a = wait_state(platform, name, "ALARM", 40)
        change = a["history"][0]
        assert change["old"] == "OK" and change["new"] == "ALARM"
        assert "> 0.8" in change["reason"] and change["value"] > 0.8, change
        hook = wait_for(lambda: next((b for b in received if b["new_state"] == "ALARM"), None), 20,
                        "the webhook POST for ALARM")
        assert hook["alarm"] == name and hook["database"] == db and hook["old_state"] == "OK"
        assert hook["value"] > 0.8 and "> 0.8" in hook["reason"]
        wait_for(lambda: any(e["kind"] == "alarm" and f"alarm {name}: OK -> ALARM" in e["message"]
                             for e in platform.cli_json("events", db)), 10, "the alarm's event")
    finally:
        for c in conns:
            c.close()
    wait_state(platform, name, "OK", 40)
    wait_for(lambda: any(b["old_state"] == "ALARM" and b["new_state"] == "OK" for b in received), 20,
             "the webhook POST for OK")
    out = platform.cli("alarms", "describe", name).stdout
    assert "ALARM -> OK" in out and "OK -> ALARM" in out
    # the webhook's token is never shown: scheme, host and port only
    assert f"{url.rsplit('/hooks/', 1)[0]}/..." in out and "T0KEN-SECRET" not in out
    assert "T0KEN-SECRET" not in platform.api.get("/v1/alarms", params={"database": db}).text
    log = (platform.root / "logs").glob("controller*.log")
    assert not any("T0KEN-SECRET" in p.read_text(errors="replace") for p in log)
    assert platform.etcd.get(keys.alarm(f"{db}-deadlocks")) is None     # a deleted default stays deleted


def test_a_frozen_member_is_insufficient_data_not_a_stale_ok(platform, db):
    name = f"{db}-connections"
    wait_state(platform, name, "OK", 40)
    m = platform.member(db, "primary")
    data = platform.layout.host_dir(m["host"]) / "members" / m["name"] / "data"
    pm = psutil.Process(int((data / "postmaster.pid").read_text().split()[0]))
    frozen = [pm, *pm.children(recursive=True)]
    try:
        for p in frozen:
            os.kill(p.pid, signal.SIGSTOP)
        a = wait_state(platform, name, "INSUFFICIENT_DATA", 40)
        assert "no data" in a["reason"]
    finally:
        for p in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)
    wait_state(platform, name, "OK", 60)
