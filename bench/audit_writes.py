"""Benchmark: what the audit log costs etcd. Runs against a platform that is up:

    .venv/bin/python bench/audit_writes.py --data-dir /var/tmp/<yours>

1. API calls (signed `GET /v1/hosts`, user admin's key from the data root) at three
   rates: one per second (what `--wait` polling does), back to back from one client, and
   from 8 clients at once. For each, the etcd transactions the log wrote: the distinct
   mod revisions of the new keys under /dbplane/v1/audit/entries/ (one transaction writes
   a whole batch), and the growth of etcd's revision overall.
2. Throughput of one process: 9,000 entries queued with record(), then flush() timed.
3. `audit verify` through the API, timed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import threading
import time
from pathlib import Path

import httpx

from dbplane.cli.client import ApiClient
from dbplane.paths import Layout
from dbplane.security import audit
from dbplane.security.tls import etcd_client_tls
from dbplane.store import Store, keys
from dbplane.store.tls import EtcdTLS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from platform_helpers import wait_for  # noqa: E402  (the tests' condition wait)


def audit_revisions(etcd: str, etcd_tls: EtcdTLS | None) -> tuple[set[int], int, int]:
    """The mod revisions of the audit entries, etcd's revision, and how many entries."""
    prefix = keys.audit_entry(0)[:-12]
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    r = httpx.post(f"{etcd}/v3/kv/range", json={
        "key": base64.b64encode(prefix.encode()).decode(),
        "range_end": base64.b64encode(end.encode()).decode(), "keys_only": True},
        verify=etcd_tls.ssl_context() if etcd_tls else True).json()
    kvs = r.get("kvs", [])
    return {int(kv["mod_revision"]) for kv in kvs}, int(r["header"]["revision"]), len(kvs)


def api_calls(client: ApiClient, etcd: str, etcd_tls: EtcdTLS | None) -> None:
    for label, calls, pause, clients in (("1 call/s, like --wait", 10, 1.0, 1),
                                         ("back to back, 1 client", 100, 0.0, 1),
                                         ("8 clients at once", 400, 0.0, 8)):
        before, rev0, count0 = audit_revisions(etcd, etcd_tls)

        def work(n: int, pause: float = pause) -> None:
            for _ in range(n):
                client.get("/v1/hosts")
                time.sleep(pause)
        threads = [threading.Thread(target=work, args=(calls // clients,)) for _ in range(clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        # the last batch is flushed within about half a second: wait until every call is in
        want = count0 + calls
        wait_for(lambda want=want: audit_revisions(etcd, etcd_tls)[2] >= want, 10, "the audit entries")
        after, rev1, _ = audit_revisions(etcd, etcd_tls)
        txns = len(after - before)
        print(f"{label:24} {calls:4} calls in {elapsed:5.1f} s: {txns:3} audit transactions "
              f"({txns / calls:.2f} per call), etcd revision +{rev1 - rev0}")


async def throughput(etcd: str, etcd_tls: EtcdTLS | None, n: int = 9000) -> None:
    async with Store(etcd, tls=etcd_tls) as store:
        for i in range(n):
            await audit.record(store, principal="user/bench", action="bench:Record",
                               resource=f"n/{i}", source="127.0.0.1", result="allowed")
        t0 = time.monotonic()
        await audit.flush(store)
        print(f"record() x {n}, then flush(): {time.monotonic() - t0:.2f} s in "
              f"{audit.transactions(store)} transactions")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    args = ap.parse_args()
    root = Path(args.data_dir)
    info = Layout(root).read_platform()
    client = ApiClient.from_environment(str(root))
    etcd_tls = etcd_client_tls(root)          # etcd admits only clients with its certificate
    api_calls(client, info.etcd_url, etcd_tls)
    asyncio.run(throughput(info.etcd_url, etcd_tls))
    t0 = time.monotonic()
    report = client.get("/v1/audit/verify")
    print(f"verify: {report['message']} in {time.monotonic() - t0:.2f} s")


if __name__ == "__main__":
    main()
