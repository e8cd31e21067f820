"""High-availability operations on a real platform: switchover and failover, read
replicas (add, remove, promote), modify with a reload and a rolling restart, and the
refusals of each verb. Databases here are named ha-*."""

from __future__ import annotations

import asyncio
import threading

import psycopg
import pytest

from dbplane.controlplane.changes import compare, config_patch, patroni_pending
from dbplane.controlplane.replicas import wanted_zone
from dbplane.controlplane.switchover import choose_target
from dbplane.controlplane.topology import MemberView
from dbplane.errors import Conflict, DbplaneError
from dbplane.httpapi.views import read_spec, save_spec
from dbplane.models import DatabaseSpec, MemberSpec, Operation
from dbplane.parameters import postgres_parameters, same_value
from dbplane.store import keys
from platform_helpers import wait_for

integration = pytest.mark.integration


class Writer(threading.Thread):
    """Inserts one row per transaction through the writer endpoint, reconnecting when the
    primary moves, and remembers every id whose COMMIT was acknowledged."""

    def __init__(self, platform, db: str, start_id: int):
        super().__init__(daemon=True)
        self.platform, self.db, self.next_id = platform, db, start_id
        self.acked: list[int] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                with self.platform.connect(self.db, autocommit=True) as conn:
                    while not self.stop.is_set():
                        conn.execute("INSERT INTO rows (id) VALUES (%s)", (self.next_id,))
                        self.acked.append(self.next_id)
                        self.next_id += 1
            except (psycopg.Error, OSError, AttributeError):   # AttributeError: no writer yet
                self.next_id += 1          # that id's fate is unknown: never reuse it
                self.stop.wait(0.2)        # the writer endpoint is moving; look again


def roles(platform, db: str) -> dict[str, dict]:
    return {m["role"]: m for m in platform.describe(db)["members"]}


def healthy(platform, db: str, members: int) -> dict:
    """Wait until available with every member streaming (and a sync standby if Multi-AZ)."""
    def ok():
        d = platform.describe(db)
        if d["status"] != "available" or len(d["members"]) != members or d["pending_changes"]:
            return None
        if d["multi_az"] and not any(m["role"] == "sync_standby" for m in d["members"]):
            return None
        if all(m["role"] == "primary" or m["state"] == "streaming" for m in d["members"]):
            return d
        return None
    return wait_for(ok, 180, f"{db} to be available with {members} healthy members")


def show_everywhere(platform, db: str, setting: str) -> set[str]:
    values = set()
    for m in platform.describe(db)["members"]:
        with platform.connect(db, endpoint=f"{m['address']}:{m['port']}", autocommit=True) as c:
            values.add(c.execute(f"SHOW {setting}").fetchone()[0])
    return values


def events(platform, db: str, kind: str | None = None) -> list[dict]:
    return [e for e in platform.cli_json("events", db, "--limit", "500")
            if kind is None or e["kind"] == kind]


def wait_operation(platform, op_id: str, timeout: float = 300) -> dict:
    op = wait_for(lambda: (o := platform.api.get(f"/v1/operations/{op_id}").json())["state"]
                  in ("succeeded", "failed") and o, timeout, f"operation {op_id} to end")
    assert op["state"] == "succeeded", op
    return op


@pytest.fixture(scope="module")
def ha_sw(platform):
    platform.create("ha-sw", "--multi-az", "--replicas", "1")
    with platform.connect("ha-sw", autocommit=True) as c:
        c.execute("CREATE TABLE rows (id bigint PRIMARY KEY)")
    return "ha-sw"


@pytest.fixture(scope="module")
def ha_single(platform):
    platform.create("ha-single")
    return "ha-single"


@pytest.fixture(scope="module")
def ha_rep(platform):
    platform.create("ha-rep")
    with platform.connect("ha-rep", autocommit=True) as c:
        c.execute("CREATE TABLE rows (id bigint PRIMARY KEY)")
    return "ha-rep"


@pytest.fixture(scope="module")
def ha_mod(platform):
    platform.create("ha-mod", "--multi-az", "--replicas", "1")
    return "ha-mod"


# -- pure logic ---------------------------------------------------------------------------------

def _view(name, role, kind="primary_candidate", state="streaming", lag=0):
    return MemberView(name=name, role=role, zone=name[-1], host=f"host-{name[-1]}",
                      address="127.0.0.1", port=5432, api_port=8008, kind=kind, state=state,
                      lag_bytes=lag, timeline=1)


@pytest.mark.unit
def test_choose_target_defaults_to_the_sync_standby_and_refuses_the_rest():
    spec = DatabaseSpec(name="db", multi_az=True)
    views = [_view("db-a", "primary", state="running"), _view("db-b", "sync_standby"),
             _view("db-c", "replica", kind="replica")]
    primary, target = choose_target(spec, views, None, "switchover")
    assert (primary.name, target.name) == ("db-a", "db-b")
    for to, code in [("db-c", "member_is_read_replica"), ("db-x", "member_not_found"),
                     ("db-a", "already_primary")]:
        with pytest.raises(DbplaneError) as e:
            choose_target(spec, views, to, "switchover")
        assert e.value.code == code and e.value.hint
    with pytest.raises(DbplaneError) as e:
        choose_target(spec, [views[0], _view("db-b", "sync_standby", state="starting")], None,
                      "failover")
    assert e.value.code == "target_unhealthy" and "it is starting" in e.value.message
    with pytest.raises(DbplaneError) as e:
        choose_target(DatabaseSpec(name="db"), [views[0], views[2]], None, "switchover")
    assert e.value.code == "no_standby"


@pytest.mark.unit
def test_config_patch_holds_only_what_differs():
    spec = DatabaseSpec(name="db", instance_class="micro", multi_az=True)
    current = {"synchronous_mode": True,
               "postgresql": {"parameters": {**postgres_parameters(spec), "old_knob": "1"}}}
    assert config_patch(spec, current) == {"postgresql": {"parameters": {"old_knob": None}}}
    changed = spec.model_copy(update={"params": {"work_mem": "3MB"}, "multi_az": False})
    assert config_patch(changed, current) == {
        "synchronous_mode": False,
        "postgresql": {"parameters": {"work_mem": "3MB", "old_knob": None}}}


@pytest.mark.unit
def test_running_values_compare_in_server_units():
    assert same_value("48MB", "6144", "8kB", "integer")
    assert not same_value("48MB", "4096", "8kB", "integer")
    assert same_value("1s", "1000", "ms", "integer") and same_value("on", "true", None, "bool")
    replica = _view("db-b", "replica")
    wanted = {"max_connections": "50", "shared_buffers": "48MB"}
    settings = {"max_connections": ("100", None, "integer", False),    # a replica may be higher
                "shared_buffers": ("4096", "8kB", "integer", True)}     # loaded, awaits restart
    assert compare(replica, wanted, settings) == ([], ["shared_buffers"])


@pytest.mark.unit
def test_a_restored_primary_is_not_restarted_for_hot_standby():
    """Patroni recovers a restore with hot_standby off; on the promoted primary it is pending
    but has no effect, so neither pg_settings nor Patroni's flag restarts it for that alone."""
    settings = {"hot_standby": ("off", None, "bool", True)}
    assert compare(_view("db-a", "primary"), {"hot_standby": "on"}, settings) == ([], [])
    assert compare(_view("db-b", "replica"), {"hot_standby": "on"}, settings) == ([], ["hot_standby"])
    flagged = {"pending_restart": True, "pending_restart_reason": {"hot_standby": {"old_value": "off"}}}
    assert not patroni_pending(flagged, _view("db-a", "primary"))
    assert patroni_pending(flagged, _view("db-b", "replica"))
    both = {**flagged, "pending_restart_reason": {"hot_standby": {}, "max_connections": {}}}
    assert patroni_pending(both, _view("db-a", "primary"))
    assert patroni_pending({"pending_restart": True}, _view("db-a", "primary"))   # reason unknown


@pytest.mark.unit
def test_replica_zones_asked_for_are_served_first():
    spec = DatabaseSpec(name="db", replicas=3, replica_zones=["c", "c"])
    member = MemberSpec(name="db-2", database="db", host="host-c", zone="c",
                        address="127.0.0.1", pg_port=1, api_port=2, kind="replica")
    assert wanted_zone(spec, []) == "c"
    assert wanted_zone(spec, [member]) == "c"
    assert wanted_zone(spec, [member, member.model_copy(update={"name": "db-3"})]) is None


# -- switchover and failover ----------------------------------------------------------------

@integration
def test_switchover_loses_no_row(platform, ha_sw):
    before = roles(platform, ha_sw)
    old_primary, standby = before["primary"], before["sync_standby"]
    with platform.connect(ha_sw, autocommit=True) as c:
        for i in range(200):
            c.execute("INSERT INTO rows (id) VALUES (%s)", (i,))
    writer = Writer(platform, ha_sw, start_id=1000)
    writer.start()
    wait_for(lambda: len(writer.acked) >= 50, 60, "50 commits before the switchover")

    out = platform.cli("db", "switchover", ha_sw, "--wait").stdout
    assert "succeeded" in out
    after = roles(platform, ha_sw)
    assert after["primary"]["name"] == standby["name"]
    assert after["primary"]["zone"] != old_primary["zone"]
    at_switch = len(writer.acked)
    wait_for(lambda: len(writer.acked) >= at_switch + 50, 60, "50 commits after the switchover")
    writer.stop.set()
    writer.join(30)

    with platform.connect(ha_sw, autocommit=True) as c:
        present = {r[0] for r in c.execute("SELECT id FROM rows")}
    assert set(range(200)) <= present
    assert set(writer.acked) <= present, "an acknowledged commit was lost"
    switch_events = events(platform, ha_sw, "switchover")
    assert any(old_primary["name"] in e["message"] and standby["name"] in e["message"]
               for e in switch_events)
    # the old primary rejoins as the synchronous standby
    wait_for(lambda: roles(platform, ha_sw).get("sync_standby", {}).get("name")
             == old_primary["name"], 120, "the old primary to rejoin as sync standby")


@integration
def test_failover_to_named_member(platform, ha_sw):
    d = healthy(platform, ha_sw, 3)
    target = next(m for m in d["members"] if m["role"] == "sync_standby")
    op = platform.cli_json("db", "failover", ha_sw, "--to", target["name"], "--wait")
    assert op["state"] == "succeeded" and op["kind"] == "failover"
    assert roles(platform, ha_sw)["primary"]["name"] == target["name"]
    assert any(op["id"] in e["message"] for e in events(platform, ha_sw, "failover"))
    with platform.connect(ha_sw, autocommit=True) as c:
        c.execute("INSERT INTO rows (id) VALUES (-1)")


# -- refusals: one line naming cause and fix, a 4xx code, nothing changed --------------------

REFUSALS = [
    # (cli args, api request, http status, code, fragments of the message)
    (("db", "switchover", "{db}", "--to", "ha-sw-99"),
     ("POST", "/v1/databases/{db}/switchover", {"to": "ha-sw-99"}),
     404, "member_not_found", ["no member 'ha-sw-99'", "dbplane db describe"]),
    (("db", "switchover", "{db}", "--to", "{replica}"),
     ("POST", "/v1/databases/{db}/switchover", {"to": "{replica}"}),
     409, "member_is_read_replica", ["is a read replica", "replica promote", "{standby}"]),
    (("db", "failover", "{db}", "--to", "{primary}"),
     ("POST", "/v1/databases/{db}/failover", {"to": "{primary}"}),
     409, "already_primary", ["already the primary", "pick the standby"]),
    (("db", "switchover", "ha-single"),
     ("POST", "/v1/databases/ha-single/switchover", {}),
     409, "no_standby", ["no standby", "--multi-az"]),
    (("db", "failover", "ha-nothere"),
     ("POST", "/v1/databases/ha-nothere/failover", {}),
     404, "database_not_found", ["'ha-nothere' not found", "dbplane db list"]),
    (("replica", "add", "{db}", "--zone", "q"),
     ("POST", "/v1/databases/{db}/replicas", {"zone": "q"}),
     409, "zone_unavailable", ["no agent is running in zone 'q'", "choose one of a, b, c"]),
    (("replica", "remove", "{db}", "{standby}"),
     ("DELETE", "/v1/databases/{db}/replicas/{standby}", None),
     409, "not_a_read_replica", ["not a read replica", "--no-multi-az"]),
    (("replica", "promote", "{db}", "{primary}"),
     ("POST", "/v1/databases/{db}/replicas/{primary}/promote", {}),
     409, "not_a_read_replica", ["not a read replica", "switchover"]),
    (("db", "modify", "{db}", "--param", "nope=1", "--param", "work_mem=lots"),
     ("PATCH", "/v1/databases/{db}", {"params": {"nope": "1", "work_mem": "lots"}}),
     400, "invalid_parameter", ["unknown parameter 'nope'", "work_mem must be a number"]),
    (("db", "modify", "{db}", "--class", "huge"),
     ("PATCH", "/v1/databases/{db}", {"class": "huge"}),
     400, "invalid_class", ["unknown instance class 'huge'", "dbplane classes"]),
    (("db", "modify", "{db}"),
     ("PATCH", "/v1/databases/{db}", {}),
     400, "nothing_to_modify", ["nothing to modify", "--param"]),
]


@integration
@pytest.mark.parametrize("args,request_,status,code,fragments", REFUSALS,
                         ids=[r[3] + "-" + r[0][1] for r in REFUSALS])
def test_refusals(platform, ha_sw, ha_single, args, request_, status, code, fragments):
    d = healthy(platform, ha_sw, 3)
    names = {"db": ha_sw, **{r if r != "sync_standby" else "standby": m["name"]
                             for r, m in roles(platform, ha_sw).items()}}

    def fill(x):
        if isinstance(x, str):
            return x.format(**names)
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        return x
    ops_before = len(platform.api.get("/v1/operations").json())

    r = platform.cli(*[fill(a) for a in args], check=False)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and "; " in lines[0], lines[0]   # cause; fix
    for fragment in fragments:
        assert fill(fragment) in lines[0]

    method, path, body = request_
    resp = platform.api.request(method, fill(path), json=fill(body))
    assert resp.status_code == status
    assert resp.json()["error"]["code"] == code
    assert resp.json()["error"]["hint"]
    assert len(platform.api.get("/v1/operations").json()) == ops_before
    assert [m["name"] for m in platform.describe(ha_sw)["members"]] == \
        [m["name"] for m in d["members"]]


# -- read replicas ------------------------------------------------------------------------------

@integration
def test_replica_add_and_remove(platform, ha_rep):
    platform.cli("replica", "add", ha_rep, "--zone", "c", "--wait")
    d = platform.describe(ha_rep)
    assert d["replicas"] == 1
    replica = next(m for m in d["members"] if m["kind"] == "replica")
    assert replica["zone"] == "c" and replica["state"] == "streaming"
    assert d["node_endpoints"]["reader"] == f"{replica['address']}:{replica['port']}"
    with platform.connect(ha_rep, autocommit=True) as c:
        c.execute("INSERT INTO rows (id) VALUES (1)")
    with platform.connect(ha_rep, "reader", autocommit=True) as c:
        wait_for(lambda: c.execute("SELECT count(*) FROM rows WHERE id = 1").fetchone()[0] == 1,
                 30, "the row on the read replica")

    platform.cli("replica", "remove", ha_rep, replica["name"], "--wait")
    d = platform.describe(ha_rep)
    assert d["replicas"] == 0
    assert [m["role"] for m in d["members"]] == ["primary"]
    assert not (platform.layout.host_dir("host-c") / "members" / replica["name"]).exists()
    assert any(replica["name"] in e["message"] for e in events(platform, ha_rep, "member-removed"))


@integration
def test_replica_promote_to_new_database(platform, ha_rep):
    platform.cli("replica", "add", ha_rep, "--zone", "b", "--wait")
    replica = next(m for m in platform.describe(ha_rep)["members"] if m["kind"] == "replica")
    with platform.connect(ha_rep, autocommit=True) as c:
        c.execute("INSERT INTO rows SELECT g FROM generate_series(100, 199) g")
    with platform.connect(ha_rep, endpoint=f"127.0.0.1:{replica['port']}", autocommit=True) as c:
        wait_for(lambda: c.execute("SELECT count(*) FROM rows").fetchone()[0] == 101, 30,
                 "the rows on the read replica")

    op = platform.cli_json("replica", "promote", ha_rep, replica["name"],
                           "--new-name", "ha-rep-copy", "--wait")
    assert op["state"] == "succeeded" and op["database"] == "ha-rep-copy"
    copy = platform.describe("ha-rep-copy")
    assert copy["status"] == "available"
    assert copy["promoted_from"] == {"database": ha_rep, "member": replica["name"]}
    assert [(m["role"], m["zone"]) for m in copy["members"]] == [("primary", "b")]
    with platform.connect("ha-rep-copy", autocommit=True) as c:
        assert c.execute("SELECT pg_is_in_recovery()").fetchone()[0] is False
        assert c.execute("SELECT count(*) FROM rows").fetchone()[0] == 101
        c.execute("INSERT INTO rows (id) VALUES (5000)")

    source = platform.describe(ha_rep)
    assert source["replicas"] == 0
    assert replica["name"] not in [m["name"] for m in source["members"]]
    assert not (platform.layout.host_dir("host-b") / "members" / replica["name"]).exists()
    with platform.connect(ha_rep, autocommit=True) as c:   # the two now live apart
        assert c.execute("SELECT count(*) FROM rows WHERE id = 5000").fetchone()[0] == 0

    platform.cli("db", "delete", "ha-rep-copy", "--wait")


# -- modify ---------------------------------------------------------------------------------------

@integration
def test_modify_reload_parameter(platform, ha_mod):
    d = healthy(platform, ha_mod, 3)
    primary = next(m for m in d["members"] if m["role"] == "primary")
    op = platform.cli_json("db", "modify", ha_mod, "--param", "work_mem=3MB", "--wait")
    assert op["state"] == "succeeded" and op["params"]["restart"] == []
    assert show_everywhere(platform, ha_mod, "work_mem") == {"3MB"}
    d = platform.describe(ha_mod)
    assert d["params"]["work_mem"] == "3MB" and d["pending_changes"] == []
    assert roles(platform, ha_mod)["primary"]["name"] == primary["name"]   # no restart
    assert not events(platform, ha_mod, "restart")


@integration
def test_a_change_made_meanwhile_is_refused_not_lost(platform, ha_mod):
    """Two requests read the spec; one modifies it; the other's write, based on what it read
    before, is refused with 409 and writes nothing (not its spec, not its operation)."""
    async def race():
        async with platform.store() as s:
            spec, read = await read_spec(s, ha_mod)
            platform.cli("db", "modify", ha_mod, "--param", "work_mem=5MB", "--wait")   # the other request
            stale = spec.model_copy(update={"storage_gb": spec.storage_gb + 1,
                                            "generation": spec.generation + 1})
            op = Operation(kind="modify", database=ha_mod)
            with pytest.raises(Conflict) as refused:
                await save_spec(s, ha_mod, read, stale, also={keys.operation(op.id): op})
            return refused.value, await s.get_raw(keys.operation(op.id)), spec.storage_gb
    error, op_written, storage_gb = asyncio.run(race())
    assert error.code == "concurrent_change" and error.status == 409 and "run the command again" in error.hint
    assert op_written is None
    d = platform.describe(ha_mod)
    assert d["params"]["work_mem"] == "5MB" and d["storage_gb"] == storage_gb     # the other change stays


@integration
def test_modify_restart_parameter_rolls(platform, ha_mod):
    d = healthy(platform, ha_mod, 3)
    primary = next(m for m in d["members"] if m["role"] == "primary")
    standby = next(m for m in d["members"] if m["role"] == "sync_standby")
    replica = next(m for m in d["members"] if m["kind"] == "replica")

    op = platform.cli_json("db", "modify", ha_mod, "--param", "shared_buffers=48MB")
    assert op["params"]["restart"] == ["shared_buffers"]
    pending = wait_for(lambda: platform.describe(ha_mod)["pending_changes"], 60,
                       "describe to show pending changes")
    assert all(isinstance(p, str) and p for p in pending)
    wait_operation(platform, op["id"])

    d = platform.describe(ha_mod)
    assert d["pending_changes"] == [] and d["status"] == "available"
    assert show_everywhere(platform, ha_mod, "shared_buffers") == {"48MB"}
    # rolling: the read replica, then the standby, then a switchover away from the primary
    restarts = [e["message"] for e in events(platform, ha_mod, "restart")]
    assert len(restarts) == 3, restarts
    assert restarts[0].startswith(f"restarting read replica {replica['name']}")
    assert restarts[1].startswith(f"restarting sync standby {standby['name']}")
    assert restarts[2].startswith(f"switching over from {primary['name']} to {standby['name']}")
    assert roles(platform, ha_mod)["primary"]["name"] == standby["name"]


@integration
def test_modify_multi_az_off_and_on(platform, ha_mod):
    healthy(platform, ha_mod, 3)
    platform.cli("db", "modify", ha_mod, "--no-multi-az", "--wait")
    d = platform.describe(ha_mod)
    assert d["multi_az"] is False
    assert sorted(m["role"] for m in d["members"]) == ["primary", "replica"]
    with platform.connect(ha_mod, autocommit=True) as c:
        assert c.execute("SHOW synchronous_standby_names").fetchone()[0] == ""

    platform.cli("db", "modify", ha_mod, "--multi-az", "--wait")
    d = healthy(platform, ha_mod, 3)
    r = {m["role"]: m for m in d["members"]}
    assert r["sync_standby"]["zone"] != r["primary"]["zone"]
    assert show_everywhere(platform, ha_mod, "shared_buffers") == {"48MB"}   # kept


# -- a standby that cannot take over (last: it kills a node) ---------------------------------

@integration
def test_switchover_to_unhealthy_standby_is_refused(platform, ha_sw):
    d = healthy(platform, ha_sw, 3)
    standby = next(m for m in d["members"] if m["role"] == "sync_standby")
    platform.kill_node(standby["zone"])
    try:
        wait_for(lambda: next(m for m in platform.describe(ha_sw)["members"]
                              if m["name"] == standby["name"])["state"] == "host-down",
                 60, "the standby's host to count as down")
        r = platform.cli("db", "switchover", ha_sw, check=False)
        assert r.returncode != 0
        line = r.stderr.strip()
        assert "\n" not in line
        assert f"{standby['name']} cannot take over: it is host-down" in line and "; " in line
        resp = platform.api.post(f"/v1/databases/{ha_sw}/switchover", json={})
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "target_unhealthy"
    finally:
        platform.up()
    healthy(platform, ha_sw, 3)
