"""Unit tests of collection's pure parts: query results -> samples, proxy and backup state ->
samples, merging collectors' expositions, time ranges and rates, /history's parameters."""

from __future__ import annotations

import base64
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dbplane.errors import InvalidInput
from dbplane.metrics import catalog, exposition, host, pg, query, remote, server, services
from dbplane.metrics.catalog import Sample
from dbplane.models import ArchiveStatus, BackupRecord

LABELS = {"database": "orders", "member": "orders-1", "role": "primary", "zone": "a"}
NOW = 1_700_000_000.0


def reading(**over) -> pg.PgReading:
    r = pg.PgReading(
        general={"in_recovery": False, "max_connections": 100, "version_num": 180000, "locks_waiting": 2,
                 "longest_xact": 3.5, "size": 8_000_000, "statements": 0},
        database={c: i + 1 for i, c in enumerate(pg.DATABASE_COUNTERS)},
        connections={"active": 3, "idle": 5, "idle in transaction (aborted)": 1, "weird new state": 9},
        wal={"wal_records": 10, "wal_bytes": 4096, "wal_buffers_full": 0},
        checkpoints={"num_timed": 4, "num_requested": 1, "write_time": 2500.0, "sync_time": 500.0,
                     "buffers_written": 77},
        replication=[("orders-2", 1024, 0.25), ("pg_receivewal", 5, None), ("orders-3", 0, None)])
    for k, v in over.items():
        setattr(r, k, v)
    return r


def by_series(samples: list[Sample]) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples}


def value(samples, name, **labels) -> float:
    found = [s.value for s in samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_member_samples_from_query_results():
    replicas = {"orders-2": {**LABELS, "member": "orders-2", "role": "standby", "zone": "b"},
                "orders-3": {**LABELS, "member": "orders-3", "role": "replica", "zone": "c"}}
    samples = pg.member_samples(reading(), LABELS, NOW, replicas)
    for s in samples:
        catalog.validate(s)                                   # every sample is declared
    assert value(samples, "dbplane_member_up") == 1
    assert value(samples, "dbplane_pg_max_connections") == 100
    assert value(samples, "dbplane_pg_locks_waiting") == 2
    assert value(samples, "dbplane_pg_xact_commit_total") == 1
    assert value(samples, "dbplane_pg_conflicts_total") == len(pg.DATABASE_COUNTERS)
    # every state has a series (0 when none), unknown states are not counted
    assert value(samples, "dbplane_pg_connections", state="active") == 3
    assert value(samples, "dbplane_pg_connections", state="idle_in_transaction_aborted") == 1
    assert value(samples, "dbplane_pg_connections", state="fastpath") == 0
    assert len([s for s in samples if s.name == "dbplane_pg_connections"]) == len(pg.STATES)
    # milliseconds -> seconds
    assert value(samples, "dbplane_pg_checkpoint_write_seconds_total") == 2.5
    assert value(samples, "dbplane_pg_checkpoint_sync_seconds_total") == 0.5
    # lag series carry the replica's labels; a WAL sender that is not a member is skipped
    assert value(samples, "dbplane_pg_replication_lag_bytes", member="orders-2", role="standby") == 1024
    assert value(samples, "dbplane_pg_replication_lag_seconds", member="orders-2") == 0.25
    assert value(samples, "dbplane_pg_replication_lag_seconds", member="orders-3", role="replica") == 0
    assert not [s for s in samples if s.labels.get("member") == "pg_receivewal"]
    # no pg_stat_statements: enabled 0 and no statement counters
    assert value(samples, "dbplane_pg_statements_enabled") == 0
    assert not [s for s in samples if s.name.startswith("dbplane_pg_statements_c")]
    exposition.render(samples)


def test_statements_and_a_replica_without_replication_rows():
    r = reading(statements=(120.0, 3.25, 400.0), replication=[],
                general={**reading().general, "in_recovery": True, "statements": 1})
    labels = {**LABELS, "role": pg.role_of(True, "primary_candidate")}
    samples = pg.member_samples(r, labels, NOW, {})
    assert labels["role"] == "standby" and pg.role_of(True, "replica") == "replica"
    assert value(samples, "dbplane_pg_statements_enabled") == 1
    assert value(samples, "dbplane_pg_statements_calls_total") == 120
    assert value(samples, "dbplane_pg_statements_exec_seconds_total") == 3.25
    assert not [s for s in samples if s.name.startswith("dbplane_pg_replication")]


def test_a_member_that_is_down_has_only_up_zero():
    samples = pg.down_samples(LABELS, NOW)
    assert [(s.name, s.value) for s in samples] == [("dbplane_member_up", 0.0)]


def test_lag_seconds_unknown_while_behind_is_left_out():
    r = reading(replication=[("orders-2", 4096, None)])
    samples = pg.member_samples(r, LABELS, NOW, {"orders-2": {**LABELS, "member": "orders-2"}})
    assert value(samples, "dbplane_pg_replication_lag_bytes", member="orders-2") == 4096
    assert not [s for s in samples if s.name == "dbplane_pg_replication_lag_seconds"]


def test_proxy_pools_are_summed_per_database_and_host():
    stats = [{"pools": [{"database": "orders", "cl_active": 2, "cl_waiting": 1, "xact_total": 10,
                         "wait_total_s": 0.5, "errors": 1},
                        {"database": "orders", "cl_active": 1, "xact_total": 5}]},
             {"pools": [{"database": "orders", "cl_idle": 4, "xact_total": 1}]}]
    samples = services.proxy_samples(stats, "host-a", "a", NOW, databases=["empty"])
    for s in samples:
        catalog.validate(s)
    assert value(samples, "dbplane_proxy_clients_active", database="orders") == 3
    assert value(samples, "dbplane_proxy_transactions_total", database="orders") == 16
    assert value(samples, "dbplane_proxy_wait_seconds_total", database="orders") == 0.5
    assert value(samples, "dbplane_proxy_clients_idle", database="orders", host="host-a", zone="a") == 4
    assert value(samples, "dbplane_proxy_clients_active", database="empty") == 0


def test_backup_age_from_the_newest_usable_backup_and_archive_lag():
    common = {"database": "orders", "archive_id": "x", "repository": "local"}
    backups = [BackupRecord(id="1", state="available", finished_at=NOW - 600, consistent_at=NOW - 600,
                            **common),
               BackupRecord(id="2", state="available", finished_at=NOW - 60, consistent_at=NOW - 60,
                            verify_error="checksum mismatch", **common),
               BackupRecord(id="3", state="failed", finished_at=NOW - 10, **common)]
    archive = ArchiveStatus(database="orders", archive_id="x", repository="local", lag_bytes=2048,
                            lag_seconds=1.5)
    samples = services.backup_samples("orders", backups, archive, NOW)
    assert value(samples, "dbplane_backup_last_success_age_seconds") == 600
    assert value(samples, "dbplane_archive_lag_bytes") == 2048
    assert value(samples, "dbplane_archive_lag_seconds") == 1.5
    assert services.backup_samples("orders", [], None, NOW) == []


def test_disk_io_skips_loop_devices_and_converts_busy_time():
    c = SimpleNamespace(read_bytes=1, write_bytes=2, read_count=3, write_count=4, busy_time=1500)
    samples = host.disk_io_samples({"host": "h", "zone": "a"}, {"vda": c, "loop0": c}, NOW)
    assert {s.labels["device"] for s in samples} == {"vda"}
    assert value(samples, "dbplane_host_disk_io_seconds_total") == 1.5


def test_host_samples_are_declared(tmp_path):
    samples = host.host_samples({"host": "h", "zone": "a"}, tmp_path, NOW)
    names = {s.name for s in samples}
    for s in samples:
        catalog.validate(s)
    assert {"dbplane_host_cpu_usage_ratio", "dbplane_host_memory_total_bytes",
            "dbplane_host_disk_free_bytes"} <= names
    assert host.process_samples(tmp_path, LABELS, NOW) == []          # no postmaster.pid: nothing


def test_merge_has_each_family_once_and_parses():
    a = exposition.render([Sample("dbplane_member_up", LABELS, 1, NOW),
                           Sample("dbplane_host_cpu_usage_ratio", {"host": "host-a", "zone": "a"}, 0.5, NOW)])
    b = exposition.render([Sample("dbplane_member_up", {**LABELS, "member": "orders-2"}, 0, NOW),
                           Sample("dbplane_host_cpu_usage_ratio", {"host": "host-b", "zone": "b"}, 0.25, NOW),
                           Sample("dbplane_member_up", LABELS, 0, NOW)])   # a duplicate of a's series
    merged = remote.merge([a, b])
    assert merged.count("# HELP dbplane_member_up ") == 1 and merged.count("# TYPE dbplane_member_up ") == 1
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    up = {s.labels["member"]: s.value for s in families["dbplane_member_up"].samples}
    assert up == {"orders-1": 1.0, "orders-2": 0.0}                     # the first answer wins
    assert len(families["dbplane_host_cpu_usage_ratio"].samples) == 2
    # catalogue order: member_up comes before the host metrics
    assert merged.index("dbplane_member_up") < merged.index("dbplane_host_cpu_usage_ratio")
    assert remote.merge([]) == ""


def test_durations_ranges_and_steps():
    assert query.parse_duration("90s") == 90 and query.parse_duration("15m") == 900
    assert query.parse_duration("2d") == 172800 and query.parse_duration("30") == 30
    for bad in ("", "1w", "-1h", "15d", "0s"):
        with pytest.raises(InvalidInput):
            query.parse_duration(bad)
    assert query.time_range("1h", None, NOW) == (NOW - 3600, NOW)
    assert query.time_range(str(NOW - 60), NOW, NOW + 5) == (NOW - 60, NOW)
    assert query.default_step(NOW - 3600, NOW) is None
    assert query.default_step(NOW - 86400, NOW) == 240


def test_rates_handle_counter_resets():
    points = [(0, 10), (10, 30), (20, 5), (30, 25)]
    assert query.rates(points) == [(10, 2.0), (20, 0.5), (30, 2.0)]
    assert query.rates([(0, 1)]) == []


def test_history_query_parameters():
    q = server.parse_history_query("name=dbplane_member_up&database=orders&member=orders-1&step=60", NOW)
    assert q == {"name": "dbplane_member_up", "match": {"database": "orders", "member": "orders-1"},
                 "since": NOW - 3600, "until": NOW, "step": 60.0, "agg": "avg"}
    for bad in ("", "name=x&agg=median", f"name=x&since={NOW}&until={NOW - 1}"):
        with pytest.raises(ValueError):
            server.parse_history_query(bad, NOW)


class _Authority:
    async def identity(self, key_id):
        from dbplane.security import iam
        if key_id != "AKEXAMPLE1":
            raise iam.Unauthenticated("no such key", "", code="invalid_access_key")
        return SimpleNamespace(principal="user/prom", secret="s3cret")


def _request(scheme: str):
    return SimpleNamespace(url=SimpleNamespace(scheme=scheme, path="/metrics"), method="GET",
                           app=SimpleNamespace(state=SimpleNamespace(authority=_Authority())),
                           state=SimpleNamespace())


async def _basic(scheme: str, user: str, password: str):
    from dbplane.httpapi import basic_auth
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return await basic_auth.identity(_request(scheme), token)


def test_basic_auth_for_prometheus():
    import asyncio

    from dbplane.security import iam
    assert asyncio.run(_basic("https", "AKEXAMPLE1", "s3cret")).principal == "user/prom"
    for scheme, user, password, code in (("http", "AKEXAMPLE1", "s3cret", "insecure_transport"),
                                         ("https", "AKEXAMPLE1", "Xyzzy-bad", "invalid_credentials"),
                                         ("https", "AKOTHER000", "s3cret", "invalid_access_key")):
        with pytest.raises(iam.Unauthenticated) as e:
            asyncio.run(_basic(scheme, user, password))
        assert e.value.code == code
        assert "s3cret" not in str(e.value) and "Xyzzy" not in str(e.value)


def test_the_collector_endpoint_demands_a_platform_client_certificate(tmp_path):
    """The real https server on loopback with a CA made for the test: a client with a
    certificate from the CA gets /metrics and /history; one without is refused at the handshake."""
    import asyncio

    import httpx

    from dbplane.metrics.history import HistoryWriter
    from dbplane.security import ca, tls

    ca.ensure_ca(tmp_path)
    tls.ensure_leaf(tmp_path, *server.certificate(tmp_path, "host-a"), ["127.0.0.1", "localhost"], None)
    client_cert, client_key = tmp_path / "client.crt", tmp_path / "client.key"
    tls.ensure_leaf(tmp_path, client_cert, client_key, [tls.ETCD_CLIENT_NAME], None)
    sample = Sample("dbplane_member_up", LABELS, 1, NOW)
    history = HistoryWriter(tmp_path / "history.db", clock=lambda: NOW)
    history.write([sample])
    fake = SimpleNamespace(root=tmp_path, host="host-a", address="127.0.0.1", history=history, scrapes=1,
                           latest_at=NOW, latest_text=exposition.render([sample]))

    async def run():
        srv = await server.start(fake)
        port = srv.sockets[0].getsockname()[1]
        url = f"https://127.0.0.1:{port}"
        ctx = tls.client_context(ca.cert_path(tmp_path))
        ctx.load_cert_chain(client_cert, client_key)
        try:
            async with httpx.AsyncClient(verify=ctx, timeout=5) as http:
                metrics = await http.get(url + "/metrics")
                params = {"name": "dbplane_member_up", "member": "orders-1", "since": NOW - 60,
                          "until": NOW + 1}
                hist = await http.get(url + "/history", params=params)
                missing = await http.get(url + "/history")
            anonymous = tls.client_context(ca.cert_path(tmp_path))        # verifies, presents nothing
            async with httpx.AsyncClient(verify=anonymous, timeout=5) as anon:
                with pytest.raises(httpx.HTTPError):
                    r = await anon.get(url + "/metrics")
                    r.raise_for_status()
        finally:
            srv.close()
        return metrics, hist, missing

    metrics, hist, missing = asyncio.run(run())
    history.close()
    assert metrics.status_code == 200 and metrics.headers["content-type"] == exposition.CONTENT_TYPE
    assert 'dbplane_member_up{database="orders"' in metrics.text
    assert hist.json()["series"][0]["points"] == [[NOW, 1.0]]
    assert missing.status_code == 400


def test_the_grafana_dashboard_uses_documented_metrics():
    import json
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).parent.parent / "docs" / "grafana" / "dbplane.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {name for e in exprs for name in re.findall(r"\bdbplane_[a-z_]+", e)}
    assert used and used <= set(catalog.BY_NAME), used - set(catalog.BY_NAME)
    for e in exprs:                               # counters only through rate() or increase()
        for name in re.findall(r"\bdbplane_[a-z_]+_total\b", e):
            assert re.search(rf"(rate|increase)\({name}\b", e), e


class _Store:
    """What the collector reads from etcd, in memory."""

    def __init__(self, members, specs):
        self.members, self.specs = members, specs

    async def list(self, prefix, model):
        from dbplane.store import keys
        if prefix == keys.members():
            return list(self.members)
        return []

    async def get(self, key, model):
        return self.specs.get(key)

    async def get_raw(self, key):
        return b"fast-1" if key.endswith("/fast/leader") else None


def test_each_member_follows_its_database_interval(tmp_path, monkeypatch):
    """Members of a database with metrics_interval 1 are scraped every second, the others
    and the host every 10 s; /metrics keeps each target's newest samples; a member that
    leaves the host leaves the scrape."""
    import asyncio

    from dbplane.metrics.collector import Collector
    from dbplane.metrics.history import HistoryWriter
    from dbplane.models import DatabaseSpec, MemberSpec
    from dbplane.store import keys

    def member(db, n):
        return MemberSpec(name=f"{db}-{n}", database=db, host="host-a", zone="a", address="127.0.0.1",
                          pg_port=1, api_port=2)
    store = _Store([member("fast", 1), member("slow", 1)],
                   {keys.database_spec("fast"): DatabaseSpec(name="fast", metrics_interval=1),
                    keys.database_spec("slow"): DatabaseSpec(name="slow")})
    clock = [100.0]
    c = Collector("http://unused", "host-a", "a", "127.0.0.1", tmp_path, clock=lambda: clock[0])
    c.history = HistoryWriter(tmp_path / "history.db")
    scraped = []

    async def scrape_member(store_, m, peers, leaders, now):
        scraped.append(m.name)
        labels = c.member_labels(m, "primary" if leaders.get(m.database) == m.name else "standby")
        return pg.down_samples(labels, now), False

    async def nothing(*args):
        return []
    monkeypatch.setattr(c, "scrape_member", scrape_member)
    monkeypatch.setattr(c, "scrape_proxies", nothing)
    monkeypatch.setattr(c, "scrape_backups", nothing)

    async def run(seconds):
        for _ in range(seconds):
            await c.collect(store)
            clock[0] += 1
    asyncio.run(run(10))
    assert scraped.count("fast-1") == 10 and scraped.count("slow-1") == 1
    assert 'member="fast-1",role="primary"' in c.latest_text and 'member="slow-1"' in c.latest_text
    assert c.next_due() == clock[0]                      # fast-1 is due again now
    store.members = [member("fast", 1)]                  # slow-1 moved to another host
    clock[0] += 2                                        # past the topology cache
    asyncio.run(run(1))
    assert 'member="slow-1"' not in c.latest_text and "dbplane_host_cpu_usage_ratio" in c.latest_text
    c.history.close()


def test_log_query_parameters():
    from dbplane.metrics import member_log
    assert member_log.parse_log_query("member=orders-1") == ("orders-1", member_log.DEFAULT_TAIL_BYTES)
    assert member_log.parse_log_query("member=orders-12&bytes=100") == ("orders-12", 100)
    assert member_log.parse_log_query("member=a1-2&bytes=99999999999") == ("a1-2", member_log.MAX_TAIL_BYTES)
    for bad in ("", "member=", "bytes=10", "member=orders", "member=../x", "member=..%2Fx",
                "member=orders-1/..", "member=/etc/passwd", "member=%2Fetc%2Fpasswd", "member=orders-1%00",
                "member=Orders-1", "member=.orders-1", "member=orders-1&bytes=-5", "member=orders-1&bytes=0",
                "member=orders-1&bytes=1e3", "member=orders-1&bytes=abc"):
        with pytest.raises(ValueError):
            member_log.parse_log_query(bad)


def test_the_doctor_and_insights_tails_fit_the_collectors_limit():
    from dbplane.doctor import diagnose
    from dbplane.metrics import insights_read, member_log
    assert diagnose.LOG_TAIL_BYTES == member_log.DEFAULT_TAIL_BYTES
    assert insights_read.LOG_TAIL_BYTES <= member_log.MAX_TAIL_BYTES


def _members_dirs(root):
    """host-a has orders-1 (with a log) and orders-3, a symlink to host-b's orders-2."""
    a, b = root / "hosts" / "host-a" / "members", root / "hosts" / "host-b" / "members"
    (a / "orders-1" / "data").mkdir(parents=True)
    (a / "orders-1" / "patroni.log").write_text("".join(f"line {i}\n" for i in range(1000)))
    (b / "orders-2").mkdir(parents=True)
    (b / "orders-2" / "patroni.log").write_text("host-b's secret\n")
    (a / "orders-3").symlink_to(b / "orders-2")


def test_a_collector_reads_only_its_own_hosts_members(tmp_path):
    from dbplane.metrics import member_log
    _members_dirs(tmp_path)
    got = member_log.read(tmp_path, "host-a", "orders-1", 9)
    assert got["text"] == "line 999\n" and got["host"] == "host-a" and got["member"] == "orders-1"
    assert got["disk"]["path"].endswith("/hosts/host-a/members/orders-1/data")
    assert 0 < got["disk"]["free"] <= got["disk"]["total"]
    assert member_log.read(tmp_path, "host-a", "orders-1", 10**9)["text"].startswith("line 0\n")
    for member in ("orders-2", "orders-3", "orders-9", "../orders-1", "/etc", "..", ""):
        with pytest.raises(member_log.UnknownMember):
            member_log.member_dir(tmp_path, "host-a", member)
    assert member_log.read_tail(tmp_path / "missing.log", 10) == ""


class _CollectorStore:
    def __init__(self, found):
        self.found = found

    async def list(self, prefix, model):
        from dbplane.store import keys
        assert prefix == keys.metrics_collectors()
        return list(self.found)


def test_member_logs_through_the_collectors_log_endpoint(tmp_path):
    """The real https server (a CA made for the test) and remote.member_logs as the doctor
    calls it: a member's tail and disk; 400 for a name that is not a member's, 404 for one
    not on the host; a host with no collector and one whose collector is gone each leave an
    error, never an exception."""
    import asyncio
    import socket

    from dbplane.models import CollectorInstance
    from dbplane.security import ca, tls

    _members_dirs(tmp_path)
    ca.ensure_ca(tmp_path)
    tls.ensure_leaf(tmp_path, *server.certificate(tmp_path, "host-a"), ["127.0.0.1", "localhost"], None)
    tls.ensure_leaf(tmp_path, *tls.etcd_client_certificate(tmp_path), [tls.ETCD_CLIENT_NAME], None)
    fake = SimpleNamespace(root=tmp_path, host="host-a", address="127.0.0.1")
    with socket.socket() as s:                            # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]

    async def run():
        srv = await server.start(fake)
        port = srv.sockets[0].getsockname()[1]
        url = f"https://127.0.0.1:{port}/log"
        store = _CollectorStore([CollectorInstance(host="host-a", zone="a", address="127.0.0.1", port=port,
                                                   pid=1, interval=10),
                                 CollectorInstance(host="host-c", zone="c", address="127.0.0.1",
                                                   port=dead_port, pid=1, interval=10)])
        http = remote.client(tmp_path, 5)
        try:
            direct = {q: await http.get(url + q) for q in
                      ("?member=orders-1&bytes=9", "?member=../x", "?member=%2Fetc%2Fpasswd",
                       "?member=orders-2", "?member=orders-3", "?bytes=9")}
            asked = [("orders-1", "host-a"), ("orders-2", "host-a"), ("orders-4", "host-b"),
                     ("orders-5", "host-c")]
            logs = await remote.member_logs(store, tmp_path, asked, 9)
        finally:
            await http.aclose()
            srv.close()
        return direct, logs

    direct, logs = asyncio.run(run())
    assert direct["?member=orders-1&bytes=9"].json()["text"] == "line 999\n"
    for q, status in (("?member=../x", 400), ("?member=%2Fetc%2Fpasswd", 400), ("?bytes=9", 400),
                      ("?member=orders-2", 404), ("?member=orders-3", 404)):
        assert direct[q].status_code == status and direct[q].json()["error"], q
    assert "secret" not in "".join(r.text for r in direct.values())
    ok, elsewhere, no_collector, gone = logs
    assert (ok.member, ok.text, ok.error) == ("orders-1", "line 999\n", "")
    assert ok.disk["path"].endswith("orders-1/data") and ok.disk["total"] > 0
    assert elsewhere.error == "collector on host host-a answered 404: no member orders-2 on host host-a"
    assert elsewhere.text == "" and elsewhere.disk is None
    assert no_collector.note == ("the log of orders-4 could not be read: "
                                 "no collector is registered for host host-b (is its agent running?)")
    assert gone.note.startswith("the log of orders-5 could not be read: "
                                "collector on host host-c did not answer: ConnectError"), gone.note
