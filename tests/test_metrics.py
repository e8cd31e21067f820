"""Metrics on a real platform: a collector per agent host registers in etcd; the API's
/metrics parses as Prometheus parses it and follows reality (connections opened, rows
written, a Multi-AZ standby's lag, a member that stops answering); the history endpoint and
`dbplane metrics`; the collector refuses clients without the platform's certificate; HTTP
Basic auth with an access key on /metrics. One database, named mtr-*."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dbplane.metrics.catalog import MEMBER
from dbplane.models import CollectorInstance
from dbplane.security import ca, credentials
from dbplane.security.tls import client_context, etcd_client_tls
from dbplane.store import keys
from platform_helpers import wait_for

pytestmark = pytest.mark.integration

PREFIX = "mtr-"
HOSTS = {"host-a", "host-b", "host-c"}
INTERVAL = 10          # the collectors' default: a value changes within two scrapes


@pytest.fixture(scope="module")
def db(platform):
    name = PREFIX + uuid.uuid4().hex[:6]
    platform.create(name, "--multi-az", "--param", "require_tls=off")
    yield name
    platform.delete_all(PREFIX)


def scrape(platform) -> tuple[str, dict]:
    r = platform.api.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return r.text, {f.name: f for f in text_string_to_metric_families(r.text)}


def series(families: dict, name: str, **labels) -> list:
    """Samples of a family matching the labels (prometheus_client strips _total from a
    counter family's name, not from its samples)."""
    fam = families.get(name.removesuffix("_total"))
    return [s for s in (fam.samples if fam else []) if all(s.labels.get(k) == v for k, v in labels.items())]


def one(families, name, **labels) -> float | None:
    found = series(families, name, **labels)
    return found[0].value if len(found) == 1 else None


def total(families, name, **labels) -> float:
    return sum(s.value for s in series(families, name, **labels))


def members(platform, db) -> dict[str, dict]:
    return {m["role"]: m for m in platform.describe(db)["members"]}


def test_a_collector_registers_on_every_host(platform):
    def registered():
        found = {CollectorInstance.model_validate_json(v).host
                 for v in platform.etcd.get_prefix(keys.metrics_collectors()).values()}
        return found == HOSTS and found
    wait_for(registered, 60, "a metrics collector on every host")


def test_platform_scrape_has_the_documented_series(platform, db):
    roles = members(platform, db)
    primary, standby = roles["primary"]["name"], roles["sync_standby"]["name"]

    def both_up():
        text, fams = scrape(platform)
        return (one(fams, "dbplane_member_up", database=db, member=primary, role="primary") == 1
                and one(fams, "dbplane_member_up", database=db, member=standby, role="standby") == 1
                and (text, fams))
    text, fams = wait_for(both_up, 60, f"both members of {db} up in /metrics")
    for line in text.splitlines():           # each family's HELP and TYPE once, though 3 collectors answer
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            assert text.count(line.rsplit(" ", 1)[0] if line.startswith("# TYPE") else line) == 1, line
    for host in HOSTS:
        assert one(fams, "dbplane_collector_up", host=host) == 1
        assert one(fams, "dbplane_host_memory_total_bytes", host=host) > 0
    for name in ("dbplane_pg_xact_commit_total", "dbplane_pg_max_connections",
                 "dbplane_pg_database_size_bytes", "dbplane_pg_wal_bytes_total",
                 "dbplane_pg_checkpoints_timed_total", "dbplane_pg_locks_waiting",
                 "dbplane_pg_statements_enabled", "dbplane_member_cpu_seconds_total",
                 "dbplane_member_resident_memory_bytes"):
        for member in (primary, standby):
            found = series(fams, name, database=db, member=member)
            assert len(found) == 1, (name, member, found)
            assert set(MEMBER) <= set(found[0].labels), found[0].labels
    assert len(series(fams, "dbplane_pg_connections", database=db, member=primary)) == 6   # one per state
    # the proxy on every host reports the database's pools
    assert {s.labels["host"] for s in series(fams, "dbplane_proxy_clients_active", database=db)} == HOSTS
    # replication lag: one series for the standby, measured on the primary
    lag = series(fams, "dbplane_pg_replication_lag_bytes", database=db)
    assert [(s.labels["member"], s.labels["role"]) for s in lag] == [(standby, "standby")]


def test_values_follow_reality(platform, db):
    primary = members(platform, db)["primary"]["name"]
    _, fams = scrape(platform)
    base_conns = total(fams, "dbplane_pg_connections", database=db, member=primary)
    base_commits = one(fams, "dbplane_pg_xact_commit_total", database=db, member=primary)
    base_size = one(fams, "dbplane_pg_database_size_bytes", database=db, member=primary)
    extra = []
    try:
        for _ in range(6):
            extra.append(platform.connect_node(db, autocommit=True))
        with platform.connect_node(db, autocommit=True) as c:
            c.execute("CREATE TABLE IF NOT EXISTS metric_rows (id serial PRIMARY KEY, pad text)")
            for _ in range(40):
                c.execute("INSERT INTO metric_rows (pad) SELECT repeat('x', 500) "
                          "FROM generate_series(1, 250)")

        def grown():
            _, f = scrape(platform)
            conns = total(f, "dbplane_pg_connections", database=db, member=primary)
            commits = one(f, "dbplane_pg_xact_commit_total", database=db, member=primary)
            size = one(f, "dbplane_pg_database_size_bytes", database=db, member=primary)
            return conns >= base_conns + 5 and commits >= base_commits + 40 and size > base_size + 2**21 and f
        fams = wait_for(grown, 3 * INTERVAL, "connections, commits and size to grow in /metrics")
        assert one(fams, "dbplane_pg_connections", database=db, member=primary, state="idle") >= 6
    finally:
        for c in extra:
            c.close()


def test_history_endpoint_and_cli(platform, db):
    primary = members(platform, db)["primary"]["name"]
    r = platform.api.get(f"/v1/databases/{db}/metrics", params={"metric": "dbplane_member_up", "since": "5m"})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["unavailable_hosts"] == []
    newest = max(p[0] for s in data["series"] for p in s["points"])
    assert data["until"] - newest < 60, "the last point is older than a minute"
    names = {m["name"] for m in members(platform, db).values()}
    assert {s["labels"]["member"] for s in data["series"]} == names
    out = platform.cli_json("metrics", db, "--metric", "dbplane_pg_xact_commit_total", "--since", "10m",
                            "--member", primary)
    assert [s["labels"]["member"] for s in out["series"]] == [primary]
    assert out["until"] - out["series"][0]["points"][-1][0] < 60
    table = platform.cli("metrics", db).stdout
    assert primary in table and "primary" in table
    series_table = platform.cli("metrics", db, "--metric", "dbplane_pg_connections", "--since", "15m").stdout
    assert "state=idle" in series_table
    r = platform.api.get(f"/v1/databases/{db}/metrics", params={"metric": "dbplane_nope"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_metric"


def test_one_second_interval_on_request(platform, db):
    platform.cli("db", "modify", db, "--metrics-interval", "1", "--wait")
    assert platform.describe(db)["metrics_interval"] == 1
    primary = members(platform, db)["primary"]["name"]

    def dense():
        r = platform.api.get(f"/v1/databases/{db}/metrics", params={
            "metric": "dbplane_pg_xact_commit_total", "since": "20s", "member": primary})
        data = r.json()
        points = [p for s in data["series"] for p in s["points"] if p[0] > data["until"] - 10]
        return len(points) >= 6
    wait_for(dense, 30, "samples every second in the history")


def test_the_collector_refuses_clients_without_the_platform_certificate(platform):
    c = CollectorInstance.model_validate_json(platform.etcd.get(keys.metrics_collector("host-a")))
    url = f"https://{c.address}:{c.port}/metrics"
    with pytest.raises(httpx.HTTPError):            # the handshake fails: no client certificate
        httpx.get(url, verify=client_context(ca.cert_path(platform.root)), timeout=5).raise_for_status()
    etcd_tls = etcd_client_tls(platform.root)
    ctx = client_context(ca.cert_path(platform.root))
    ctx.load_cert_chain(etcd_tls.cert, etcd_tls.key)
    r = httpx.get(url, verify=ctx, timeout=5)
    assert r.status_code == 200 and "dbplane_host_cpu_usage_ratio" in r.text


def test_a_collector_that_does_not_answer_is_reported_down(platform):
    """SIGSTOP host-c's collector: the platform scrape still answers (within the 3 s per
    collector), with dbplane_collector_up 0 for host-c and the other hosts' series."""
    c = CollectorInstance.model_validate_json(platform.etcd.get(keys.metrics_collector("host-c")))
    os.kill(c.pid, signal.SIGSTOP)
    try:
        _, fams = scrape(platform)
        assert one(fams, "dbplane_collector_up", host="host-c") == 0
        assert one(fams, "dbplane_collector_up", host="host-a") == 1
        assert series(fams, "dbplane_host_cpu_usage_ratio", host="host-c") == []
        assert series(fams, "dbplane_host_cpu_usage_ratio", host="host-a")
    finally:
        os.kill(c.pid, signal.SIGCONT)
    wait_for(lambda: one(scrape(platform)[1], "dbplane_collector_up", host="host-c") == 1, 30,
             "host-c's collector to answer again")


def test_basic_auth_with_an_access_key_on_metrics(platform):
    creds = credentials.read_profile(credentials.data_root_file(platform.root), "default")
    url = platform.info.api_url + "/metrics"
    started = time.time()
    r = httpx.get(url, auth=(creds.key_id, creds.secret), verify=platform.verify, timeout=30)
    if not url.startswith("https://"):
        assert r.status_code == 401 and r.json()["error"]["code"] == "insecure_transport"
        return
    assert r.status_code == 200 and "dbplane_collector_up" in r.text
    r = httpx.get(url, auth=(creds.key_id, creds.secret + "x"), verify=platform.verify, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_credentials"
    assert creds.secret not in r.text
    # the refused scrape is in the audit log; the successful one is not (one every 15 s would drown it)
    def scrape_entries():
        r = platform.api.get("/v1/audit", params={"since": started - 1, "limit": 1000})
        r.raise_for_status()
        return [e for e in r.json()["entries"] if e["resource"] == "/metrics" or "Scrape" in e["action"]]
    entries = wait_for(scrape_entries, 30, "the refused scrape in the audit log")
    assert [e["status"] for e in entries] == [401], entries
    # basic auth is for the scrape only
    r = httpx.get(platform.info.api_url + "/v1/databases", auth=(creds.key_id, creds.secret),
                  verify=platform.verify, timeout=30)
    assert r.status_code == 401


def postgres_tree(platform, member: dict) -> list[psutil.Process]:
    data = platform.layout.host_dir(member["host"]) / "members" / member["name"] / "data"
    pm = psutil.Process(int((data / "postmaster.pid").read_text().split()[0]))
    return [pm, *pm.children(recursive=True)]


def test_a_member_that_stops_answering_is_down_not_stale(platform, db):
    """Freeze the standby's PostgreSQL (SIGSTOP of the postmaster and its children): the
    collector's queries time out, and the member shows up 0 with no other series."""
    standby = members(platform, db)["sync_standby"]
    frozen = postgres_tree(platform, standby)
    try:
        for p in frozen:
            os.kill(p.pid, signal.SIGSTOP)

        def down():
            _, f = scrape(platform)
            return one(f, "dbplane_member_up", database=db, member=standby["name"]) == 0 and f
        fams = wait_for(down, 4 * INTERVAL, f"{standby['name']} to be down in /metrics")
        for name in ("dbplane_pg_xact_commit_total", "dbplane_pg_connections", "dbplane_pg_max_connections"):
            assert series(fams, name, database=db, member=standby["name"]) == [], name
        primary = members(platform, db)["primary"]["name"]
        assert one(fams, "dbplane_member_up", database=db, member=primary) == 1
    finally:
        for p in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)
    wait_for(lambda: one(scrape(platform)[1], "dbplane_member_up", database=db, member=standby["name"]) == 1,
             4 * INTERVAL, f"{standby['name']} to be up again")


def test_the_collector_serves_the_logs_of_its_own_members_only(platform, db):
    """GET /log on the standby's host's collector: the end of the standby's Patroni log and its
    disk; a name that is not a member's is refused (400), one on another host is unknown (404);
    without the platform's certificate, no answer (the handshake fails)."""
    standby = members(platform, db)["sync_standby"]
    other = next(h for h in sorted(HOSTS) if h != standby["host"])
    logfile = platform.layout.host_dir(standby["host"]) / "members" / standby["name"] / "patroni.log"
    line = logfile.read_text(errors="replace").rstrip("\n").rsplit("\n", 1)[-1]
    assert line

    def collector(host: str) -> str:
        c = CollectorInstance.model_validate_json(platform.etcd.get(keys.metrics_collector(host)))
        return f"https://{c.address}:{c.port}/log"
    etcd_tls = etcd_client_tls(platform.root)
    ctx = client_context(ca.cert_path(platform.root))
    ctx.load_cert_chain(etcd_tls.cert, etcd_tls.key)
    with httpx.Client(verify=ctx, timeout=10) as http:
        r = http.get(collector(standby["host"]), params={"member": standby["name"]})
        assert r.status_code == 200, r.text
        got = r.json()
        assert (got["host"], got["member"]) == (standby["host"], standby["name"])
        assert line in got["text"]
        assert got["disk"]["path"].endswith(f"/members/{standby['name']}/data") and got["disk"]["total"] > 0
        for params, status in (({"member": "../x"}, 400), ({"member": f"/{standby['name']}"}, 400),
                               ({"member": f"{db}-999"}, 404)):
            r = http.get(collector(standby["host"]), params=params)
            assert r.status_code == status and r.json()["error"], (params, r.text)
        r = http.get(collector(other), params={"member": standby["name"]})
        assert r.status_code == 404, r.text
    with pytest.raises(httpx.HTTPError):
        httpx.get(collector(standby["host"]), params={"member": standby["name"]},
                  verify=client_context(ca.cert_path(platform.root)), timeout=5).raise_for_status()
