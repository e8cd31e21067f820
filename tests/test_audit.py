"""The audit log on a real platform: API calls (allowed and refused) and security events
recorded with who, what, resource, source, result and time; appends from several
processes; `audit verify`; and, on a platform of this module's own (the shared one's log
is never tampered with), edited, deleted and rewritten entries, and trimming."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time

import httpx
import pytest

from dbplane.security import audit
from dbplane.security.audit_chain import AuditHead, canonical, entry_hash
from dbplane.store import Store, keys
from dbplane.store.gateway import Gateway
from platform_helpers import Platform, new_data_root, one_line_error, wait_for

pytestmark = pytest.mark.integration

INTACT = re.compile(r"^chain intact: (\d+) entries from seq (\d+) to (\d+)")


def listing(platform, *args: str) -> list[dict]:
    return platform.cli_json("audit", "list", "--since", "10m", *args)


def recorded(platform, what: str, *args: str, n: int = 1) -> list[dict]:
    """Wait for at least n entries matching the filters (the log flushes within 0.5 s)."""
    return wait_for(lambda: len(found := listing(platform, *args)) >= n and found, 15, what)


def admin(platform) -> str | None:
    """Who the CLI is: user admin once authentication is on, else nobody."""
    return "user/admin" if (platform.root / "credentials").exists() else None


def run(platform, fn):
    """fn(store) in an event loop, against the platform's etcd."""
    async def main():
        async with platform.store() as store:
            return await fn(store)
    return asyncio.run(main())


def verify(platform) -> subprocess.CompletedProcess:
    return platform.cli("audit", "verify", check=False)


def assert_intact(platform) -> tuple[int, int, int]:
    r = verify(platform)
    assert r.returncode == 0, r.stderr
    m = INTACT.match(r.stdout)
    assert m, r.stdout
    return int(m[1]), int(m[2]), int(m[3])


# -- the shared platform: recording -------------------------------------------------------

def test_api_calls_are_recorded_with_who_what_where_and_result(platform):
    name = "audit-missing"
    one_line_error(platform.cli("db", "describe", name, check=False), "(database_not_found)")
    platform.cli("hosts")
    [e] = recorded(platform, "the refused describe", "--resource", f"*/{name}")
    assert e["principal"] == admin(platform)
    assert e["action"] in ("db:DescribeDatabases", "GET /v1/databases/{name}")
    assert e["resource"] in (f"db/{name}", f"/v1/databases/{name}")
    assert e["source"] == "127.0.0.1" and e["kind"] == "api"
    assert (e["result"], e["status"], e["code"]) == ("error", 404, "database_not_found")
    assert abs(e["time"] - time.time()) < 120 and e["hash"] == entry_hash(e)
    hosts = [h for h in recorded(platform, "the hosts call", "--action", "*ost*")
             if h["action"] in ("platform:DescribeHosts", "GET /v1/hosts")]
    assert hosts and (hosts[0]["result"], hosts[0]["status"], hosts[0]["code"]) == ("allowed", 200, "")

    table = platform.cli("audit", "list", "--since", "10m", "--resource", f"*/{name}").stdout
    header = table.splitlines()[0].split()
    assert header == ["TIME", "PRINCIPAL", "ACTION", "RESOURCE", "SOURCE", "RESULT"]
    assert "error 404 database_not_found" in table and "127.0.0.1" in table
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", table)


def test_an_unsigned_call_is_recorded_without_principal_and_nothing_secret(platform):
    with httpx.Client(base_url=platform.info.api_url, timeout=30, verify=platform.verify) as anonymous:
        r = anonymous.get("/v1/databases/audit-anonymous", params={"password": "hunter2-in-query"},
                          headers={"Authorization": "Bearer not-a-real-token-x9"})
    [e] = recorded(platform, "the unsigned call", "--resource", "*audit-anonymous")
    assert e["principal"] is None and e["status"] == r.status_code
    assert e["result"] == ("denied" if r.status_code in (401, 403) else "error")
    assert e["code"] == r.json()["error"]["code"]
    assert "hunter2" not in json.dumps(e) and "not-a-real-token" not in json.dumps(e)


def test_record_from_outside_the_api(platform):
    async def refuse(store):
        await audit.record(store, principal=None, action="proxy:Connect", resource="db/audit-orders",
                           source="203.0.113.7", result="denied", code="allowlist_refused",
                           detail="203.0.113.7 is not in the allowlist of audit-orders")
        await audit.flush(store)          # what a component does before it closes its store
        return await audit.list_entries(store, audit.Filters(action="proxy:Connect",
                                                             resource="db/audit-orders"))
    flushed, _ = run(platform, refuse)
    assert len(flushed) == 1                 # written by flush(), no waiting
    [e] = listing(platform, "--action", "proxy:*", "--result", "denied", "--resource", "db/audit-orders")
    assert (e["kind"], e["principal"], e["source"], e["code"]) == \
        ("event", None, "203.0.113.7", "allowlist_refused")
    assert e["detail"] == "203.0.113.7 is not in the allowlist of audit-orders" and e["status"] is None


WRITER = """
import asyncio, sys
from pathlib import Path
from dbplane.security import audit
from dbplane.security.tls import etcd_client_tls
from dbplane.store import Store

async def main(url, root, name, n):
    async with Store(url, tls=etcd_client_tls(Path(root))) as store:
        for i in range(n):
            await audit.record(store, principal=name, action="test:Append", resource=f"n/{i}",
                               source="127.0.0.1", result="allowed")
            if i % 7 == 0:
                await asyncio.sleep(0.01)
        await audit.flush(store)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


def test_appends_from_several_processes_serialise(platform):
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, platform.info.etcd_url, str(platform.root),
                               f"writer/{i}", "150"]) for i in range(3)]
    for _ in range(5):                       # and the API appends at the same time
        platform.cli("hosts")
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    got = listing(platform, "--principal", "writer/*", "--limit", "1000")
    assert len(got) == 450
    assert len({e["seq"] for e in got}) == 450
    for i in range(3):
        mine = sorted((e for e in got if e["principal"] == f"writer/{i}"), key=lambda e: e["seq"])
        assert [e["resource"] for e in mine] == [f"n/{j}" for j in range(150)]   # in order
    assert_intact(platform)


def test_verify_and_paging(platform):
    n, first, last = assert_intact(platform)
    assert n == last - first + 1 and n >= 450
    report = platform.cli_json("audit", "verify")
    assert report["ok"] and report["checkpoints"] >= 1 and len(report["head_hash"]) == 64
    page = platform.cli_json("audit", "list", "--limit", "5")
    assert len(page) == 5 and [e["seq"] for e in page] == sorted((e["seq"] for e in page), reverse=True)
    more = platform.api.get("/v1/audit", params={"limit": 3}).json()
    after = platform.api.get("/v1/audit", params={"limit": 3, "next_token": more["next_token"]}).json()
    assert after["entries"][0]["seq"] == more["entries"][-1]["seq"] - 1
    one_line_error(platform.cli("audit", "list", "--since", "yesterday", check=False),
                   "invalid time 'yesterday'", "(invalid_time)")
    r = platform.api.get("/v1/audit", params={"next_token": "abc"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_next_token"


# -- a platform of this module's own: tampering and trimming --------------------------------

@pytest.fixture(scope="module")
def own():
    p = Platform(new_data_root("dbplane-audit-"))
    try:
        p.up()
        for _ in range(3):
            p.cli("hosts")
        yield p
    finally:
        p.destroy()


async def fill(store: Store, n: int) -> None:
    for i in range(n):
        await audit.record(store, principal="user/filler", action="test:Fill", resource=f"n/{i}",
                           source="127.0.0.1", result="allowed")
    await audit.flush(store)


def entry_of(gw: Gateway, seq: int) -> bytes:
    raw = gw.get(keys.audit_entry(seq))
    assert raw is not None
    return raw


def test_an_edited_entry_is_named(own):
    gw = own.etcd
    _, first, last = assert_intact(own)
    seq = first + 1
    original = entry_of(gw, seq)
    doc = json.loads(original)
    gw.put(keys.audit_entry(seq), canonical({**doc, "principal": "user/nobody"}).decode())
    try:
        line = one_line_error(verify(own), f"audit log tampered: entry {seq} (", "hash mismatch",
                              "(audit_tampered)")
        assert re.search(rf"entry {seq} \(\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ\)", line)
        report = json.loads(own.cli("audit", "verify", "-o", "json", check=False).stdout)
        assert not report["ok"] and report["seq"] == seq and report["time"] == doc["time"]
    finally:
        gw.put(keys.audit_entry(seq), original.decode())
    assert_intact(own)


def test_a_deleted_entry_is_named_as_a_gap(own):
    gw = own.etcd
    _, first, _ = assert_intact(own)
    seq = first + 2
    original = entry_of(gw, seq)
    gw.delete(keys.audit_entry(seq))
    try:
        one_line_error(verify(own), f"entry {seq}: missing: entry {seq} is gone",
                       f"from entry {seq - 1} to entry {seq + 1}")
    finally:
        gw.put(keys.audit_entry(seq), original.decode())
    assert_intact(own)


def test_trimming_keeps_a_signed_anchor_and_verify_passing(own):
    assert own.cli_json("audit", "settings", "--max-entries", "100")["max_entries"] == 100

    _, first_before, _ = assert_intact(own)
    run(own, lambda store: fill(store, 150))
    run(own, audit.trim)            # the API's writer may have trimmed first: both are fine
    n, first, last = assert_intact(own)
    assert first > first_before and n <= 100 + 5
    assert f"{first - 1} older entries trimmed by retention" in verify(own).stdout
    gw = own.etcd
    assert gw.get(keys.audit_entry(first - 1)) is None and gw.get(keys.audit_entry(first)) is not None

    # by age: everything older than a day, seen from two days ahead, except the newest
    own.cli("audit", "settings", "--retention-days", "1", "--max-entries", "200000")
    run(own, lambda store: audit.trim(store, now=time.time() + 2 * audit.DAY))
    n, first, last = assert_intact(own)
    assert n <= 5 and f"{first - 1} older entries trimmed" in verify(own).stdout
    one_line_error(own.cli("audit", "settings", "--max-entries", "10", check=False),
                   "max_entries 10 is out of range", "(invalid_audit_settings)")


def test_a_consistent_rewrite_without_the_key_fails_the_signatures(own):
    """Last in this module: it leaves the own platform's log tampered."""
    gw = own.etcd
    run(own, lambda store: fill(store, 120))     # at least one checkpoint by count
    _, first, last = assert_intact(own)
    head = wait_for(lambda: (h := AuditHead.model_validate_json(gw.get(keys.audit_head()))).seq > last
                    and h, 15, "the verify call's own entry")          # nothing appends after it
    # the attacker changes one entry and recomputes every hash after it, and the head's
    prev = json.loads(entry_of(gw, first))["hash"]
    for seq in range(first + 1, head.seq + 1):
        doc = json.loads(entry_of(gw, seq))
        doc["prev_hash"] = prev
        if seq == first + 1:
            doc["source"] = "10.9.9.9"
        doc["hash"] = prev = entry_hash(doc)
        gw.put(keys.audit_entry(seq), canonical(doc).decode())
    gw.put(keys.audit_head(), head.model_copy(update={"hash": prev}).model_dump_json())
    one_line_error(verify(own), "do not match the signed", "the chain was rewritten")
    # without the checkpoints it is the head's signature that fails; and later appends,
    # which the API signs, do not bless the rewritten chain
    for k in gw.get_prefix(keys.audit_checkpoint(0)[:-12]):
        gw.delete(k)
    own.cli("hosts")
    one_line_error(verify(own), "bad head signature")
