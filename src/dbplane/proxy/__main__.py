"""`python -m dbplane.proxy --etcd URL [--etcd-cacert F --etcd-cert F --etcd-key F] --id ID
--host HOST --address ADDR [--tls-dir DIR]`: one proxy process, as the agent starts it."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from ..store.tls import EtcdTLS
from .proxy import Proxy


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m dbplane.proxy")
    ap.add_argument("--etcd", required=True)
    EtcdTLS.add_arguments(ap)
    ap.add_argument("--id", required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--address", default="127.0.0.1")
    ap.add_argument("--tls-dir", type=Path)
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args()
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(Proxy(args.etcd, args.id, args.host, args.address, args.tls_dir,
                      etcd_tls=EtcdTLS.from_args(args)).run())


if __name__ == "__main__":
    main()
