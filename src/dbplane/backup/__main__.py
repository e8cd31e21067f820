"""`python -m dbplane.backup`: the backup worker of one host (started by its agent)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from ..store.tls import EtcdTLS
from .worker import BackupWorker


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m dbplane.backup")
    parser.add_argument("--etcd", required=True, help="etcd URL")
    EtcdTLS.add_arguments(parser)
    parser.add_argument("--host", required=True, help="the host (agent) this worker belongs to")
    parser.add_argument("--bin-dir", required=True, help="PostgreSQL's bin directory (pg_basebackup)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"%(asctime)s backup-{args.host} %(levelname)s %(name)s: %(message)s")
    asyncio.run(BackupWorker(args.etcd, args.host, args.bin_dir, etcd_tls=EtcdTLS.from_args(args)).run())


if __name__ == "__main__":
    main()
