"""What the database doctor observed, as plain values: probe.py fills these from a
server's statistics views (and, on a platform, from etcd and the members' logs);
database.py judges them. Keeping the two apart lets unit tests feed the checks by hand."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models import ArchiveStatus, BackupRecord, DatabaseSpec, ProxyLimits
from .explain import Scan
from .pglog import Deadlock, LockWait


@dataclass
class Session:
    pid: int
    user: str
    datname: str
    application: str
    client: str
    state: str                 # active, idle, idle in transaction, ...
    backend_type: str          # client backend, walsender, startup, ...
    xact_age: float | None     # s since the transaction began
    query_age: float | None    # s since the current or last query began
    state_age: float | None    # s in the current state
    wait_event_type: str = ""
    wait_event: str = ""
    query: str = ""
    blocked_by: list[int] = field(default_factory=list)


@dataclass
class StandbyRow:
    """One standby as its primary's pg_stat_replication sees it (bytes behind the primary)."""
    name: str                  # application_name: the member name under Patroni
    client: str
    state: str
    sync_state: str
    sent_behind: float | None
    flush_behind: float | None
    replay_behind: float | None
    write_lag: float | None = None     # s
    flush_lag: float | None = None
    replay_lag: float | None = None


@dataclass
class ReplayState:
    """A standby's own view: what it received and replayed, and its WAL receiver."""
    receive_lsn: float | None
    replay_lsn: float | None
    replay_age: float | None   # s since the last replayed transaction committed on the primary
    pause_state: str           # not paused, pause requested, paused
    receiver_status: str       # streaming, ... ("" when no WAL receiver runs)
    last_msg_age: float | None
    sender: str = ""


@dataclass
class DatabaseStat:
    name: str
    deadlocks: int
    backends: int
    size_bytes: int | None
    connectable: bool


@dataclass
class TableStat:
    datname: str
    schema: str
    table: str
    live: int
    dead: int
    seq_scan: int
    seq_tup_read: int
    idx_scan: int
    vacuum_age: float | None       # s since the last (auto)vacuum
    autovacuum_age: float | None
    indexes: int


@dataclass
class ScanInfo:
    """A filtered sequential scan of a slow statement's plan and what we know of its table."""
    scan: Scan
    reltuples: float
    columns: list[str]
    leading_indexed: list[str]      # columns that lead an existing index


@dataclass
class Statement:
    datname: str
    user: str
    calls: int
    mean_ms: float
    total_ms: float
    rows: int
    query: str
    scans: list[ScanInfo] = field(default_factory=list)
    explain_error: str = ""


@dataclass
class Workload:
    """Tables and statements of every database of a primary."""
    statements_loaded: bool = False         # pg_stat_statements in shared_preload_libraries
    statements_installed: bool = False      # CREATE EXTENSION done in some database
    statements: list[Statement] = field(default_factory=list)
    tables: list[TableStat] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)     # what could not be looked at


@dataclass
class NodeFacts:
    name: str                  # member name, or host:port in URL mode
    address: str               # host:port
    primary: bool = False
    settings: dict[str, str] = field(default_factory=dict)
    sessions: list[Session] = field(default_factory=list)
    replication: list[StandbyRow] = field(default_factory=list)
    current_lsn: float | None = None
    replay: ReplayState | None = None
    databases: list[DatabaseStat] = field(default_factory=list)
    error: str = ""            # why the node could not be read ("" when it could)

    def setting(self, name: str, default: str = "") -> str:
        return self.settings.get(name, default)

    def int_setting(self, name: str, default: int = 0) -> int:
        try:
            return int(self.settings.get(name, default))
        except ValueError:
            return default


@dataclass
class Disk:
    member: str
    path: str
    total: int
    free: int


@dataclass
class PlatformFacts:
    """What only a platform database has: its spec, proxy budget and pools, backups,
    archive, storage use and the members' logs."""
    spec: DatabaseSpec
    members: list[str] = field(default_factory=list)      # member names, primary first
    limits: ProxyLimits | None = None
    proxies_running: int = 0
    pools: list[dict] = field(default_factory=list)       # every proxy's pools of this database
    proxy_errors: list[str] = field(default_factory=list)
    backups: list[BackupRecord] = field(default_factory=list)
    archive: ArchiveStatus | None = None
    storage_used: int | None = None                       # largest member data directory
    disks: list[Disk] = field(default_factory=list)
    deadlocks: list[Deadlock] = field(default_factory=list)
    lock_waits: list[LockWait] = field(default_factory=list)
    log_notes: list[str] = field(default_factory=list)    # logs we could not read
