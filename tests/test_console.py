"""The web console in real headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright; no browser is downloaded) against the session's platform, over https with the
platform CA trusted by the browser (a private NSS database in the browser's HOME).

Sign-in exchanges the access key for a session token by signing in the browser (WebCrypto),
so a successful sign-in also proves the JS signing matches security/signing.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import uuid
from pathlib import Path

import httpx
import pytest

from dbplane.security import ca, credentials
from platform_helpers import wait_for

CHROMIUM = Path("/usr/bin/chromium")
PREFIX = "console-"
# CPU-heavy (a few hundred ms), so that it leads top SQL and the load has CPU bars
INSIGHTS_SQL = "select count(*) from generate_series(1, 2000000) g where g % 7 = 3 /* console-insights */"

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed "
                                 "(/usr/bin/chromium; scripts/test installs it with apt-get as root)")]


@pytest.fixture(scope="module")
def console_url(platform) -> str:
    return f"{platform.info.api_url}/console/"


@pytest.fixture(scope="module")
def admin_key(platform) -> credentials.Credentials:
    return credentials.read_profile(credentials.data_root_file(platform.root), "default")


@pytest.fixture(scope="module")
def browser_home(platform, tmp_path_factory) -> Path | None:
    """A HOME whose NSS database trusts the platform CA: Chromium on Linux verifies server
    certificates against $HOME/.pki/nssdb. None without certutil (libnss3-tools)."""
    certutil = shutil.which("certutil")
    if certutil is None:
        return None
    home = tmp_path_factory.mktemp("chromium-home")
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run([certutil, "-N", "-d", f"sql:{nssdb}", "--empty-password"], check=True)
    subprocess.run([certutil, "-A", "-d", f"sql:{nssdb}", "-n", "dbplane platform CA", "-t", "C,,",
                    "-i", str(ca.cert_path(platform.root))], check=True)
    return home


@pytest.fixture(scope="module")
def playwright():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        yield pw


def launch(playwright, home: Path | None):
    """Debian's chromium; with `home`, it verifies certificates against home's NSS database."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                      env={**os.environ, "HOME": str(home)} if home else None,
                                      args=["--headless", "--no-sandbox", "--disable-gpu"])


@pytest.fixture(scope="module")
def browser(playwright, browser_home):
    b = launch(playwright, browser_home)
    yield b
    b.close()


@pytest.fixture
def page(browser, browser_home):
    # Without certutil the CA cannot be installed: the TLS check is then httpx's alone
    # (test_console_is_public_and_served_over_verified_tls).
    context = browser.new_context(ignore_https_errors=browser_home is None)
    p = context.new_page()
    p.set_default_timeout(20_000)
    yield p
    context.close()


@pytest.fixture(scope="module")
def database(platform):
    name = f"{PREFIX}{uuid.uuid4().hex[:6]}"
    yield name
    platform.delete_all(PREFIX)


def sign_in(page, url: str, key_id: str, secret: str) -> None:
    page.goto(url)                     # raises net::ERR_CERT_* unless the platform CA is trusted
    page.get_by_label("Access key ID").fill(key_id)
    page.get_by_label("Secret access key").fill(secret)
    page.get_by_role("button", name="Sign in").click()


def screenshot(page, name: str) -> None:
    """With DBPLANE_CONSOLE_SCREENSHOTS=DIR, keep a full-page PNG to look at."""
    where = os.environ.get("DBPLANE_CONSOLE_SCREENSHOTS")
    if where:
        page.screenshot(path=str(Path(where) / f"{name}.png"), full_page=True)


def zone_of(member) -> str:
    return member.locator("xpath=ancestor::div[@data-zone]").get_attribute("data-zone")


def storage_dump(page) -> str:
    return page.evaluate("() => JSON.stringify([Object.entries(sessionStorage), "
                         "Object.entries(localStorage)])")


def test_console_is_public_and_served_over_verified_tls(platform, console_url):
    assert console_url.startswith("https://")
    with httpx.Client(verify=platform.verify, timeout=30) as http:       # the platform CA, verified
        r = http.get(console_url)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["x-frame-options"] == "DENY"
        js = http.get(f"{console_url}signing.js")
        assert js.headers["content-type"].startswith("text/javascript") and "HMAC" in js.text
        assert http.get(f"{console_url}nope.js").status_code == 404
        assert http.get(f"{console_url}..%2Fauth.py").status_code == 404
        assert http.get(console_url.rstrip("/"), follow_redirects=False).headers["location"] == "/console/"
        assert http.get(f"{platform.info.api_url}/v1/databases").status_code == 401    # data stays signed


def test_browser_trusts_the_console_only_through_the_platform_ca(playwright, browser_home, console_url,
                                                                 tmp_path):
    """The trust is the NSS database's doing: the same Chromium with an empty HOME refuses."""
    if browser_home is None:
        pytest.skip("certutil (libnss3-tools) is missing: the browser tests ignore certificate errors")
    from playwright.sync_api import Error
    b = launch(playwright, tmp_path)
    try:
        with pytest.raises(Error, match="ERR_CERT_AUTHORITY_INVALID"):
            b.new_page().goto(console_url)
    finally:
        b.close()


def test_bad_secret_shows_the_sign_in_error(page, console_url, admin_key):
    sign_in(page, console_url, admin_key.key_id, "not-the-secret")
    alert = page.get_by_role("alert")
    alert.wait_for()
    assert "signature does not match" in alert.inner_text()
    assert "invalid_signature" in alert.inner_text()
    assert page.get_by_label("Secret access key").input_value() == ""
    assert storage_dump(page) == "[[],[]]"


def test_sign_in_keeps_only_the_session_token(page, console_url, admin_key):
    sign_in(page, console_url, admin_key.key_id, admin_key.secret)
    page.get_by_role("heading", name="Databases", exact=True, level=1).wait_for()
    assert page.get_by_test_id("principal").inner_text() == "user/admin"
    dump = storage_dump(page)
    assert admin_key.secret not in dump
    session = json.loads(page.evaluate("() => sessionStorage.getItem('dbplane.session')"))
    assert session["token"].startswith("dbpst1.") and session["principal"] == "user/admin"
    assert page.evaluate("() => localStorage.length") == 0
    assert admin_key.secret not in page.content()
    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("button", name="Sign in").wait_for()
    assert storage_dump(page) == "[[],[]]"


def test_create_topology_and_switchover(platform, page, console_url, admin_key, database):
    sign_in(page, console_url, admin_key.key_id, admin_key.secret)
    page.get_by_role("button", name="Create database").click()
    page.get_by_label("Name").fill(database)
    page.get_by_label("Instance class").select_option("micro")
    page.get_by_label("Multi-AZ", exact=False).check()
    page.get_by_label("Continuous backups").uncheck()
    page.get_by_role("button", name="Create", exact=True).click()
    page.locator("#create-database [data-tracking]").wait_for()
    page.locator("#create-database [data-tracking][data-state=succeeded]").wait_for(timeout=180_000)

    row = page.locator(f"tr[data-database='{database}']")
    row.locator("[data-status=available]").wait_for(timeout=30_000)
    assert "Multi-AZ" in row.inner_text()
    assert re.search(r"127\.0\.0\.1:\d+", row.inner_text())                      # writer endpoint

    screenshot(page, "databases")
    row.get_by_role("link", name=database).click()
    page.get_by_role("heading", name=database, exact=True).wait_for()
    topology = page.locator("#topology")
    primary = topology.locator(".zone .member[data-role=primary]")
    standby = topology.locator(".zone .member[data-role=sync_standby]")
    primary.wait_for()
    standby.wait_for(timeout=60_000)
    old_primary = primary.get_attribute("data-member")
    assert zone_of(primary) != zone_of(standby)
    assert zone_of(primary) == platform.member(database, "primary")["zone"]
    assert "lag" in standby.inner_text()
    page.locator("#events tbody tr[data-event-kind]").first.wait_for()
    page.locator("#operations tr[data-kind=create]").first.wait_for()
    screenshot(page, "database")
    page.get_by_role("button", name="Switchover", exact=True).click()
    page.get_by_role("button", name=f"Switchover {database}").click()
    page.locator("#action-result [data-tracking]").wait_for()
    page.locator("#action-result [data-tracking][data-state=succeeded]").wait_for(timeout=120_000)
    wait_for(lambda: platform.member(database, "primary")["name"] != old_primary, 30, "the new primary")
    new_primary = page.locator(f".zone .member[data-role=primary]:not([data-member='{old_primary}'])")
    new_primary.wait_for(timeout=30_000)
    page.locator("#operations tr[data-kind=switchover] [data-status=succeeded]").wait_for()

    # charts of the collectors' real points (every 10 s; the panel refreshes every 15 s)
    if platform.api.get(f"/v1/databases/{database}/metrics").status_code == 404:
        page.locator("#metrics").get_by_text("No metrics yet").wait_for()
    else:
        for metric in ("dbplane_member_up", "dbplane_pg_connections"):
            chart = page.locator(f"#metrics figure[data-chart={metric}]")
            # attached, not "visible": a flat line has an empty bounding box
            chart.locator("svg polyline, svg circle").first.wait_for(state="attached", timeout=60_000)
            assert int(chart.get_attribute("data-points")) > 0
            assert old_primary in chart.locator(".legend").inner_text()
        screenshot(page, "database-metrics")


def test_restricted_user_sees_access_denied(platform, page, console_url, database):
    admin = platform.api
    user = f"console-viewer-{uuid.uuid4().hex[:6]}"
    policy = f"{user}-policy"
    doc = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["db:Describe*", "backup:Describe*", "platform:Describe*"],
         "Resource": "*"}]}
    assert admin.post("/v1/iam/users", json={"name": user}).status_code == 201
    r = admin.post("/v1/iam/policies", json={"name": policy, "document": json.dumps(doc)})
    assert r.status_code == 201, r.text
    assert admin.post(f"/v1/iam/users/{user}/policies", json={"policy": policy}).status_code == 200
    key = admin.post(f"/v1/iam/users/{user}/access-keys").json()
    try:
        sign_in(page, console_url, key["id"], key["secret_access_key"])
        page.get_by_test_id("principal").wait_for()
        assert page.get_by_test_id("principal").inner_text() == f"user/{user}"
        page.goto(f"{console_url}#/databases/{database}")
        page.locator("#topology .member[data-role=primary]").wait_for(timeout=30_000)   # may describe
        page.get_by_role("button", name="Create snapshot", exact=True).click()
        page.get_by_role("button", name=f"Create snapshot {database}").click()
        alert = page.locator("#action-result [role=alert]")
        alert.wait_for()
        text = alert.inner_text()
        assert "Access denied" in text and "access_denied" in text
        assert f"user/{user} is not allowed to backup:CreateSnapshot on db/{database}" in text
        assert "Hint:" in text
        denied = page.locator("#alarms [role=alert]")           # no alarms:DescribeAlarms: the panel says so
        denied.wait_for()
        assert "Access denied" in denied.inner_text() and "alarms:DescribeAlarms" in denied.inner_text()
        screenshot(page, "access-denied")
    finally:
        admin.delete(f"/v1/iam/access-keys/{key['id']}")
        admin.delete(f"/v1/iam/users/{user}/policies/{policy}")
        admin.delete(f"/v1/iam/users/{user}")
        admin.delete(f"/v1/iam/policies/{policy}")


def test_alarms_and_performance_insights(platform, page, console_url, admin_key, database):
    """The Alarms page lists the database's default alarms with their state, ALARM first; an
    alarm's page shows its state history; the database page lists its alarms and its
    performance insights: load bars by wait event and, in top SQL, a statement run here."""
    stop = threading.Event()

    def burn():
        with platform.connect_node(database, autocommit=True) as conn:
            for _ in range(1000):                      # bounded: a few minutes at most
                if stop.is_set():
                    break
                conn.execute(INSIGHTS_SQL)
    worker = threading.Thread(target=burn)
    worker.start()
    try:
        sign_in(page, console_url, admin_key.key_id, admin_key.secret)
        page.get_by_role("navigation", name="Main").get_by_role("link", name="Alarms").click()
        page.get_by_role("heading", name="Alarms", exact=True, level=1).wait_for()
        alarm = f"{database}-connections"
        row = page.locator(f"#alarm-list tr[data-alarm='{alarm}']")
        row.wait_for(timeout=30_000)               # the controller makes the defaults once it is available
        assert row.locator(".badge").get_attribute("data-status") in ("OK", "ALARM", "INSUFFICIENT_DATA")
        assert "max(dbplane_pg_connections / dbplane_pg_max_connections) > 0.8" in row.inner_text()
        rows = page.locator("#alarm-list tbody tr[data-alarm]")
        states = rows.evaluate_all("rows => rows.map((r) => r.dataset.state)")
        order = ["ALARM", "INSUFFICIENT_DATA", "OK"]
        assert states == sorted(states, key=order.index), states
        screenshot(page, "alarms")

        # the same rule on a 10 s period: its first decision comes 10 s after the alarm was made,
        # not a default minute (periods before an alarm existed do not count)
        platform.cli("alarms", "set", alarm, "--database", database, "--metric", "dbplane_pg_connections",
                     "--denominator", "dbplane_pg_max_connections", "--statistic", "max",
                     "--threshold", "0.8", "--period", "10")
        row.get_by_role("link", name=alarm).click()
        page.get_by_role("heading", name=alarm, exact=True).wait_for()
        change = page.locator("#alarm-history tr[data-change]").first
        change.wait_for(timeout=60_000)            # its first evaluation with data: INSUFFICIENT_DATA -> OK
        assert change.locator(".badge").count() == 2
        history = platform.api.get(f"/v1/alarms/{alarm}").json()["history"]
        assert change.get_attribute("data-change") in {f"{c['old']}>{c['new']}" for c in history}
        screenshot(page, "alarm")

        page.locator("#alarm-definition").get_by_role("link", name=database).click()
        page.get_by_role("heading", name=database, exact=True).wait_for()
        page.locator(f"#alarms tr[data-alarm='{alarm}'] [data-status]").wait_for()
        insights = page.locator("#insights")
        statement = insights.locator("tr[data-query]", has_text="console-insights")
        statement.wait_for(timeout=60_000)         # the panel refreshes every 15 s
        assert "generate_series" in statement.inner_text()
        # attached, not "visible": a thin bar may have an empty bounding box
        insights.locator("figure[data-chart=load] svg rect[data-wait=CPU]").first.wait_for(
            state="attached", timeout=60_000)
        assert int(insights.locator("figure[data-chart=load]").get_attribute("data-bars")) > 0
        assert insights.locator("tr[data-wait-event='CPU:CPU']").count() == 1
        screenshot(page, "insights")
    finally:
        stop.set()
        worker.join(30)


def test_pasted_session_token_signs_in(platform, page, console_url):
    token = platform.api.post("/v1/session-token", json={"duration_seconds": 900}).json()["token"]
    page.goto(console_url)
    page.get_by_text("Use a session token instead").click()
    page.get_by_label("Session token").fill(token)
    page.get_by_role("button", name="Use token").click()
    page.get_by_role("heading", name="Databases", exact=True, level=1).wait_for()
    assert page.get_by_test_id("principal").inner_text() == "user/admin"
