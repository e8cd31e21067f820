"""Benchmark: dbplane's backups and restores versus plain PostgreSQL tools, in one run on
one platform: base backup and restore throughput of a database of about 1 GB against
pg_basebackup and tar -x, WAL archive throughput at peak WAL rate, and the time of a
point-in-time restore that replays the archived WAL.

    .venv/bin/python bench/backup_restore.py --scale 70

Setup: `dbplane up` in a fresh data root under /var/tmp (mode 755), then
`dbplane db create src --class small --no-multi-az --wait` (one member, so backups are
taken from the primary, as the peers are), the first automated backup (of the empty
database) awaited, then `pgbench -i -s SCALE` into a database `bench` owned by the admin
user, on the primary's own port (the admin password reaches pgbench only through
PGPASSFILE). Automated incremental backups are switched off (`dbplane backup modify
--incremental-every-hours 0`) so that nothing but the measured work runs.

Steps (`--runs` repeats 2-4, alternating whether dbplane or the peers go first):

  1. load      pgbench -i -s SCALE; the database size is pg_database_size('bench').
               The WAL archive is watched while it runs (pgbench -i is a WAL burst too).
  2. snapshot  `dbplane snapshot create src --id bench-N --wait`, timed to the CLI's
               return. Its catalog record in etcd is polled every 0.2 s meanwhile, which
               splits it into: queued (request -> started_at), stream (started_at -> the
               record gets its size: checkpoint + pg_basebackup + zstd + AES-GCM + write
               + fsync), WAL (wait for the archive + copy the backup's WAL -> finished_at),
               verify (-> verified_at: decrypt, untar, SHA-256 of every file) and the CLI's
               1 s poll. Sizes from the record: size_bytes (plain), stored_bytes.
  3. peers     the same primary, as the service account over TCP as `replicator`
               (password in a 0600 PGPASSFILE): `pg_basebackup -D DIR -Ft -X fetch -c
               fast` (plain tar), then with -z (gzip), and with --compress=client-zstd:1
               (dbplane compresses with zstd level 1) if --peers names zstd (the embedded
               PostgreSQL build may lack zstd: then it is reported as unsupported).
               A CHECKPOINT precedes every backup (dbplane's and the peers'), outside the
               timing, so the first backup does not pay for the others' dirty buffers.
  4. restore   `dbplane db restore bench-rN --from-snapshot bench-N --class small --wait`,
               timed to the CLI's return (available: placement, Patroni bootstrap, decrypt +
               decompress + untar, recovery to the consistent point, promotion); split by
               the restored member's patroni.log (the restore script's and PostgreSQL's
               lines). Peer: `tar -x` of the plain pg_basebackup tar into an empty
               directory as the service account (untar only), then `pg_ctl start -w` of a
               PostgreSQL on it (crash recovery from backup_label to consistency, until it
               accepts connections). The restored databases are checked (row count of
               pgbench_accounts) and deleted again.
  5. archive   on the source, while the archive's position is sampled every 0.5 s
               (primary: pg_current_wal_lsn() and pg_stat_replication.flush_lsn of the
               archiver's walsender, which is what the archive holds durably; etcd
               archive-status: archived_lsn and lag_bytes, which the worker publishes at
               most every 5 s): `pgbench -c 4 -j 2 -T 30` (tpcb-like), then a bulk
               INSERT ... SELECT from pgbench_accounts until --bulk-mb MB of WAL. Per
               phase: WAL rate, archive rate (flush_lsn delta / time), peaks over 2 s
               windows, peak and final lag; then the time until the archive holds all the
               WAL written up to the end of the load (drain).
  6. PITR      first `VACUUM (ANALYZE)` of the pgbench tables and bulk on the source and
               their row counts, so that the source is quiet during the restore (with
               wal_log_hints=on the first reads of freshly loaded rows write full-page
               images: hundreds of MB of WAL), and the archive is awaited. Then
               `dbplane db restore bench-pitr --from src --latest --wait`: the newest
               automated backup (of the empty database, taken right after create) plus
               the archived WAL of everything above, replayed through the prefetcher.
               WAL replayed = archived LSN - the backup's stop LSN (an LSN distance: it
               includes the unused rest of segments switched by backups). Checked: the
               restored pgbench_history and bulk row counts equal the source's. Several
               bootstrap attempts or prefetcher errors in the member's logs are reported.

The platform is stopped (`dbplane down`) and its data root removed at the end, also on
errors (--keep leaves the platform running); the peers' directory is always removed and
a peer PostgreSQL always stopped. Every wait and loop is bounded in time and count.
MB = 2^20 bytes. Machine: other work on the same machine (e.g. tests) disturbs the
numbers; the load average at start and end is reported.
"""

from __future__ import annotations

import argparse
import calendar
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import psycopg

from dbplane.backup.wal import format_lsn, parse_lsn
from dbplane.models import ArchiveStatus, BackupRecord, DatabaseSecrets, DatabaseSpec
from dbplane.security import db_secrets
from dbplane.store import keys
from dbplane.store.gateway import Gateway
from dbplane.system import ensure_service_account, postgres_bin_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from machine import commit, first_line, machine  # noqa: E402  (bench/)

from platform_helpers import Platform, new_data_root, wait_for  # noqa: E402

SRC = "src"
BENCH_DB = "bench"
CLASS = "small"
MB = 1 << 20
PEERS = ("plain", "gzip", "zstd")
DEFAULT_PEERS = ("plain", "gzip")   # zstd only if this PostgreSQL build has it
CREATE_TIMEOUT_S = 600
LOAD_TIMEOUT_S = 3600
BACKUP_TIMEOUT_S = 3600
RESTORE_TIMEOUT_S = 3600
DRAIN_TIMEOUT_S = 600
SAMPLE_S = 0.5
MAX_SAMPLES = 20000                 # the archive sampler's bound (~2.7 h at 0.5 s)
BULK_MAX_STATEMENTS = 200
ARCHIVER_APP = "dbplane_archiver"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- small helpers ------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mb(n: float | None) -> str:
    return "-" if n is None else f"{n / MB:,.1f}"


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)[.,](\d{3})( UTC)?")


def log_time(line: str) -> float | None:
    """Patroni's timestamps are local time with a comma, PostgreSQL's UTC with a dot."""
    m = LOG_TS.match(line)
    if not m:
        return None
    t = time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")
    base = calendar.timegm(t) if m.group(3) else time.mktime(t)
    return base + int(m.group(2)) / 1000


# -- the benchmark ------------------------------------------------------------------------

@dataclass
class Op:
    """One timed operation."""
    step: str                  # backup, restore, pitr
    tool: str                  # dbplane, pg_basebackup, ...
    run: int
    seconds: float | None
    moved_bytes: int | None = None      # bytes the tool read or wrote (plain)
    stored_bytes: int | None = None     # bytes on disk afterwards
    phases: dict[str, float] = field(default_factory=dict)
    detail: str = ""
    error: str = ""


@dataclass
class Phase:
    name: str
    t0: float
    t1: float
    wal0: int = 0
    wal1: int = 0
    note: str = ""


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.root = new_data_root("dbplane-bench-backup-")
        self.p = Platform(self.root)
        self.work = Path(tempfile.mkdtemp(prefix="dbplane-bench-peer-", dir="/var/tmp"))
        self.work.chmod(0o755)
        self.run_as = ensure_service_account()
        if self.run_as:
            os.chown(self.work, self.run_as.uid, self.run_as.gid)
        self.ops: list[Op] = []
        self.setup: dict = {}
        self.archive: dict = {}
        self.notes: list[str] = []
        self.peer_pg: Path | None = None             # data dir of a running peer PostgreSQL
        self.db_bytes = 0
        self.plain_size: dict[int, int] = {}         # run -> bytes of the plain peer tar

    # -- platform access ------------------------------------------------------------------

    @property
    def gw(self) -> Gateway:
        return self.p.etcd

    def records(self, db: str = SRC) -> list[BackupRecord]:
        raw = self.gw.get_prefix(keys.backups(db)).values()
        return sorted((BackupRecord.model_validate_json(v) for v in raw), key=lambda b: b.started_at)

    def record(self, db: str, backup_id: str) -> BackupRecord | None:
        raw = self.gw.get(keys.backup(db, backup_id))
        return BackupRecord.model_validate_json(raw) if raw else None

    def archive_status(self, db: str = SRC) -> ArchiveStatus | None:
        raw = self.gw.get(keys.archive_status(db))
        return ArchiveStatus.model_validate_json(raw) if raw else None

    def secrets(self, db: str = SRC) -> DatabaseSecrets:
        return db_secrets.load_sync(self.gw, keys.secrets(db))

    def primary(self, db: str) -> dict:
        return self.p.member(db, "primary")

    def admin(self, db: str, dbname: str = BENCH_DB, **kw) -> psycopg.Connection:
        m, d = self.primary(db), self.p.describe(db)
        return psycopg.connect(host=m["address"], port=m["port"], user=d["admin_user"],
                               passfile=str(self.p.layout.pgpass(db)), dbname=dbname,
                               connect_timeout=10, autocommit=True, sslmode="disable", **kw)

    def superuser(self, db: str = SRC, dbname: str = "postgres") -> psycopg.Connection:
        m = self.primary(db)
        return psycopg.connect(host=m["address"], port=m["port"], user="postgres",
                               password=self.secrets(db).superuser, dbname=dbname,
                               connect_timeout=10, autocommit=True, sslmode="disable",
                               application_name="bench-backup-restore")

    def ids(self) -> dict:
        """subprocess kwargs that run a child as the service account (root only)."""
        if not self.run_as:
            return {}
        return {"user": self.run_as.uid, "group": self.run_as.gid, "extra_groups": []}

    def pg_env(self, passfile: Path | None = None) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update({"PGCONNECT_TIMEOUT": "10", "LC_ALL": "C"})
        if passfile is not None:
            env["PGPASSFILE"] = str(passfile)
        return env

    def checkpoint(self) -> None:
        with self.superuser() as c:
            c.execute("CHECKPOINT")

    def wal_lsn(self) -> int:
        with self.superuser() as c:
            return parse_lsn(c.execute("select pg_current_wal_lsn()::text").fetchone()[0])

    def archiver_flush(self, conn: psycopg.Connection) -> int | None:
        row = conn.execute("select flush_lsn::text from pg_stat_replication "
                           "where application_name = %s", (ARCHIVER_APP,)).fetchone()
        return parse_lsn(row[0]) if row and row[0] else None

    def wait_archived(self, what: str, timeout: float = DRAIN_TIMEOUT_S) -> float:
        """Wait until the archive holds the WAL written so far; returns the seconds waited."""
        t0 = time.monotonic()
        with self.superuser() as c:
            target = parse_lsn(c.execute("select pg_current_wal_lsn()::text").fetchone()[0])
            wait_for(lambda: (f := self.archiver_flush(c)) is not None and f >= target,
                     timeout, f"the archive to reach {format_lsn(target)} ({what})", 0.2)
        return time.monotonic() - t0

    # -- 1. platform, database, load ------------------------------------------------------

    def start(self) -> None:
        log(f"data root {self.root}, peer work dir {self.work}")
        self.p.up()
        t0 = time.monotonic()
        self.p.cli("db", "create", SRC, "--class", CLASS, "--no-multi-az", "--wait",
                   timeout=CREATE_TIMEOUT_S)
        log(f"created {SRC} in {time.monotonic() - t0:.1f} s")
        self.p.cli("backup", "modify", SRC, "--incremental-every-hours", "0")
        first = wait_for(lambda: next((b for b in self.records() if b.usable and not b.manual), None),
                         300, "the first automated backup", 1.0)
        log(f"first automated backup {first.id} ({mb(first.size_bytes)} MB)")
        d = self.p.describe(SRC)
        m = self.primary(SRC)
        with self.admin(SRC, "postgres") as c:
            c.execute(f"CREATE DATABASE {BENCH_DB}")
        with self.superuser() as c:
            ssl = c.execute("show ssl").fetchone()[0]
            settings = dict(c.execute(
                "select name, current_setting(name) from pg_settings where name in "
                "('shared_buffers', 'max_wal_size', 'wal_compression', 'checkpoint_timeout', "
                "'full_page_writes', 'summarize_wal', 'wal_segment_size')").fetchall())
        self.setup = {
            "database": f"{SRC}: class {CLASS}, single-AZ (1 member), primary {m['name']} "
                        f"{m['address']}:{m['port']} on {m['host']}",
            "admin_user": d["admin_user"],
            "server ssl": f"{ssl} (pg_basebackup of dbplane and of the peers use libpq's "
                          f"default sslmode=prefer)",
            "settings": ", ".join(f"{k}={v}" for k, v in sorted(settings.items())),
            "first automated backup": f"{first.id}: {mb(first.size_bytes)} MB, stop "
                                      f"{first.stop_lsn}",
        }
        self.load()

    def load(self) -> None:
        m, d = self.primary(SRC), self.p.describe(SRC)
        argv = [f"{postgres_bin_dir()}/pgbench", "-i", "-s", str(self.args.scale), "-q",
                "-h", m["address"], "-p", str(m["port"]), "-U", d["admin_user"], BENCH_DB]
        env = {**self.pg_env(self.p.layout.pgpass(SRC)), "PGSSLMODE": "disable"}
        log(f"pgbench -i -s {self.args.scale}")
        sampler = Sampler(self)
        sampler.start()
        try:
            t0 = time.monotonic()
            ph = sampler.begin("pgbench -i")
            r = subprocess.run(argv, capture_output=True, text=True, timeout=LOAD_TIMEOUT_S, env=env)
            sampler.end(ph)
            load_s = time.monotonic() - t0
            if r.returncode != 0:
                raise RuntimeError(f"pgbench -i exited {r.returncode}: {r.stderr.strip()[-500:]}")
            drain = sampler.drain(ph.wal1)
        finally:
            sampler.stop()
        self.archive["load"] = sampler.summary(drain)
        with self.admin(SRC) as c:
            self.db_bytes = c.execute("select pg_database_size(%s)", (BENCH_DB,)).fetchone()[0]
            total = c.execute("select sum(pg_database_size(oid)) from pg_database").fetchone()[0]
        self.setup["load"] = (f"pgbench -i -s {self.args.scale}: {load_s:.1f} s, "
                              f"{mb(ph.wal1 - ph.wal0)} MB of WAL")
        self.setup["database size"] = (f"pg_database_size('{BENCH_DB}') = {mb(self.db_bytes)} MB "
                                       f"({self.db_bytes:,} bytes); all databases {mb(total)} MB")
        log(f"loaded in {load_s:.1f} s: {mb(self.db_bytes)} MB; archive drained "
            f"{fmt(drain)} s after the load")

    # -- 2. dbplane snapshot --------------------------------------------------------------

    def dbplane_backup(self, run: int) -> Op:
        sid = f"bench-{run}"
        self.wait_archived("before the snapshot")
        self.checkpoint()
        watch = RecordWatch(self, SRC, sid)
        watch.start()
        t0 = time.time()
        try:
            r = self.p.cli("snapshot", "create", SRC, "--id", sid, "--wait", check=False,
                           timeout=BACKUP_TIMEOUT_S)
        finally:
            t1 = time.time()
            watch.stop()
        op = Op("backup", "dbplane snapshot", run, t1 - t0)
        rec = self.record(SRC, sid)
        if r.returncode != 0 or rec is None or rec.state != "available":
            op.error = (r.stderr or r.stdout).strip()[-300:] or f"state {rec and rec.state}"
            return op
        op.moved_bytes, op.stored_bytes = rec.size_bytes, rec.stored_bytes
        ph = {"queued": rec.started_at - t0}
        if watch.sized_at is not None:
            ph["stream"] = watch.sized_at - rec.started_at
            ph["manifest+wal"] = rec.finished_at - watch.sized_at
        ph["verify"] = rec.verified_at - rec.finished_at
        ph["cli poll"] = t1 - rec.verified_at
        op.phases = ph
        logline = self.worker_log_lines(rec)
        op.detail = (f"{rec.start_lsn}..{rec.stop_lsn}, compression {rec.size_bytes / rec.stored_bytes:.2f}x"
                     + (f"; worker log: {logline}" if logline else ""))
        return op

    def worker_log_lines(self, rec: BackupRecord) -> str:
        """The worker log's start and end lines of a backup, with their times."""
        path = self.p.layout.host_dir(rec.host) / "backup.log"
        try:
            lines = [ln for ln in path.read_text(errors="replace").splitlines() if f" {rec.id} " in ln]
        except OSError:
            return ""
        times = [(log_time(ln), ln) for ln in lines]
        times = [(t, ln) for t, ln in times if t is not None]
        if len(times) >= 2:
            return (f"'{times[0][1].split(': ', 1)[-1]}' -> '{times[-1][1].split(': ', 1)[-1]}' "
                    f"{times[-1][0] - times[0][0]:.1f} s apart")
        return ""

    # -- 3. peers ---------------------------------------------------------------------------

    def peer_passfile(self) -> Path:
        path = self.work / "pgpass"
        if not path.exists():
            pw = self.secrets().replication.replace("\\", "\\\\").replace(":", "\\:")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"*:*:*:replicator:{pw}\n")
            if self.run_as:
                os.chown(path, self.run_as.uid, self.run_as.gid)
        return path

    def peer_backup(self, run: int, kind: str) -> Op:
        m = self.primary(SRC)
        out = self.work / f"basebackup-{kind}-{run}"
        argv = [f"{postgres_bin_dir()}/pg_basebackup", "-h", m["address"], "-p", str(m["port"]),
                "-U", "replicator", "-w", "-D", str(out), "-Ft", "-X", "fetch", "-c", "fast"]
        argv += {"plain": [], "gzip": ["-z"], "zstd": ["--compress=client-zstd:1"]}[kind]
        tool = {"plain": "pg_basebackup -Ft", "gzip": "pg_basebackup -Ft -z",
                "zstd": "pg_basebackup -Ft -Z client-zstd:1"}[kind]
        self.checkpoint()
        t0 = time.monotonic()
        r = subprocess.run(argv, capture_output=True, text=True, timeout=BACKUP_TIMEOUT_S,
                           env=self.pg_env(self.peer_passfile()), **self.ids())
        op = Op("backup", tool, run, time.monotonic() - t0)
        if r.returncode != 0:
            op.seconds = None
            if "does not support compression" in r.stderr:       # a build without zstd
                op.detail = "unsupported: " + r.stderr.strip()[-200:]
            else:
                op.error = r.stderr.strip()[-300:]
            shutil.rmtree(out, ignore_errors=True)
            return op
        op.stored_bytes = dir_bytes(out)
        if kind == "plain":
            op.moved_bytes = op.stored_bytes
        else:
            op.detail = f"compression {self.plain_size.get(run, 0) / op.stored_bytes:.2f}x vs the plain tar" \
                if self.plain_size.get(run) else ""
            shutil.rmtree(out, ignore_errors=True)        # only the plain tar is restored
        if kind == "plain":
            self.plain_size[run] = op.stored_bytes
        return op

    # -- 4. restores ------------------------------------------------------------------------

    def dbplane_restore(self, run: int, step: str, name: str, *source: str) -> Op:
        t0 = time.time()
        r = self.p.cli("db", "restore", name, *source, "--class", CLASS, "--wait", check=False,
                       timeout=RESTORE_TIMEOUT_S)
        t1 = time.time()
        op = Op(step, "dbplane db restore", run, t1 - t0)
        if r.returncode != 0:
            op.seconds, op.error = None, (r.stderr or r.stdout).strip()[-400:]
            op.detail = self.restore_log_tail(name)
            return op
        op.phases, extra = self.restore_phases(name, t0, t1)
        op.detail = extra
        return op

    def member_dir(self, db: str) -> Path | None:
        for m in self.p.describe(db)["members"]:
            d = self.p.layout.host_dir(m["host"]) / "members" / m["name"]
            if d.exists():
                return d
        hosts = self.root / "hosts"
        found = sorted(hosts.glob(f"*/members/{db}-*"))
        return found[0] if found else None

    def restore_log_tail(self, db: str) -> str:
        """Why a restore failed: the lines that say so in the member's patroni.log (or the
        copy kept in the host's removed/ folder) and prefetch.log."""
        hosts = self.root / "hosts"
        logs = sorted(hosts.glob(f"*/members/{db}-*/patroni.log")) + sorted(
            hosts.glob(f"*/removed/{db}-*.log")) + sorted(hosts.glob(f"*/members/{db}-*/prefetch.log"))
        keep: list[str] = []
        for path in logs:
            try:
                lines = path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            hits = [ln for ln in lines if any(w in ln for w in (
                "FATAL", "ERROR", "dbplane:", "restore-", "redo done", "missing", "gap"))]
            keep += [f"{path.relative_to(self.root)}: {ln}" for ln in hits[-4:]]
        for line in keep:
            print(f"    {line}", flush=True)
        return " | ".join(keep)[-1500:]

    def restore_phases(self, db: str, t0: float, t1: float) -> tuple[dict[str, float], str]:
        """Split a restore by the restored member's patroni.log and prefetch.log."""
        d = self.member_dir(db)
        if d is None:
            return {}, "no member directory found"
        try:
            lines = (d / "patroni.log").read_text(errors="replace").splitlines()
        except OSError as e:
            return {}, f"no patroni.log: {e}"
        marks = {
            "bootstrap": "Running custom bootstrap script",
            "extract_start": " INFO restoring ",
            "extract_end": "data directory restored",
            "pg_start": "starting PostgreSQL",
            "redo_start": "redo starts at",
            "consistent": "consistent recovery state reached",
            "redo_done": "redo done at",
            "promoted": "selected new timeline ID",
            "ready": "database system is ready to accept connections",
        }
        attempts = [i for i, ln in enumerate(lines) if marks["bootstrap"] in ln]
        at: dict[str, float] = {}
        lines_at: dict[str, str] = {}
        for ln in lines[attempts[-1] if attempts else 0:]:      # the last bootstrap attempt
            for k, needle in marks.items():
                if k not in at and needle in ln:
                    t = log_time(ln)
                    if t is not None:
                        at[k], lines_at[k] = t, ln
        ph: dict[str, float] = {}

        def span(name: str, a: str | float, b: str | float) -> None:
            ta = a if isinstance(a, float) else at.get(a)
            tb = b if isinstance(b, float) else at.get(b)
            if ta is not None and tb is not None:
                ph[name] = tb - ta
        span("to bootstrap", t0, "bootstrap")
        span("script start", "bootstrap", "extract_start")
        span("extract", "extract_start", "extract_end")
        span("pg start", "extract_end", "redo_start")
        span("redo", "redo_start", "redo_done")
        span("promote+ready", "redo_done", "ready")
        span("to available", "ready", t1)
        extra = []
        if len(attempts) > 1:
            extra.append(f"{len(attempts)} BOOTSTRAP ATTEMPTS (phases: the last)")
        m = re.search(r"elapsed: ([\d.]+) s", lines_at.get("redo_done", ""))
        if m:
            extra.append(f"PostgreSQL's redo elapsed {m.group(1)} s")
        m = re.search(r"system usage: CPU: user: ([\d.]+) s, system: ([\d.]+) s",
                      lines_at.get("redo_done", ""))
        if m:
            extra.append(f"redo CPU user {m.group(1)} s system {m.group(2)} s")
        try:
            pf = (d / "prefetch.log").read_text(errors="replace").splitlines()
            fetched = [ln for ln in pf if ln.endswith(": fetched")]
            none = [ln for ln in pf if "not in the repository" in ln]
            extra.append(f"prefetcher answered {len(fetched)} requests for WAL files (the rest "
                         f"came from its read-ahead), {len(none)} for absent files")
            errors = [ln for ln in pf if " ERROR " in ln]
            starts = [ln for ln in pf if "serving WAL from" in ln]
            if errors or len(starts) > 1:
                extra.append(f"PREFETCHER: {len(starts)} started, {len(errors)} errors, first: "
                             f"{errors[0][:300] if errors else '-'}")
        except OSError:
            pass
        return ph, "; ".join(extra)

    def check_rows(self, db: str, query: str) -> int | str:
        """A count, or the error that prevented it (e.g. a table missing after a restore)."""
        try:
            with self.admin(db) as c:
                return c.execute(query).fetchone()[0]
        except psycopg.Error as e:
            return f"{type(e).__name__}: {str(e).splitlines()[0]}"

    def delete_db(self, name: str) -> None:
        r = self.p.cli("db", "delete", name, "--wait", check=False, timeout=600)
        if r.returncode != 0:
            self.notes.append(f"deleting {name} failed: {(r.stderr or r.stdout).strip()[-200:]}")

    def peer_restore(self, run: int) -> list[Op]:
        tar = self.work / f"basebackup-plain-{run}" / "base.tar"
        if not tar.exists():
            return [Op("restore", "tar -x", run, None, error="no plain pg_basebackup tar")]
        target = self.work / f"peer-data-{run}"
        target.mkdir(mode=0o700)
        if self.run_as:
            os.chown(target, self.run_as.uid, self.run_as.gid)
        t0 = time.monotonic()
        r = subprocess.run(["tar", "-x", "-f", str(tar), "-C", str(target)], capture_output=True,
                           text=True, timeout=RESTORE_TIMEOUT_S, **self.ids())
        untar_s = time.monotonic() - t0
        untar = Op("restore", "tar -x (untar only)", run, untar_s, moved_bytes=tar.stat().st_size)
        if r.returncode != 0:
            untar.seconds, untar.error = None, r.stderr.strip()[-300:]
            return [untar]
        untar.stored_bytes = dir_bytes(target)
        ops = [untar]
        # a PostgreSQL on it: the copied configuration, with this machine's own port
        port = free_port()
        with open(target / "postgresql.auto.conf", "a") as f:
            f.write(f"\n# bench/backup_restore.py: a local peer\nport = {port}\n"
                    f"listen_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"
                    f"hba_file = '{target}/pg_hba.conf'\nident_file = '{target}/pg_ident.conf'\n"
                    f"archive_mode = off\ncluster_name = 'bench-peer'\n")
        logfile = self.work / f"peer-pg-{run}.log"
        logfile.touch()
        if self.run_as:
            os.chown(logfile, self.run_as.uid, self.run_as.gid)
        for name in ("pg_hba.conf", "pg_ident.conf"):
            if not (target / name).exists():
                (target / name).write_text("local all all trust\n" if name == "pg_hba.conf" else "")
                if self.run_as:
                    os.chown(target / name, self.run_as.uid, self.run_as.gid)
        self.peer_pg = target
        t1 = time.monotonic()
        r = subprocess.run([f"{postgres_bin_dir()}/pg_ctl", "start", "-w", "-t", "900", "-D",
                            str(target), "-l", str(logfile)], capture_output=True, text=True,
                           timeout=960, env=self.pg_env(), **self.ids())
        start_s = time.monotonic() - t1
        start = Op("restore", "postgres start (recovery to consistency)", run, start_s)
        both = Op("restore", "tar -x + postgres start", run, untar_s + start_s,
                  moved_bytes=untar.moved_bytes, stored_bytes=untar.stored_bytes)
        text = logfile.read_text(errors="replace")
        if r.returncode != 0:
            start.seconds = both.seconds = None
            start.error = both.error = (r.stderr.strip() + " | " + text[-500:])[-600:]
        else:
            m = re.search(r"redo done at .*elapsed: ([\d.]+) s", text)
            start.detail = f"redo elapsed {m.group(1)} s" if m else ""
            with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname=BENCH_DB,
                                 password=self.secrets().superuser, connect_timeout=10,
                                 sslmode="disable") as c:
                n = c.execute("select count(*) from pgbench_accounts").fetchone()[0]
            start.detail += f"; pgbench_accounts rows {n:,}"
        self.stop_peer_pg()
        shutil.rmtree(target, ignore_errors=True)
        return ops + [start, both]

    def stop_peer_pg(self) -> None:
        if self.peer_pg is None:
            return
        target, self.peer_pg = self.peer_pg, None
        if not (target / "postmaster.pid").exists():
            return
        r = subprocess.run([f"{postgres_bin_dir()}/pg_ctl", "stop", "-m", "fast", "-w", "-t", "60",
                            "-D", str(target)], capture_output=True, text=True, timeout=90,
                           env=self.pg_env(), **self.ids())
        if r.returncode != 0:
            try:          # the postmaster, by the pid in its own pidfile
                pid = int((target / "postmaster.pid").read_text().split()[0])
                os.kill(pid, 9)
            except (OSError, ValueError, IndexError):
                pass

    # -- one run of steps 2-4 ---------------------------------------------------------------

    def backup_run(self, run: int) -> None:
        peers = [k for k in self.args.peers.split(",") if k]
        order = ["dbplane", *peers] if run % 2 else [*peers, "dbplane"]
        if "plain" not in peers:
            self.notes.append("no plain pg_basebackup peer: no peer restore")
        for who in order:
            log(f"run {run}: backup by {who}")
            op = self.dbplane_backup(run) if who == "dbplane" else self.peer_backup(run, who)
            self.record_op(op)
        restore_order = ["dbplane", "peer"] if run % 2 else ["peer", "dbplane"]
        for who in restore_order:
            log(f"run {run}: restore by {who}")
            if who == "dbplane":
                name = f"bench-r{run}"
                op = self.dbplane_restore(run, "restore", name, "--from-snapshot", f"bench-{run}")
                if op.seconds is not None:
                    rec = self.record(SRC, f"bench-{run}")
                    op.moved_bytes = rec.size_bytes if rec else None
                    op.stored_bytes = rec.stored_bytes if rec else None
                    n = self.check_rows(name, "select count(*) from pgbench_accounts")
                    op.detail = f"pgbench_accounts rows {n:,}; " + op.detail if isinstance(n, int) \
                        else f"pgbench_accounts: {n}; " + op.detail
                    if n != self.args.scale * 100000:
                        op.error = f"pgbench_accounts has {n} rows, expected {self.args.scale * 100000}"
                self.record_op(op)
                self.delete_db(name)
            elif "plain" in peers:
                for op in self.peer_restore(run):
                    self.record_op(op)
        shutil.rmtree(self.work / f"basebackup-plain-{run}", ignore_errors=True)

    def record_op(self, op: Op) -> None:
        self.ops.append(op)
        rate = op_rate(op, self.db_bytes)
        rate = "" if rate is None else f"{rate:.1f} MB/s" + (" of WAL" if op.step == "pitr" else "")
        phases = ", ".join(f"{k} {v:.1f}" for k, v in op.phases.items())
        log(f"  {op.step:8} {op.tool:42} {fmt(op.seconds)} s  {rate}  "
            f"{'[' + phases + '] ' if phases else ''}{op.detail} {op.error}")

    # -- 5. archive at peak WAL rate --------------------------------------------------------

    def archive_load(self) -> None:
        m, d = self.primary(SRC), self.p.describe(SRC)
        env = {**self.pg_env(self.p.layout.pgpass(SRC)), "PGSSLMODE": "disable"}
        self.wait_archived("before the WAL load")
        sampler = Sampler(self)
        sampler.start()
        try:
            time.sleep(2)                               # a baseline
            ph = sampler.begin("pgbench -c 4 -j 2 -T 30")
            r = subprocess.run([f"{postgres_bin_dir()}/pgbench", "-c", "4", "-j", "2", "-T",
                                str(self.args.tpcb_seconds), "-n", "-h", m["address"], "-p",
                                str(m["port"]), "-U", d["admin_user"], BENCH_DB],
                               capture_output=True, text=True, env=env,
                               timeout=self.args.tpcb_seconds + 120)
            sampler.end(ph)
            tps = re.search(r"tps = ([\d.]+)", r.stdout)
            ph.note = (f"{float(tps.group(1)):.0f} TPS" if tps
                       else f"pgbench exited {r.returncode}: {r.stderr[-200:]}")
            log(f"  tpcb: {ph.note}, {mb(ph.wal1 - ph.wal0)} MB of WAL in {ph.t1 - ph.t0:.1f} s")
            ph = sampler.begin(f"bulk INSERT ... SELECT ({self.args.bulk_mb} MB of WAL)")
            rows = self.bulk_insert(self.args.bulk_mb * MB)
            sampler.end(ph)
            ph.note = f"{rows:,} rows"
            log(f"  bulk: {rows:,} rows, {mb(ph.wal1 - ph.wal0)} MB of WAL in {ph.t1 - ph.t0:.1f} s")
            drain = sampler.drain(ph.wal1)
        finally:
            sampler.stop()
        self.archive["load2"] = sampler.summary(drain)
        log(f"  archive drained {fmt(drain)} s after the load")

    def bulk_insert(self, wal_bytes: int) -> int:
        with self.admin(SRC) as c:
            c.execute("create table bulk (like pgbench_accounts)")
            start = parse_lsn(c.execute("select pg_current_wal_lsn()::text").fetchone()[0])
            accounts = self.args.scale * 100000
            step = max(10000, min(accounts, 500000))      # rows per statement (a few s each)
            rows, offset = 0, 0
            for _ in range(BULK_MAX_STATEMENTS):
                lo = offset % accounts
                cur = c.execute("insert into bulk select * from pgbench_accounts "
                                "where aid > %s and aid <= %s", (lo, lo + step))
                rows += cur.rowcount
                offset += step
                now = parse_lsn(c.execute("select pg_current_wal_lsn()::text").fetchone()[0])
                if now - start >= wal_bytes:
                    break
            return rows

    # -- 6. PITR ----------------------------------------------------------------------------

    def pitr(self) -> None:
        # a quiet source: VACUUM sets the hint bits and visibility of the loaded rows now
        # (with wal_log_hints=on, the first reads would otherwise write hundreds of MB of
        # full-page images while the restore runs), then the counts to compare with
        t0 = time.monotonic()
        w0 = self.wal_lsn()
        with self.admin(SRC) as c:
            c.execute("VACUUM (ANALYZE) pgbench_accounts, pgbench_history, pgbench_branches, "
                      "pgbench_tellers, bulk")
            history = c.execute("select count(*) from pgbench_history").fetchone()[0]
            bulk = c.execute("select count(*) from bulk").fetchone()[0]
        self.setup["before the PITR"] = (f"VACUUM ANALYZE + counts: {time.monotonic() - t0:.1f} s, "
                                         f"{mb(self.wal_lsn() - w0)} MB of WAL")
        self.wait_archived("before the point-in-time restore")
        with self.superuser() as c:
            flush = self.archiver_flush(c)
        # the archive status in etcd is published every 5 s: wait for one written after now
        asked, deadline = time.time(), time.monotonic() + 30
        while time.monotonic() < deadline and not ((st := self.archive_status()) and st.updated_at > asked):
            time.sleep(0.2)
        name = "bench-pitr"
        log("point-in-time restore (--latest)")
        op = self.dbplane_restore(1, "pitr", name, "--from", SRC, "--latest")
        raw = self.gw.get(keys.database_spec(name))
        spec = DatabaseSpec.model_validate_json(raw) if raw else None
        chain = spec.restore.chain if spec and spec.restore else []
        base = self.record(SRC, chain[-1]) if chain else None
        if base is not None and flush is not None:
            op.moved_bytes = flush - parse_lsn(base.stop_lsn)
            op.detail = (f"base {', '.join(chain)} ({mb(base.size_bytes)} MB, stop {base.stop_lsn}); "
                         f"archive at {format_lsn(flush)} (etcd archived_lsn "
                         f"{st.archived_lsn if st else '?'}): {mb(op.moved_bytes)} MB of WAL to replay; "
                         + op.detail)
        if op.seconds is not None:
            got_h = self.check_rows(name, "select count(*) from pgbench_history")
            got_b = self.check_rows(name, "select count(*) from bulk")
            op.detail += (f"; rows restored/source: pgbench_history {got_h}/{history}, "
                          f"bulk {got_b}/{bulk}")
            if (got_h, got_b) != (history, bulk):
                op.error = "DATA MISSING: the restored rows differ from the source's"
        self.record_op(op)
        self.delete_db(name)


class RecordWatch(threading.Thread):
    """Polls a backup record in etcd: when its size appears (pg_basebackup finished)."""

    def __init__(self, b: Bench, db: str, backup_id: str):
        super().__init__(daemon=True)
        self.b, self.key = b, keys.backup(db, backup_id)
        self.gw = b.gw
        self.sized_at: float | None = None
        self.stopped = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + BACKUP_TIMEOUT_S
        while not self.stopped.is_set() and time.monotonic() < deadline:
            try:
                raw = self.gw.get(self.key)
                if raw and self.sized_at is None and BackupRecord.model_validate_json(raw).size_bytes:
                    self.sized_at = time.time()
            except Exception:
                pass
            self.stopped.wait(0.2)

    def stop(self) -> None:
        self.stopped.set()
        self.join(10)


class Sampler(threading.Thread):
    """Every SAMPLE_S: the primary's WAL position, the archiver's flush position (the WAL the
    repository holds durably) and the etcd archive status."""

    def __init__(self, b: Bench):
        super().__init__(daemon=True)
        self.b = b
        self.samples: list[dict] = []
        self.phases: list[Phase] = []
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.conn: psycopg.Connection | None = None
        self.gw = b.gw

    def sample(self) -> dict:
        wal = parse_lsn(self.conn.execute("select pg_current_wal_lsn()::text").fetchone()[0])
        flush = self.b.archiver_flush(self.conn)
        raw = self.gw.get(keys.archive_status(SRC))
        st = ArchiveStatus.model_validate_json(raw) if raw else None
        return {"t": time.monotonic(), "wal": wal, "flush": flush,
                "etcd_archived": parse_lsn(st.archived_lsn) if st and st.archived_lsn else None,
                "etcd_lag": st.lag_bytes if st else None, "etcd_updated": st.updated_at if st else None}

    def run(self) -> None:
        with self.b.superuser() as own:
            self.conn = own
            for _ in range(MAX_SAMPLES):
                if self.stopped.is_set():
                    break
                t = time.monotonic()
                try:
                    s = self.sample()
                    with self.lock:
                        self.samples.append(s)
                except Exception as e:
                    print(f"sampler: {e}", file=sys.stderr, flush=True)
                self.stopped.wait(max(0.0, SAMPLE_S - (time.monotonic() - t)))

    def begin(self, name: str) -> Phase:
        ph = Phase(name, time.monotonic(), 0.0, wal0=self.b.wal_lsn())
        self.phases.append(ph)
        return ph

    def end(self, ph: Phase) -> None:
        ph.t1, ph.wal1 = time.monotonic(), self.b.wal_lsn()

    def drain(self, target: int) -> float | None:
        """Seconds from the end of the last phase until the archive holds `target`."""
        end = self.phases[-1].t1
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            with self.lock:
                done = next((s for s in self.samples if s["t"] >= end and s["flush"] is not None
                             and s["flush"] >= target), None)
            if done is not None:
                # and the etcd status too (published every 5 s), for the record
                etcd_deadline = time.monotonic() + 15
                while time.monotonic() < etcd_deadline:
                    with self.lock:
                        if any(s["t"] >= end and (s["etcd_archived"] or 0) >= target
                               for s in self.samples):
                            break
                    time.sleep(0.5)
                return done["t"] - end
            time.sleep(0.2)
        return None

    def stop(self) -> None:
        self.stopped.set()
        self.join(10)

    def summary(self, drain: float | None) -> dict:
        with self.lock:
            samples = [s for s in self.samples if s["flush"] is not None]
        out = {"phases": [], "drain_s": drain}
        for ph in self.phases:
            inside = [s for s in samples if ph.t0 <= s["t"] <= ph.t1]
            dur = ph.t1 - ph.t0
            row = {"phase": ph.name, "seconds": dur, "wal_bytes": ph.wal1 - ph.wal0,
                   "wal_mb_s": (ph.wal1 - ph.wal0) / dur / MB if dur else None, "note": ph.note}
            if len(inside) >= 2:
                a, z = inside[0], inside[-1]
                row["archive_mb_s"] = (z["flush"] - a["flush"]) / (z["t"] - a["t"]) / MB
                row["peak_wal_mb_s"] = peak_rate(inside, "wal")
                row["peak_archive_mb_s"] = peak_rate(inside, "flush")
                row["peak_lag_bytes"] = max(s["wal"] - s["flush"] for s in inside)
                row["final_lag_bytes"] = z["wal"] - z["flush"]
                etcd_lags = [s["etcd_lag"] for s in inside if s["etcd_lag"] is not None]
                row["peak_etcd_lag_bytes"] = max(etcd_lags) if etcd_lags else None
            out["phases"].append(row)
        if self.phases and samples:
            first = self.phases[0].t0
            last = next((s for s in samples if s["t"] >= self.phases[-1].t1
                         and s["flush"] >= self.phases[-1].wal1), samples[-1])
            a = next((s for s in samples if s["t"] >= first), samples[0])
            if last["t"] > a["t"]:
                out["archive_mb_s_until_drained"] = (last["flush"] - a["flush"]) / (last["t"] - a["t"]) / MB
            updates = sorted({s["etcd_updated"] for s in samples if s["etcd_updated"]})
            if len(updates) >= 2:
                out["etcd_status_interval_s"] = statistics.median(
                    [b - a for a, b in zip(updates, updates[1:], strict=False)])
        return out


def peak_rate(samples: list[dict], key: str, window: float = 2.0) -> float | None:
    """The highest rate of `key` (MB/s) over any span of at least `window` seconds."""
    best, k = None, 0
    for i, s in enumerate(samples):
        while k + 1 < i and s["t"] - samples[k + 1]["t"] >= window:
            k += 1
        if k < i and s["t"] - samples[k]["t"] >= window:
            r = (s[key] - samples[k][key]) / (s["t"] - samples[k]["t"]) / MB
            best = r if best is None else max(best, r)
    return best


def stop_leftovers(b: Bench) -> None:
    """Processes of this platform that outlived `dbplane down` (their command line names
    its data root, a fresh temporary directory): noted, then stopped by pid."""
    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid != os.getpid() and str(b.root) in " ".join(proc.info["cmdline"] or []):
                procs.append(proc)
        except psutil.Error:
            pass
    if not procs:
        return
    names = ", ".join(f"{p.pid} {' '.join((p.info['cmdline'] or [])[1:3])}" for p in procs)
    b.notes.append(f"{len(procs)} process(es) outlived 'dbplane down' and were stopped: {names}")
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


# -- reporting ------------------------------------------------------------------------------

def op_rate(op: Op, db_bytes: int) -> float | None:
    """MB/s: the database size over the time; for a PITR the WAL to replay over the time."""
    if not op.seconds:
        return None
    if op.step == "pitr":
        return op.moved_bytes / op.seconds / MB if op.moved_bytes else None
    return db_bytes / op.seconds / MB if db_bytes else None


def machine_info() -> dict:
    return machine({
        "postgres": first_line([f"{postgres_bin_dir()}/postgres", "--version"]),
        "dbplane": f"{importlib.metadata.version('dbplane')} ({commit()})",
        "patroni": importlib.metadata.version("patroni"),
        "zstandard": importlib.metadata.version("zstandard"),
        "command": shlex.join([sys.executable, *sys.argv]),
    })


def report(b: Bench, info: dict) -> None:
    print("\n## machine")
    for k, v in info.items():
        print(f"  {k:17} {v}")
    print("\n## setup")
    for k, v in b.setup.items():
        print(f"  {k:22} {v}")
    db = b.db_bytes
    print(f"\n## base backups and restores (MB/s: pg_database_size('{BENCH_DB}') = {mb(db)} MB "
          f"/ seconds; for pitr: WAL to replay (LSN distance, plain MB column) / seconds)\n")
    print("| step | tool | run | seconds | MB/s | plain MB | stored MB | phases (s) | detail |")
    print("|---|---|---|---|---|---|---|---|---|")
    for op in b.ops:
        rate = fmt(op_rate(op, db), 1)
        phases = ", ".join(f"{k} {v:.1f}" for k, v in op.phases.items())
        print(f"| {op.step} | {op.tool} | {op.run} | {fmt(op.seconds)} | {rate} | "
              f"{mb(op.moved_bytes)} | {mb(op.stored_bytes)} | {phases} | "
              f"{op.detail}{' ERROR: ' + op.error if op.error else ''} |")

    def med(step: str, tool: str) -> float | None:
        return median([o.seconds for o in b.ops if o.step == step and o.tool == tool])
    print("\n## ratios (median seconds; ratio = dbplane time / peer time, >1 means dbplane is slower)\n")
    print("| comparison | dbplane s | peer s | dbplane MB/s | peer MB/s | time ratio |")
    print("|---|---|---|---|---|---|")
    pairs = [("backup", "dbplane snapshot", "backup", "pg_basebackup -Ft"),
             ("backup", "dbplane snapshot", "backup", "pg_basebackup -Ft -z"),
             ("backup", "dbplane snapshot", "backup", "pg_basebackup -Ft -Z client-zstd:1"),
             ("restore", "dbplane db restore", "restore", "tar -x (untar only)"),
             ("restore", "dbplane db restore", "restore", "tar -x + postgres start")]
    for s1, t1, s2, t2 in pairs:
        a, p = med(s1, t1), med(s2, t2)
        if a is None or p is None:
            continue
        print(f"| {t1} vs {t2} | {a:.2f} | {p:.2f} | {db / a / MB:.1f} | {db / p / MB:.1f} | "
              f"{a / p:.2f} |")
    # the streaming part of dbplane's snapshot alone against the plain peer
    streams = median([o.phases.get("stream") for o in b.ops if o.tool == "dbplane snapshot"])
    plain = med("backup", "pg_basebackup -Ft")
    if streams and plain:
        print(f"| dbplane snapshot's stream phase only vs pg_basebackup -Ft | {streams:.2f} | "
              f"{plain:.2f} | {db / streams / MB:.1f} | {db / plain / MB:.1f} | {streams / plain:.2f} |")
    extract = median([o.phases.get("extract") for o in b.ops if o.tool == "dbplane db restore"
                      and o.step == "restore"])
    untar = med("restore", "tar -x (untar only)")
    if extract and untar:
        print(f"| dbplane restore's extract phase only vs tar -x | {extract:.2f} | {untar:.2f} | "
              f"{db / extract / MB:.1f} | {db / untar / MB:.1f} | {extract / untar:.2f} |")

    print("\n## WAL archive (flush_lsn of the archiver's walsender on the primary, sampled every "
          f"{SAMPLE_S} s; peaks over 2 s windows)\n")
    print("| phase | seconds | WAL MB | WAL MB/s | peak WAL MB/s | archive MB/s | peak archive MB/s "
          "| peak lag MB | lag at end MB | peak etcd lag_bytes MB | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key in ("load", "load2"):
        s = b.archive.get(key)
        if not s:
            continue
        for r in s["phases"]:
            print(f"| {r['phase']} | {r['seconds']:.1f} | {mb(r['wal_bytes'])} | {fmt(r['wal_mb_s'], 1)} | "
                  f"{fmt(r.get('peak_wal_mb_s'), 1)} | {fmt(r.get('archive_mb_s'), 1)} | "
                  f"{fmt(r.get('peak_archive_mb_s'), 1)} | {mb(r.get('peak_lag_bytes'))} | "
                  f"{mb(r.get('final_lag_bytes'))} | {mb(r.get('peak_etcd_lag_bytes'))} | {r['note']} |")
        print(f"|   drained (archive holds all WAL of the load) | {fmt(s['drain_s'], 1)} s after it ended; "
              f"archive rate start->drained {fmt(s.get('archive_mb_s_until_drained'), 1)} MB/s; "
              f"etcd status every {fmt(s.get('etcd_status_interval_s'), 1)} s |||||||||")
    if b.notes:
        print("\n## notes")
        for n in b.notes:
            print(f"  - {n}")
    print(f"\nreproduce: {info['command']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=int, default=70, help="pgbench scale (70: about 1.05 GB)")
    ap.add_argument("--runs", type=int, default=1, help="repetitions of backup and restore")
    ap.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                    help=f"pg_basebackup peers, a comma-separated subset of {', '.join(PEERS)}")
    ap.add_argument("--bulk-mb", type=int, default=512, help="MB of WAL of the bulk insert")
    ap.add_argument("--tpcb-seconds", type=int, default=30, help="pgbench -T of the WAL load")
    ap.add_argument("--skip-pitr", action="store_true", help="no archive load, no PITR")
    ap.add_argument("--keep", action="store_true",
                    help="leave the platform running and its data root in place")
    ap.add_argument("--json", help="also write the raw results to this file")
    args = ap.parse_args()
    unknown = set(args.peers.split(",")) - set(PEERS) - {""}
    if unknown or args.runs < 1 or args.scale < 1 or args.bulk_mb < 1 or args.tpcb_seconds < 1:
        ap.error(f"bad arguments (unknown peers: {', '.join(sorted(unknown))})")

    info = machine_info()
    b = Bench(args)
    failed = False
    try:
        b.start()
        for run in range(1, args.runs + 1):
            b.backup_run(run)
        if not args.skip_pitr:
            log("WAL archive at peak WAL rate")
            b.archive_load()
            b.pitr()
    except BaseException as e:
        failed = True
        b.notes.append(f"aborted: {type(e).__name__}: {e}"[:1500])
        print(f"aborted: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    finally:
        b.stop_peer_pg()
        shutil.rmtree(b.work, ignore_errors=True)
        if args.keep:
            print(f"kept the platform: stop it with 'dbplane --data-dir {b.root} down' "
                  f"and remove {b.root}", flush=True)
        else:
            try:
                b.p.cli("down", check=False, timeout=300)
            except Exception as e:
                print(f"dbplane down failed: {e}", file=sys.stderr)
            stop_leftovers(b)
            shutil.rmtree(b.root, ignore_errors=True)
    info["loadavg_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report(b, info)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "setup": b.setup,
                                               "ops": [asdict(o) for o in b.ops],
                                               "archive": b.archive, "notes": b.notes}, indent=2))
    return 1 if failed or any(o.error for o in b.ops) else 0


if __name__ == "__main__":
    sys.exit(main())
