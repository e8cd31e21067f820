"""The observed shape of a database, derived from one etcd snapshot: dbplane's keys
(spec, status, placement, member status) plus Patroni's keys for the same scope.
Pure: used by the controller to decide and by the API to describe."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from ..models import (
    ArchiveStatus,
    BackupRecord,
    DatabaseSpec,
    DatabaseStatus,
    DrillRecord,
    Host,
    MemberSpec,
    MemberStatus,
    Operation,
)
from ..store import keys


class Snapshot:
    """Everything under dbplane's and Patroni's prefixes, read once."""

    def __init__(self, raw: dict[str, bytes]):
        self.raw = raw

    def _under(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, v in self.raw.items() if k.startswith(prefix)}

    def hosts(self) -> list[Host]:
        return [Host.model_validate_json(v) for v in self._under(keys.hosts()).values()]

    def specs(self) -> dict[str, DatabaseSpec]:
        out = {}
        for k, v in self._under(keys.databases()).items():
            if k.endswith("/spec"):
                spec = DatabaseSpec.model_validate_json(v)
                out[spec.name] = spec
        return out

    def status(self, db: str) -> DatabaseStatus | None:
        raw = self.raw.get(keys.database_status(db))
        return DatabaseStatus.model_validate_json(raw) if raw else None

    def members(self, db: str = "") -> list[MemberSpec]:
        return [MemberSpec.model_validate_json(v) for v in self._under(keys.members(db)).values()]

    def member_statuses(self, db: str) -> dict[str, MemberStatus]:
        out = {}
        for v in self._under(keys.member_statuses(db)).values():
            st = MemberStatus.model_validate_json(v)
            out[st.name] = st
        return out

    def operations(self) -> list[Operation]:
        return [Operation.model_validate_json(v) for v in self._under(keys.operations()).values()]

    def backups(self, db: str = "") -> list[BackupRecord]:
        return [BackupRecord.model_validate_json(v) for v in self._under(keys.backups(db)).values()]

    def drills(self, db: str = "") -> list[DrillRecord]:
        return [DrillRecord.model_validate_json(v) for v in self._under(keys.drills(db)).values()]

    def archive(self, db: str) -> ArchiveStatus | None:
        raw = self.raw.get(keys.archive_status(db))
        return ArchiveStatus.model_validate_json(raw) if raw else None

    def patroni(self, db: str) -> PatroniView:
        return PatroniView.parse(self._under(keys.patroni_scope(db)), keys.patroni_scope(db))


@dataclass
class PatroniView:
    leader: str | None = None
    sync_standbys: list[str] = field(default_factory=list)
    members: dict[str, dict] = field(default_factory=dict)
    initialized: bool = False
    pending_failover: bool = False

    @classmethod
    def parse(cls, raw: dict[str, bytes], prefix: str) -> PatroniView:
        view = cls()
        for key, value in raw.items():
            rel = key[len(prefix):]
            text = value.decode()
            if rel == "leader":
                view.leader = text
            elif rel == "initialize":
                view.initialized = True
            elif rel == "failover":
                view.pending_failover = bool(text)
            elif rel == "sync":
                sync = json.loads(text or "{}").get("sync_standby") or ""
                view.sync_standbys = [s for s in sync.split(",") if s] if isinstance(sync, str) \
                    else list(sync)
            elif rel.startswith("members/"):
                try:
                    view.members[rel.split("/", 1)[1]] = json.loads(text)
                except ValueError:
                    pass
        return view

    def leader_lsn(self) -> int | None:
        if self.leader and self.leader in self.members:
            return self.members[self.leader].get("xlog_location")
        return None


@dataclass
class MemberView:
    name: str
    role: str            # primary, sync_standby, replica, unknown
    zone: str
    host: str
    address: str
    port: int
    api_port: int
    kind: str
    state: str           # Patroni's state (running, streaming, starting...) or the agent's
    lag_bytes: int | None
    timeline: int | None
    message: str = ""
    lag_seconds: float | None = None
    storage_bytes: int | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "role": self.role, "zone": self.zone, "host": self.host,
                "port": self.port, "address": self.address, "state": self.state,
                "lag_bytes": self.lag_bytes, "lag_seconds": self.lag_seconds,
                "storage_bytes": self.storage_bytes,
                "timeline": self.timeline, "kind": self.kind,
                "message": self.message}


def member_views(snapshot: Snapshot, db: str) -> list[MemberView]:
    patroni = snapshot.patroni(db)
    statuses = snapshot.member_statuses(db)
    leader_lsn = patroni.leader_lsn()
    live_hosts = {h.name for h in snapshot.hosts()}
    views = []
    for m in sorted(snapshot.members(db), key=lambda m: (len(m.name), m.name)):
        p = patroni.members.get(m.name)
        st = statuses.get(m.name)
        if m.name == patroni.leader:
            role = "primary"
        elif m.name in patroni.sync_standbys:
            role = "sync_standby"
        elif p is not None:
            role = "replica"
        else:
            role = "unknown"
        if p is not None:
            state = p.get("replication_state") or p.get("state", "unknown")
        else:
            state = st.state if st else "pending"
        if m.host not in live_hosts:
            state = "host-down"      # Patroni's key may outlive the node by up to its ttl
            role = "unknown" if role == "primary" and m.name != patroni.leader else role
        if m.deleting:
            state = "deleting"
        lag = None
        if p is not None and role != "primary" and leader_lsn is not None:
            position = p.get("replay_lsn") or p.get("xlog_location")
            if position is not None:
                lag = max(0, leader_lsn - position)
        elif role == "primary":
            lag = 0
        lag_seconds = None
        if lag == 0:
            lag_seconds = 0.0
        elif lag is not None and st is not None and st.replayed_at:
            # like RDS ReplicaLag: age of the last replayed commit while WAL is outstanding
            lag_seconds = round(max(0.0, time.time() - st.replayed_at), 1)
        views.append(MemberView(
            name=m.name, role=role, zone=m.zone, host=m.host, address=m.address, port=m.pg_port,
            api_port=m.api_port, kind=m.kind, state=state, lag_bytes=lag,
            timeline=p.get("timeline") if p else None, lag_seconds=lag_seconds,
            storage_bytes=st.storage_bytes if st else None,
            message=st.message if st and st.state == "failed" else ""))
    return views


def endpoints(views: list[MemberView]) -> dict[str, str | None]:
    """Writer: the current primary. Reader: the healthiest replica, else the primary."""
    primary = next((v for v in views if v.role == "primary"), None)
    readers = [v for v in views if v.role in ("replica", "sync_standby")
               and v.state in ("streaming", "running")]
    # prefer read replicas over the Multi-AZ standby, then the least lagging
    readers.sort(key=lambda v: (v.kind != "replica", v.lag_bytes or 0, v.name))
    writer = f"{primary.address}:{primary.port}" if primary else None
    reader = f"{readers[0].address}:{readers[0].port}" if readers else writer
    return {"writer": writer, "reader": reader}
