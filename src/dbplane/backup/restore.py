"""Patroni's custom bootstrap for a database made by `dbplane db restore`: run by the
member that wins Patroni's initialize lock, as the service account, before PostgreSQL
first starts.

It fills the data directory from the base backups (a full one, then incremental ones
combined with pg_combinebackup), writes the restore_command script and starts the WAL
prefetcher; Patroni then starts PostgreSQL in recovery with the target from the spec and
promotes it at the end. If anything fails it says why in etcd (`restore-failed/<db>`),
where the controller turns it into the restore operation's error and rolls back.

  python -m dbplane.backup.restore --etcd URL [--etcd-cacert F --etcd-cert F --etcd-key F]
      --database NAME --member-dir DIR
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from .. import process
from ..errors import DbplaneError
from ..models import DatabaseSpec, KmsKey, PlatformConfig, RepositorySpec, RestoreSource
from ..security.kms import Kms, load_root_key
from ..store import Store, keys
from ..store.tls import EtcdTLS
from .archiver import wal_prefix
from .basebackup import backup_prefix
from .objects import decode
from .prefetch import SCRIPT, Plan
from .repository import Repository, open_repository

log = logging.getLogger("dbplane.backup.restore")


class RestoreFailed(DbplaneError):
    code = "restore_failed"
    status = 500


def extract(repo: Repository, kms: Kms, key: str, target: Path) -> None:
    """Decrypt and unpack one base backup's tar stream into `target` (GNU tar reads it
    from a pipe: no copy of the archive on disk)."""
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    proc = subprocess.Popen(["tar", "-x", "-f", "-", "-C", str(target)], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        for chunk in decode(repo.open(key), kms.decrypt_data_key):
            proc.stdin.write(chunk)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.wait() != 0:
        err = proc.stderr.read().decode(errors="replace")[-300:]
        raise RestoreFailed(f"unpacking {key} failed: {err}",
                            "check the free space of the data directory's file system")


def restore_data(repo: Repository, kms: Kms, source: RestoreSource, data_dir: Path, work: Path,
                 bin_dir: str) -> None:
    if data_dir.exists() and any(data_dir.iterdir()):
        raise RestoreFailed(f"data directory {data_dir} is not empty", "remove it and retry")
    keys_ = [backup_prefix(source.archive_id, b) + "base.tar" for b in source.chain]
    if len(keys_) == 1:
        extract(repo, kms, keys_[0], data_dir)
        return
    parts = []
    for i, key in enumerate(keys_):
        part = work / f"part-{i}"
        shutil.rmtree(part, ignore_errors=True)
        extract(repo, kms, key, part)
        parts.append(str(part))
    r = subprocess.run([f"{bin_dir}/pg_combinebackup", "-o", str(data_dir), *parts],
                       capture_output=True, text=True)
    for part in parts:
        shutil.rmtree(part, ignore_errors=True)
    if r.returncode != 0:
        raise RestoreFailed(f"pg_combinebackup failed: {r.stderr.strip()[-300:]}",
                            "the incremental chain may be broken; restore from a full backup")


def recovery_settings(source: RestoreSource, member_dir: str) -> dict:
    """Patroni's recovery_conf for the restore bootstrap (agent/patroni.py). A snapshot
    replays the WAL stored with it to its end (at least the backup's consistent point: a
    recovery_target of 'immediate' would fail when that WAL ends right there); a point in
    time replays the archive to the target."""
    conf = {"restore_command": f"/bin/sh {member_dir}/restore-wal.sh %f %p",
            "recovery_target_action": "promote",
            "recovery_target_timeline": "current" if source.target == "immediate" else "latest"}
    if source.target == "time" and source.target_time is not None:
        conf["recovery_target_time"] = datetime.fromtimestamp(source.target_time, UTC).isoformat()
    elif source.target == "lsn":
        conf["recovery_target_lsn"] = source.target_lsn
        conf["recovery_target_inclusive"] = True
    return conf


def wal_sources(source: RestoreSource) -> list[str]:
    """Where recovery's WAL comes from, first match wins: the backup's own copy for its
    consistent point; to replay further, the source's archive first (the backup's copy of
    the last segment is a partial one from when the backup ended)."""
    tip = backup_prefix(source.archive_id, source.chain[-1]) + "wal/"
    return [tip] if source.target == "immediate" else [wal_prefix(source.archive_id), tip]


async def load(etcd: str, database: str, etcd_tls: EtcdTLS | None = None):
    async with Store(etcd, tls=etcd_tls) as store:
        spec = await store.get(keys.database_spec(database), DatabaseSpec)
        if spec is None or spec.restore is None:
            raise RestoreFailed(f"database {database} has nothing to restore from", "")
        config = await store.get(keys.config(), PlatformConfig) or PlatformConfig()
        repo_spec = await store.get(keys.repository(spec.restore.repository), RepositorySpec)
        if repo_spec is None:
            raise RestoreFailed(f"repository {spec.restore.repository} does not exist", "")
        kms_keys = await store.list(keys.kms_keys(), KmsKey)
    return spec, config, repo_spec, kms_keys


async def report_failure(etcd: str, database: str, message: str, etcd_tls: EtcdTLS | None = None) -> None:
    async with Store(etcd, tls=etcd_tls) as store:
        await store.put(keys.restore_failed(database), message)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m dbplane.backup.restore")
    parser.add_argument("--etcd", required=True)
    EtcdTLS.add_arguments(parser)
    parser.add_argument("--database", required=True)
    parser.add_argument("--member-dir", required=True)
    parser.add_argument("--bin-dir", required=True)
    args, _patroni_args = parser.parse_known_args()        # Patroni adds --scope, --datadir
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s restore-{args.database} %(levelname)s %(message)s")
    member_dir = Path(args.member_dir)
    etcd_tls = EtcdTLS.from_args(args)
    try:
        spec, config, repo_spec, kms_keys = asyncio.run(load(args.etcd, args.database, etcd_tls))
        repo = open_repository(repo_spec)
        kms = Kms(load_root_key(config.kms_root_file), kms_keys)
        log.info("restoring %s from %s (backups %s)", args.database, spec.restore.source_database,
                 ", ".join(spec.restore.chain))
        restore_data(repo, kms, spec.restore, member_dir / "data", member_dir / "restore-work",
                     args.bin_dir)
        start_prefetcher(member_dir, Plan(etcd=args.etcd, etcd_tls=etcd_tls, database=args.database,
                                          repository=repo_spec, kms_root_file=config.kms_root_file,
                                          sources=wal_sources(spec.restore),
                                          spool=str(member_dir / "restore-spool")))
    except Exception as e:
        message = f"restore of {args.database} failed: {e}"
        log.error("%s", message)
        try:
            asyncio.run(report_failure(args.etcd, args.database, message, etcd_tls))
        except Exception:
            log.exception("could not report the failure")
        sys.exit(1)
    log.info("data directory restored; PostgreSQL now replays WAL")


def start_prefetcher(member_dir: Path, plan: Plan) -> None:
    """(Re)start the member's WAL prefetcher: one left by an earlier bootstrap attempt is
    stopped first, so that it cannot serve the new spool."""
    process.stop(member_dir / "prefetch.pid", timeout=5)
    spool = Path(plan.spool)
    shutil.rmtree(spool, ignore_errors=True)
    spool.mkdir(mode=0o700)
    (member_dir / "restore-plan.json").write_text(plan.model_dump_json())
    (member_dir / "restore-wal.sh").write_text(SCRIPT.replace("@SPOOL@", str(spool)))
    process.start([sys.executable, "-m", "dbplane.backup.prefetch", str(member_dir / "restore-plan.json")],
                  member_dir / "prefetch.pid", member_dir / "prefetch.log", env={**os.environ},
                  cwd=str(member_dir))

if __name__ == "__main__":
    main()
