"""`python -m dbplane.metrics [--update-docs FILE]`: print the metrics reference generated
from the catalogue, or rewrite it between the markers in FILE (docs/observability.md).

`python -m dbplane.metrics collect --etcd URL [--etcd-cacert F --etcd-cert F --etcd-key F]
--host H --zone Z --address A --data-root DIR [--interval S]`: a host's collector, as the
agent starts it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from dbplane.metrics.catalog import reference_markdown, with_reference


def collect(argv: list[str]) -> None:
    from dbplane.metrics import server
    from dbplane.metrics.collector import DEFAULT_INTERVAL, Collector
    from dbplane.store.tls import EtcdTLS

    ap = argparse.ArgumentParser(prog="python -m dbplane.metrics collect")
    ap.add_argument("--etcd", required=True)
    EtcdTLS.add_arguments(ap)
    ap.add_argument("--host", required=True, help="the host (agent) this collector belongs to")
    ap.add_argument("--zone", required=True)
    ap.add_argument("--address", default="127.0.0.1", help="where to serve https")
    ap.add_argument("--data-root", required=True, type=Path)
    ap.add_argument("--interval", type=float, default=DEFAULT_INTERVAL, help="seconds between scrapes (1-60)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    if not 1 <= args.interval <= 60:
        ap.error("--interval must be between 1 and 60 seconds")
    logging.basicConfig(level=args.log_level, stream=sys.stdout,
                        format=f"%(asctime)s metrics-{args.host} %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)      # not a line per proxy per scrape
    collector = Collector(args.etcd, args.host, args.zone, args.address, args.data_root.absolute(),
                          interval=args.interval, etcd_tls=EtcdTLS.from_args(args))
    asyncio.run(collector.run(server.start))


def main() -> None:
    if sys.argv[1:2] == ["collect"]:
        collect(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(prog="python -m dbplane.metrics",
                                 description="Print the metrics reference, or update it in a document.")
    ap.add_argument("--update-docs", metavar="FILE", help="rewrite the reference between the markers in FILE")
    args = ap.parse_args()
    if args.update_docs:
        path = Path(args.update_docs)
        path.write_text(with_reference(path.read_text()))
    else:
        print(reference_markdown())


if __name__ == "__main__":
    main()
