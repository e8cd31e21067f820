"""The web console without a platform: its WebCrypto signing (console/static/signing.js)
computes exactly what security/signing.py computes (the same canonical query, string to
sign and signature; run under node, and for real by tests/test_console.py's sign-in), and
the API serves its files, and only them, without authentication."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from dbplane.console.routes import FILES, MEDIA_TYPES, STATIC_DIR, shipped_files
from dbplane.httpapi.app import create_app
from dbplane.security import signing

pytestmark = pytest.mark.unit

NODE = shutil.which("node")

CASES = [
    # method, path, query, host, body
    ("POST", "/v1/session-token", "", "127.0.0.1:24002", b'{"duration_seconds":3600}'),
    ("get", "/v1/events", "limit=50&database=orders", "LOCALHOST:8443", b""),
    ("GET", "/v1/snapshots", "type=manual&database=a&database=B&a=2&a=10&flag", "h", b""),
    ("GET", "/v1/x%20y", "q=hello+world&s=%21%2A%27%28%29&u=%E2%9C%93&e=&k=a%3Db", "h:1", b""),
    ("PATCH", "/v1/databases/orders", "odd=%zz&=novalue&&", "api", "é ✓ 日本".encode()),
]


def _run_node(tmp_path: Path, cases: list[tuple]) -> list[dict]:
    module = tmp_path / "signing.mjs"                 # .mjs: node loads it as an ES module
    module.write_text((STATIC_DIR / "signing.js").read_text())
    script = tmp_path / "run.mjs"
    script.write_text("""
import { canonicalQuery, stringToSign, sign, signingDate } from "./signing.mjs";
const cases = JSON.parse(process.argv[2]);
const out = [];
for (const c of cases) {
  const body = Buffer.from(c.body, "base64");
  const headers = await sign("DPAKTESTTESTTESTTEST", c.secret, c.method, c.path, c.query, c.host,
                             new Uint8Array(body), { date: c.date, nonce: c.nonce });
  out.push({ query: canonicalQuery(c.query), headers,
             sts: await stringToSign(c.method, c.path, c.query, c.host, c.date, c.nonce,
                                     headers["X-Dbplane-Content-SHA256"]),
             date: signingDate(new Date(Date.UTC(2026, 10, 24, 6, 35, 0, 789))) });
}
console.log(JSON.stringify(out));
""")
    payload = [{"method": m, "path": p, "query": q, "host": h, "body": base64.b64encode(b).decode(),
                "secret": "s3cr3t/+=é", "date": "20261124T063500Z", "nonce": "ab" * 16}
               for m, p, q, h, b in cases]
    r = subprocess.run([NODE, str(script), json.dumps(payload)], capture_output=True, text=True,
                       timeout=30, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.skipif(NODE is None, reason="node is not installed: tests/test_console.py checks the "
                    "signing by signing in")
def test_js_signing_matches_python(tmp_path):
    results = _run_node(tmp_path, CASES)
    for (method, path, query, host, body), js in zip(CASES, results, strict=True):
        assert js["query"] == signing.canonical_query(query), query
        content = signing.body_hash(body)
        sts = signing.string_to_sign(method, path, query, host, "20261124T063500Z", "ab" * 16, content)
        assert js["sts"] == sts
        assert js["headers"]["X-Dbplane-Content-SHA256"] == content
        expected = signing.signature("s3cr3t/+=é", sts)
        assert js["headers"]["Authorization"] == \
            f"{signing.ALGORITHM} Credential=DPAKTESTTESTTESTTEST, Signature={expected}"
        signing.verify("s3cr3t/+=é", expected, method, path, query, host, "20261124T063500Z",
                       "ab" * 16, content, body)
        assert js["date"] == "20261124T063500Z"


def test_only_shipped_files_are_served():
    assert {"index.html", "app.js", "signing.js", "console.css"} <= set(FILES)
    assert all(p.suffix in MEDIA_TYPES and STATIC_DIR in p.parents for p in FILES.values())
    assert shipped_files(STATIC_DIR / "no-such-dir") == {}


def test_console_files_are_public_and_data_is_not():
    asyncio.run(_check_console_routes())


async def _check_console_routes():
    transport = httpx.ASGITransport(app=create_app("https://127.0.0.1:1"))   # no lifespan: no etcd
    async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as client:
        await _check_routes(client)


async def _check_routes(client: httpx.AsyncClient) -> None:
    page = await client.get("/console/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert (await client.get("/console/app.js")).headers["content-type"].startswith("text/javascript")
    assert (await client.get("/console")).headers["location"] == "/console/"
    for path in ("/console/nope.js", "/console/../pyproject.toml", "/console/%2e%2e/routes.py",
                 "/console/__init__.py"):
        r = await client.get(path)
        assert r.status_code == 404, path
    assert (await client.get("/v1/databases")).status_code == 401


def _copy_modules(where: Path) -> None:
    """The console's modules as node loads them (ES modules; nothing touches the DOM on import)."""
    for path in STATIC_DIR.glob("*.js"):
        (where / path.name).write_text(path.read_text())
    (where / "package.json").write_text('{"type": "module"}')


def _node(where: Path, script: str, *args: str):
    (where / "run.js").write_text(script)
    r = subprocess.run([NODE, "run.js", *args], capture_output=True, text=True, timeout=30, cwd=where)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_chart_data_sums_states_and_rates_counters(tmp_path):
    """metrics.js draws connections summed per member and counters as per-second rates,
    with a counter reset counted from 0 (as Prometheus' rate())."""
    _copy_modules(tmp_path)
    series = [
        {"name": "dbplane_pg_connections", "labels": {"member": "db-1", "state": "idle"},
         "points": [[100, 2], [110, 3]]},
        {"name": "dbplane_pg_connections", "labels": {"member": "db-1", "state": "active"},
         "points": [[100, 1], [110, 1]]},
        {"name": "dbplane_pg_connections", "labels": {"member": "db-2", "state": "idle"},
         "points": [[100, 5]]},
        {"name": "dbplane_pg_xact_commit_total", "labels": {"member": "db-1"},
         "points": [[100, 50], [110, 150], [120, 20]]},
    ]
    connections, commits = _node(tmp_path, """
import { perMember } from "./metrics.js";
const series = JSON.parse(process.argv[2]);
const plain = (m) => Object.fromEntries(m);
console.log(JSON.stringify([plain(perMember(series, "dbplane_pg_connections")),
                            plain(perMember(series, "dbplane_pg_xact_commit_total", true))]));
""", json.dumps(series))
    assert connections == {"db-1": [[100, 3], [110, 4]], "db-2": [[100, 5]]}
    assert commits == {"db-1": [[110, 10], [120, 2]]}


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_alarms_list_alarm_first_with_the_cli_condition(tmp_path):
    """alarms.js lists ALARM, then INSUFFICIENT_DATA, then OK (by name within a state) and
    writes the condition as `dbplane alarms list` does (cli/alarm_cmds.py)."""
    from dbplane.cli.alarm_cmds import condition
    _copy_modules(tmp_path)
    alarms = [{"name": n, "state": s} for n, s in
              [("b-ok", "OK"), ("a-ok", "OK"), ("z-alarm", "ALARM"), ("c-insufficient", "INSUFFICIENT_DATA"),
               ("a-alarm", "ALARM")]]
    spec = {"metric": "dbplane_pg_connections", "labels": {"role": "primary"},
            "denominator": "dbplane_pg_max_connections", "statistic": "max", "comparison": ">",
            "threshold": 0.8, "period": 60, "evaluation_periods": 5, "datapoints_to_alarm": 3}
    order, text, values = _node(tmp_path, """
import { condition, formatValue, sortAlarms } from "./alarms.js";
const [alarms, spec] = JSON.parse(process.argv[2]);
console.log(JSON.stringify([sortAlarms(alarms).map((a) => a.name), condition(spec),
                            [formatValue(null), formatValue(0.123456), formatValue(2)]]));
""", json.dumps([alarms, spec]))
    assert order == ["a-alarm", "z-alarm", "c-insufficient", "a-ok", "b-ok"]
    assert text == condition(spec) == \
        "max(dbplane_pg_connections{role=primary} / dbplane_pg_max_connections) > 0.8 for 3 of 5 x 60 s"
    assert values == ["—", "0.1235", "2"]


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_load_bars_add_up_the_members_average_active_sessions(tmp_path):
    """insights.js bins the API's load timeline (two members' 10 s flushes side by side) into
    bars of the database's average active sessions: the two members' loads add up, a raw
    point stands for 10 s; beyond 1 h the points are step averages and stand for the step
    (the API's point_seconds)."""
    _copy_modules(tmp_path)
    # 15 minutes: bars of 20 s; member A flushes at :00, :10, B at :03, :13
    raw = [[1000, {"CPU": 1.0}], [1003, {"CPU": 0.5, "Lock": 2.0}], [1010, {"CPU": 1.0}],
           [1013, {"CPU": 0.5}], [1020, {"CPU": 3.0}]]
    stepped = [[7200, {"CPU": 2.0}], [7440, {"CPU": 1.0, "IO": 0.5}]]      # 24 h: step 240 s
    raw_bars, step_bars = _node(tmp_path, """
import { loadBars } from "./insights.js";
const [raw, stepped] = JSON.parse(process.argv[2]);
console.log(JSON.stringify([loadBars(raw, 200, 1100, 10), loadBars(stepped, 0, 86400, 240)]));
""", json.dumps([raw, stepped]))
    assert raw_bars["width"] == 20
    assert raw_bars["bars"] == [{"start": 1000, "byType": {"CPU": 1.5, "Lock": 1.0}},
                                {"start": 1020, "byType": {"CPU": 1.5}}]
    assert step_bars["width"] == 1440                  # 240 s x 6: at most 60 bars over 24 h
    assert step_bars["bars"] == [{"start": 7200, "byType": {"CPU": pytest.approx(0.5),
                                                            "IO": pytest.approx(0.5 / 6)}}]
