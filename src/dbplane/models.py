"""Resource models stored in etcd and served by the API.

Spec objects are desired state (written by the API); status objects are observed state
(written by the component that observes them). Placement (members) is written by the
controller. See store/keys.py for where each lives.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field, field_validator

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,40}[a-z0-9]$")


def now() -> float:
    return time.time()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Host(BaseModel):
    """An agent's host, registered under a lease: it disappears when the agent dies."""
    name: str
    zone: str
    address: str                      # where PostgreSQL and Patroni listen on this host
    data_dir: str
    started_at: float = Field(default_factory=now)


class AllowRule(BaseModel):
    """One network allowlist rule of a database (like a security group's inbound rule):
    clients from `cidr` may connect to its proxy endpoints. `cidr` is stored normalized
    (proxy/allowlist.py validates it); see docs/security-allowlists.md."""
    cidr: str
    description: str = ""


# what a new database allows when nobody says otherwise: this machine only
DEFAULT_ALLOWLIST = ("127.0.0.1/32", "::1/128")


def default_allowlist() -> list[AllowRule]:
    return [AllowRule(cidr=c, description="loopback (default)") for c in DEFAULT_ALLOWLIST]


PoolMode = Literal["transaction", "session"]


class ProxySettings(BaseModel):
    """How the connection proxy treats one database (like RDS Proxy's target group
    settings). Per proxy process unless said otherwise; see docs/proxy.md."""
    pool_mode: PoolMode = "transaction"
    pool_size: int = Field(20, ge=1, le=10000)   # server connections per (database, user, node)
    # connections of max_connections that proxies leave free (admin, Patroni, replication)
    reserve_connections: int = Field(10, ge=0, le=10000)
    max_client_connections: int = Field(5000, ge=1, le=1000000)
    queue_timeout: float = Field(30.0, gt=0, le=3600)        # s a client waits for a server connection
    idle_server_timeout: float = Field(60.0, gt=0, le=86400)  # s before an idle server connection closes
    idle_client_timeout: float = Field(0.0, ge=0, le=86400)   # s before an idle client is closed; 0 = never
    failover_hold: float = Field(30.0, ge=0, le=600)          # s new transactions wait for a new primary
    reader_max_lag_bytes: int = Field(16 * 1024 * 1024, ge=0)  # replicas lagging more get no reads
    read_your_writes_users: list[str] = Field(default_factory=list)


class DatabaseSpec(BaseModel):
    """What the user asked for. Written only by the API."""
    name: str
    instance_class: str = "small"
    multi_az: bool = False
    replicas: int = 0
    storage_gb: int = 10
    params: dict[str, str] = Field(default_factory=dict)
    engine: str = "postgres"
    version: str = "18"
    admin_user: str = "dbadmin"
    deleting: bool = False
    created_at: float = Field(default_factory=now)
    generation: int = 1
    # read replicas asked for in a given zone (`replica add --zone`), one entry per replica
    replica_zones: list[str] = Field(default_factory=list)
    # members the user removed (`replica remove`); member names are never reused
    removed_members: list[str] = Field(default_factory=list)
    # read replicas leaving to become databases of their own: member -> new database
    promoted_members: dict[str, str] = Field(default_factory=dict)
    # set on a database made by promoting a read replica of another one (`replica promote`)
    promoted_from: PromotedFrom | None = None
    proxy: ProxySettings = Field(default_factory=ProxySettings)
    # who may connect to the proxy endpoints; applied live by the proxies (no generation)
    allowlist: list[AllowRule] = Field(default_factory=default_allowlist)
    backup: BackupSettings = Field(default_factory=lambda: BackupSettings())
    # rotate the internal and admin passwords every N days (0: only on request)
    credential_rotation_days: int = Field(0, ge=0, le=365)
    # seconds between the metrics collectors' samples of its members (docs/observability.md)
    metrics_interval: int = Field(10, ge=1, le=60)
    # set on a database created by `db restore`: what its first member bootstraps from
    restore: RestoreSource | None = None
    # `db delete --final-snapshot ID`: the snapshot taken before the members go
    final_snapshot: str = ""
    # a scratch database made by this restore drill (deleted after the checks)
    drill_of: str = ""

    @property
    def archive_id(self) -> str:
        """Where this database's backups and WAL live in a repository. Names can be reused
        after a delete, so the creation time is part of it."""
        return f"{self.name}-{int(self.created_at)}"

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(
                f"invalid database name {v!r}: use 2-42 lowercase letters, digits and '-', "
                "starting with a letter")
        return v


class PromotedFrom(BaseModel):
    """The read replica whose data directory a promoted database starts from."""
    database: str
    member: str


RestoreTarget = Literal["immediate", "time", "latest", "lsn"]


class RestoreSource(BaseModel):
    """What a restored database starts from: a chain of base backups (a full one, then
    incremental ones) of a source archive, and how far to replay the archived WAL."""
    source_database: str
    archive_id: str                  # the source's archive in the repository
    repository: str
    chain: list[str]                 # backup ids, full first
    target: RestoreTarget = "immediate"   # immediate: the WAL stored with the backup, to its end
    target_time: float | None = None
    target_lsn: str = ""             # "lsn": stop right after this WAL position (restore drills)


class BackupSettings(BaseModel):
    """Automated backups of one database (like RDS's backup retention and window).
    See docs/backups.md."""
    enabled: bool = True
    repository: str = "local"                  # a RepositorySpec name
    retention_days: int = Field(7, ge=1, le=35)
    full_every_hours: float = Field(24.0, gt=0, le=24 * 35)
    incremental_every_hours: float = Field(1.0, ge=0, le=24 * 35)   # 0 = full backups only
    window: str = ""                           # "HH:MM-HH:MM" UTC for full backups; "" = any time
    kms_key: str = "alias/dbplane/backup"      # key id or alias that encrypts backups and WAL
    copy_to: str = ""                          # a second repository receiving copies
    drill_every_hours: float = Field(24.0, ge=0, le=24 * 35)        # restore drills; 0 = off
    archive_timeout: float = Field(5.0, ge=1, le=3600)   # s: a partial WAL segment is uploaded this often

    @field_validator("window")
    @classmethod
    def _valid_window(cls, v: str) -> str:
        if v and not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d", v):
            raise ValueError(f"invalid backup window {v!r}: write it as HH:MM-HH:MM in UTC, "
                             "e.g. 03:00-04:00")
        return v


DatabaseSpec.model_rebuild()

MemberKind = Literal["primary_candidate", "replica"]


class MemberSpec(BaseModel):
    """Placement of one database node on a host. Written by the controller.

    kind: primary_candidate members (the first node and the Multi-AZ standby) may be
    promoted by Patroni; read replicas are tagged nofailover/nosync.
    """
    name: str                         # Patroni member name, e.g. orders-1
    database: str
    host: str
    zone: str
    address: str
    pg_port: int
    api_port: int
    kind: MemberKind = "primary_candidate"
    deleting: bool = False
    # stop Patroni and PostgreSQL but keep the data directory (a replica being promoted)
    stopped: bool = False
    # on first start, take over the data directory of this (stopped) member on the same host
    adopt_from: str = ""
    created_at: float = Field(default_factory=now)


MemberProcessState = Literal["starting", "running", "stopped", "failed", "deleted"]


class MemberStatus(BaseModel):
    """What the agent sees of a member's Patroni process. Written by the agent."""
    name: str
    database: str
    host: str
    state: MemberProcessState
    message: str = ""
    reason: str = ""                  # machine-readable cause when failed, e.g. port_in_use
    pid: int | None = None
    replayed_at: float | None = None  # commit time of the last transaction a replica replayed
    restarts: int = 0                 # times Patroni exited on its own since it last ran well
    storage_bytes: int | None = None  # size of the member's data directory (MiB granularity)
    updated_at: float = Field(default_factory=now)


DatabasePhase = Literal["creating", "available", "modifying", "degraded", "failing-over", "unavailable",
                        "deleting", "failed", "stopped", "starting", "storage-full"]


class DatabaseStatus(BaseModel):
    """The controller's view of a database: a phase and a plain sentence."""
    phase: DatabasePhase = "creating"
    message: str = ""
    next_member_index: int = 1        # member names are never reused
    primary: str | None = None        # last primary seen, to report failovers as events
    admin_ready: bool = False         # the admin user exists and its pgpass file is written
    ever_available: bool = False
    storage_full: bool = False        # over the storage quota: writes are refused
    applied_generation: int = 0       # the spec generation whose changes are fully applied
    pending_changes: list[str] = Field(default_factory=list)   # plain sentences, for describe
    restarted: list[str] = Field(default_factory=list)   # members restarted for applied_generation+
    updated_at: float = Field(default_factory=now)


OperationState = Literal["pending", "running", "succeeded", "failed"]


class OperationEvent(BaseModel):
    time: float = Field(default_factory=now)
    message: str


class OperationError(BaseModel):
    code: str
    message: str
    hint: str = ""


class Operation(BaseModel):
    """A long-running action: the API creates it, the controller drives it to an end."""
    id: str = Field(default_factory=lambda: new_id("op"))
    kind: str                          # create, delete, add-replica, ...
    database: str
    params: dict = Field(default_factory=dict)
    state: OperationState = "pending"
    progress: int = 0                  # percent
    message: str = ""
    events: list[OperationEvent] = Field(default_factory=list)
    error: OperationError | None = None
    created_at: float = Field(default_factory=now)
    updated_at: float = Field(default_factory=now)

    @property
    def done(self) -> bool:
        return self.state in ("succeeded", "failed")


class Event(BaseModel):
    """Something that happened to a database (failover, member started, ...)."""
    id: str = Field(default_factory=lambda: f"{time.time_ns():020d}-{uuid.uuid4().hex[:6]}")
    time: float = Field(default_factory=now)
    database: str
    kind: str
    message: str


class DatabaseSecrets(BaseModel):
    """Generated passwords of a database. Never returned by the API or logged; agents
    write them into 0600 files for Patroni, the CLI reads the admin pgpass file."""
    superuser: str
    replication: str
    rewind: str
    admin: str
    rotated_at: float = 0.0          # 0: never rotated (generated with the database)


class PlatformConfig(BaseModel):
    """Platform-wide settings in etcd, written by `dbplane up` (or an operator)."""
    member_port_start: int = 54400
    member_port_end: int = 55400
    # the host name clients use for proxy endpoints: a name or address that reaches the
    # proxies on every host (a DNS name or load balancer across many hosts)
    proxy_host: str = "127.0.0.1"
    # the KMS root key every process that encrypts or decrypts reads (0600, service account)
    kms_root_file: str = ""


class ProxyPorts(BaseModel):
    """A database's stable endpoints: every proxy listens on these ports. Controller."""
    writer: int
    reader: int


class ProxyLimits(BaseModel):
    """Server connections each proxy process may open to one node of a database, so that
    all proxies together stay below max_connections minus the reserve. Controller."""
    per_proxy: int
    proxies: int
    max_connections: int


class ProxyInstance(BaseModel):
    """A running proxy process, registered under a lease. Proxy."""
    id: str
    host: str
    address: str
    admin_port: int          # HTTP: /stats, /cancel
    pid: int
    started_at: float = Field(default_factory=now)


class CollectorInstance(BaseModel):
    """A host's metrics collector (src/dbplane/metrics/), registered under a lease: where its
    https endpoint (GET /metrics, /history) listens. Collector."""
    host: str
    zone: str
    address: str
    port: int
    pid: int
    interval: float
    started_at: float = Field(default_factory=now)


class ProxyDrain(BaseModel):
    """Before a switchover the controller asks proxies to hold new writer transactions
    and to report when none runs on the old primary. Controller."""
    operation: str
    primary: str             # the member being switched away from
    since: float = Field(default_factory=now)


# -- backup and recovery, key management ---------------------------------------------------

RepositoryKind = Literal["filesystem", "s3"]


class RepositorySpec(BaseModel):
    """Where backups and archived WAL are stored. API (`dbplane up` writes `local`)."""
    name: str
    kind: RepositoryKind = "filesystem"
    path: str = ""                   # filesystem: an absolute directory
    endpoint: str = ""               # s3: endpoint URL, e.g. http://127.0.0.1:9000
    bucket: str = ""
    prefix: str = ""
    region: str = "us-east-1"
    credentials_file: str = ""       # s3: 0600 file with access_key_id and secret_access_key
    kms_key: str = "alias/dbplane/backup"   # encrypts copies written into this repository
    created_at: float = Field(default_factory=now)


BackupKind = Literal["full", "incremental"]
BackupState = Literal["pending", "running", "available", "failed", "expired", "deleting"]


class BackupRecord(BaseModel):
    """One base backup in the catalog; the repository holds its files and a copy of this
    record (backup.json), written last. Backup worker, controller (expiry)."""
    id: str
    database: str
    archive_id: str
    repository: str
    kind: BackupKind = "full"
    parent: str = ""                 # the backup an incremental one builds on
    manual: bool = False             # a snapshot: kept until deleted
    state: BackupState = "running"
    host: str = ""                   # the worker taking it
    source_member: str = ""
    timeline: int = 0
    start_lsn: str = ""
    stop_lsn: str = ""
    started_at: float = Field(default_factory=now)
    finished_at: float | None = None
    consistent_at: float | None = None   # earliest time a restore of it can target
    size_bytes: int = 0              # of the data as PostgreSQL holds it
    stored_bytes: int = 0            # compressed and encrypted
    kms_key_id: str = ""
    kms_key_version: int = 0
    fingerprint: dict[str, int] = Field(default_factory=dict)   # "db.schema.table" -> rows
    fingerprint_lsn: str = ""            # the WAL position the fingerprint's counts are at
    fingerprint_exact: bool = False      # counted on a paused standby (a primary keeps writing)
    error: str = ""
    copies: list[str] = Field(default_factory=list)             # repositories holding a copy
    copy_requested: list[str] = Field(default_factory=list)     # repositories to copy it to
    verified_at: float | None = None     # last verification of checksums and WAL
    verify_error: str = ""               # what the last verification found (unusable if set)
    verify_requested_at: float | None = None   # `dbplane backup verify` asks for another

    @property
    def usable(self) -> bool:
        """Available, consistent and not found damaged by its last verification."""
        return self.state == "available" and self.consistent_at is not None and not self.verify_error


# the WAL archiver's replication slot: a permanent slot in Patroni's configuration while
# backups are on (Patroni keeps it on the primary and advances copies on the standbys)
ARCHIVE_SLOT = "dbplane_archive"

ArchiveState = Literal["starting", "streaming", "reconnecting", "failing"]


class ArchiveStatus(BaseModel):
    """A database's continuous WAL archive as its archiver sees it. Backup worker."""
    database: str
    archive_id: str
    repository: str
    worker: str = ""                 # host whose backup worker streams
    state: ArchiveState = "starting"
    timeline: int = 0
    archived_lsn: str = ""           # WAL up to here is durable in the repository
    server_lsn: str = ""             # the primary's WAL end last seen
    lag_bytes: int = 0
    lag_seconds: float = 0.0
    last_segment: str = ""
    last_archived_at: float | None = None
    error: str = ""
    kms_key_ids: list[str] = Field(default_factory=list)
    updated_at: float = Field(default_factory=now)


KmsKeyState = Literal["enabled", "disabled", "pending_deletion"]


class KmsKeyVersion(BaseModel):
    version: int
    created_at: float = Field(default_factory=now)
    wrapped_material: str            # base64 AES-256-GCM of the key material under the root key


class KmsKey(BaseModel):
    """A key of the local KMS (like an AWS KMS key). Its material is stored only wrapped by
    the KMS root key and never leaves security/kms.py unwrapped; the API shows metadata
    only. Old versions stay to decrypt what they encrypted. API, controller (rotation,
    deletion)."""
    id: str                          # key-<hex>
    alias: str = ""                  # alias/<name>
    description: str = ""
    state: KmsKeyState = "enabled"
    rotation_days: int = Field(365, ge=0, le=2560)   # automatic rotation; 0 = off
    versions: list[KmsKeyVersion] = Field(default_factory=list)
    created_at: float = Field(default_factory=now)
    rotated_at: float = Field(default_factory=now)
    deletion_date: float | None = None               # when pending_deletion
    policy: str = ""                 # its key policy as written; "" = the default (security/key_policy.py)


DrillState = Literal["restoring", "checking", "passed", "failed"]


class DrillRecord(BaseModel):
    """A restore drill: the newest backup restored to a scratch database, which must
    start, pass pg_amcheck and hold the rows of the backup's fingerprint. Controller
    (schedules, follows the restore), backup worker (the checks)."""
    id: str
    database: str
    backup_id: str
    scratch: str                     # the scratch database's name
    state: DrillState = "restoring"
    started_at: float = Field(default_factory=now)
    restored_at: float | None = None
    restore_seconds: float | None = None
    finished_at: float | None = None
    tables_checked: int = 0
    error: str = ""
