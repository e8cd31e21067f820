"""The database doctor's checks: pure functions from what probe.py observed (facts.py) to
findings with evidence and a fix (docs/doctor.md). A check that cannot look says so in an
info finding rather than passing silently. The checks only a platform database has (proxy
pools, backups, storage) are in platform_checks.py."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from . import Finding, ok
from .explain import create_index, filter_columns
from .facts import NodeFacts, Session, TableStat, Workload
from .pglog import Deadlock, LockWait, short

MIB, GIB = 2**20, 2**30
CONNECTIONS_WARN, CONNECTIONS_CRIT = 0.80, 0.95     # share of the connections users may open
LAG_WARN_BYTES, LAG_CRIT_BYTES = 16 * MIB, 1 * GIB   # 16 MiB: Patroni's maximum_lag_on_failover here
LAG_WARN_S, LAG_CRIT_S = 30.0, 300.0
REPLAY_PENDING_BYTES = 8192
IDLE_IN_TX_WARN_S, IDLE_IN_TX_CRIT_S = 30.0, 600.0
LONG_QUERY_WARN_S, LONG_QUERY_CRIT_S = 60.0, 1800.0
DEADLOCK_WINDOW_S = 86400.0                         # deadlocks in the log of the last day
INDEX_MIN_ROWS = 10_000                             # smaller tables are fine to scan
INDEX_MAX_SELECTIVITY = 0.05                        # the filter keeps at most 5 % of the rows
BLOAT_MIN_DEAD, BLOAT_RATIO = 10_000, 0.20
SEQ_HEAVY_ROWS, SEQ_HEAVY_AVG_READ = 100_000, 50_000
OUR_APPLICATIONS = ("dbplane-doctor",)


@dataclass(frozen=True)
class Target:
    """What is diagnosed: a platform database (fixes are dbplane commands) or any server
    given by URL (fixes are SQL)."""
    resource: str                  # "db/orders" or "url/127.0.0.1:5432"
    database: str | None = None    # the platform database's name

    def on(self, node: str | None = None) -> str:
        return f"{self.resource}/{node}" if node and self.database else self.resource

    def set_param(self, name: str, value: str, restart: bool = False) -> str:
        if self.database:
            return (f"dbplane db modify {self.database} --param {name}={value} --wait"
                    + (" (a rolling restart)" if restart else ""))
        return (f"ALTER SYSTEM SET {name} = '{value}'; then "
                + ("restart PostgreSQL" if restart else "SELECT pg_reload_conf()"))

    def run_sql(self, statement: str, node: str | None = None, address: str | None = None) -> str:
        if not self.database:
            return statement
        if node and address:
            return f"on {node} ({address}) as a superuser or the admin user: {statement}"
        return f"psql \"$(dbplane db url {self.database})\" -c \"{statement}\""


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 2 * 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} days"


def human_size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, factor in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if abs(n) >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{int(n)} B"


def unreachable(t: Target, node: NodeFacts, what: str) -> Finding:
    return Finding(check="node_unreachable", severity="warning", resource=t.on(node.name),
                   summary=f"{what} not checked: {node.name} did not answer", evidence=node.error,
                   fix=f"dbplane db describe {t.database}" if t.database else "check the URL and the server")


# -- connections -----------------------------------------------------------------------------------

def clients(node: NodeFacts) -> list[Session]:
    return [s for s in node.sessions if s.backend_type == "client backend"]


def connections(t: Target, node: NodeFacts) -> list[Finding]:
    """Client connections against max_connections minus the slots reserved for superusers
    (superuser_reserved_connections) and pg_use_reserved_connections (reserved_connections)."""
    maximum = node.int_setting("max_connections", 100)
    su = node.int_setting("superuser_reserved_connections", 3)
    reserved = node.int_setting("reserved_connections")
    usable = max(1, maximum - su - reserved)
    sessions = clients(node)
    used = len(sessions) + 1                        # the doctor's own connection counts too
    states = Counter(s.state or "unknown" for s in sessions)
    top = Counter((s.user, s.application or "(none)") for s in sessions).most_common(3)
    evidence = (f"{used} of max_connections {maximum} in use ({su} reserved for superusers"
                + (f", {reserved} for pg_use_reserved_connections" if reserved else "") + "): "
                + ", ".join(f"{n} {state}" for state, n in states.most_common())
                + ("; most by " + ", ".join(f"{u} ({app}): {n}" for (u, app), n in top) if top else ""))
    share = used / usable
    if share < CONNECTIONS_WARN:
        return [ok("connections", t.resource, f"{used} of {usable} usable connections in use", evidence)]
    idle = states.get("idle", 0)
    idle_tx = states.get("idle in transaction", 0) + states.get("idle in transaction (aborted)", 0)
    fixes = []
    if idle_tx:
        fixes.append(f"end the {idle_tx} idle-in-transaction session(s) (see idle_in_transaction)")
    if idle >= len(sessions) / 2:
        fixes.append("connect applications through the proxy's endpoints "
                     + (f"('dbplane db url {t.database}'), which pool server connections, "
                        if t.database else "or a pooler such as PgBouncer, ")
                     + "and shrink the applications' own pools")
    fixes.append("or raise the limit: " + (
        f"dbplane db modify {t.database} --param max_connections={maximum * 2} --wait (a restart), "
        "or a larger --class" if t.database else f"max_connections = {maximum * 2} and a restart"))
    severity = "critical" if share >= CONNECTIONS_CRIT else "warning"
    summary = (f"connections exhausted: {used} of {usable} usable connections in use, new clients "
               "are refused" if used >= usable else
               f"connections nearly exhausted: {used} of {usable} usable connections in use ({share:.0%})")
    return [Finding(check="connections", severity=severity, resource=t.resource, summary=summary,
                    evidence=evidence, fix="; ".join(fixes))]


# -- replication -------------------------------------------------------------------------------------

def _blockers(node: NodeFacts) -> list[Session]:
    """Sessions the standby's WAL replay (the startup process) waits for."""
    startup = next((s for s in node.sessions if s.backend_type == "startup"), None)
    pids = set(startup.blocked_by) if startup else set()
    return [s for s in node.sessions if s.pid in pids]


def _describe(s: Session) -> str:
    return (f"pid {s.pid} ({s.user}, {s.application or 'no application'}, {s.state}, transaction open "
            f"{human_duration(s.xact_age)}): {short(s.query, 120)}")


def replication(t: Target, primary: NodeFacts | None, standbys: list[NodeFacts],
                expected: list[str] = ()) -> list[Finding]:
    """Each standby's lag in bytes and seconds and, from the standby itself, its cause."""
    out = []
    rows = {r.name: r for r in primary.replication} if primary and not primary.error else {}
    by_name = {n.name: n for n in standbys}
    names = list(dict.fromkeys([*expected, *by_name] if t.database else [*rows, *by_name]))
    for name in names:
        node, row = by_name.get(name), rows.get(name)
        out.append(_standby(t, name, primary, node, row))
    if not names and primary is not None and not primary.error:
        out.append(ok("replication_lag", t.resource, "no standby replicates from this server"))
    return out


def _standby(t: Target, name: str, primary: NodeFacts | None, node: NodeFacts | None, row) -> Finding:
    res = t.on(name)
    replay = node.replay if node is not None and not node.error else None
    unreplayed = None
    if replay is not None and replay.receive_lsn is not None and replay.replay_lsn is not None:
        unreplayed = max(0.0, replay.receive_lsn - replay.replay_lsn)
    # the standby's own positions are fresher than the primary's last status report
    lag_bytes = row.replay_behind if row is not None else None
    if replay and replay.replay_lsn is not None and primary and primary.current_lsn is not None:
        lag_bytes = max(0.0, primary.current_lsn - replay.replay_lsn)
    elif lag_bytes is None:
        lag_bytes = unreplayed                                    # a standby seen alone
    # seconds: like RDS ReplicaLag, the age of the last replayed commit while received WAL
    # waits to be replayed (a page or more: not a record caught in passing); else the
    # primary's measured replay_lag
    if unreplayed is not None and unreplayed >= REPLAY_PENDING_BYTES and replay.replay_age is not None:
        lag_s = replay.replay_age
    else:
        lag_s = (row.replay_lag if row else None) or 0.0
    evidence = [f"{human_size(lag_bytes)} and {lag_s:.0f} s behind"]
    if row is not None:
        evidence.append(f"primary: {row.state} ({row.sync_state}), sent {human_size(row.sent_behind)} "
                        f"behind, flushed {human_size(row.flush_behind)} behind")
    if replay is not None:
        evidence.append(f"standby: WAL receiver {replay.receiver_status or 'not running'}, received "
                        f"{human_size((replay.receive_lsn or 0) - (replay.replay_lsn or 0))} more than "
                        "replayed, "
                        f"replay {replay.pause_state}")
    if node is None or node.error:
        if row is None:
            return Finding(check="replication_lag", severity="critical", resource=res,
                           summary=f"{name} does not replicate: the primary has no WAL sender for it and "
                                   "it did not answer", evidence=node.error if node else "",
                           fix=f"dbplane db describe {t.database}" if t.database else "")
        evidence.append(f"standby not reachable for the cause: {node.error if node else 'not given'}")
    severity = "ok"
    if lag_bytes and (lag_bytes >= LAG_CRIT_BYTES or lag_s >= LAG_CRIT_S):
        severity = "critical"
    elif lag_bytes and (lag_bytes >= LAG_WARN_BYTES or lag_s >= LAG_WARN_S):
        severity = "warning"
    cause, fix = "", ""
    blockers = _blockers(node) if node is not None else []
    if replay is not None and replay.pause_state != "not paused":
        cause = f"WAL replay is {replay.pause_state}"
        fix = t.run_sql("SELECT pg_wal_replay_resume()", name, node.address)
        severity = "critical" if severity == "critical" else "warning"
    elif blockers:
        cause = "WAL replay waits for a conflicting query on the standby"
        evidence.append("replay blocked by " + "; ".join(_describe(s) for s in blockers[:3]))
        delay = node.setting("max_standby_streaming_delay")
        fix = (t.run_sql(f"SELECT pg_terminate_backend({blockers[0].pid})", name, node.address)
               + "; keep queries on standbys short, or bound the wait: "
               + t.set_param("max_standby_streaming_delay", "30s")
               + (f" (now {delay}{'' if delay == '-1' else ' ms'})" if delay else ""))
        severity = "critical" if severity == "critical" else "warning"
    elif replay is not None and replay.receiver_status != "streaming":
        cause = "the standby receives no WAL: its WAL receiver is " + (
            replay.receiver_status or "not running")
        fix = (f"check the network between the standby and {replay.sender or 'the primary'}, and the "
               "standby's log; " + (f"dbplane db describe {t.database}" if t.database else ""))
        severity = "critical" if lag_bytes or severity == "critical" else "warning"
    elif severity != "ok" and replay is not None:
        if lag_bytes and (unreplayed or 0) >= lag_bytes / 2:
            cause = "the standby received the WAL but applies it slowly (I/O or CPU on the standby)"
            fix = ("give the standby's host more I/O, or spread the writes (large batches replay "
                   "on one process)")
        else:
            cause = "WAL reaches the standby slowly (network or the primary's WAL sender)"
            fix = "check bandwidth and latency between the hosts; large writes make WAL faster than the link"
    elif severity != "ok":
        cause = "the cause is on the standby"
        fix = "run the doctor against the standby (--url) to see its replay state"
    if severity == "ok":
        return ok("replication_lag", res, f"{name} is {human_size(lag_bytes)} behind", "; ".join(evidence))
    return Finding(check="replication_lag", severity=severity, resource=res,
                   summary=f"{name} lags {human_size(lag_bytes)} / {lag_s:.0f} s: {cause}",
                   evidence="; ".join(evidence), fix=fix)


# -- locks and deadlocks ---------------------------------------------------------------------------

def deadlocks(t: Target, node: NodeFacts, found: list[Deadlock], notes: list[str],
              now: float | None = None) -> list[Finding]:
    now = now or time.time()
    counted = {d.name: d.deadlocks for d in node.databases if d.deadlocks}
    recent = [d for d in found if d.time is None or now - d.time <= DEADLOCK_WINDOW_S]
    out = []
    if recent:
        last = recent[-1]
        out.append(Finding(
            check="deadlocks", severity="warning", resource=t.resource,
            summary=f"{len(recent)} deadlock(s) in the last day: transactions lock the same rows in "
                    "opposite orders",
            evidence=f"last: {last.cycle()}; PostgreSQL cancelled pid {last.victim}"
                     + (f" ({last.context})" if last.context else "")
                     + (f"; pg_stat_database.deadlocks: {counted}" if counted else ""),
            fix="take row locks in one order in every transaction (e.g. update rows sorted by key, or "
                "SELECT ... ORDER BY id FOR UPDATE first), keep transactions short, and retry a "
                "transaction that fails with SQLSTATE 40P01"))
    elif counted:
        out.append(Finding(
            check="deadlocks", severity="info", resource=t.resource,
            summary=f"{sum(counted.values())} deadlock(s) since statistics were reset, none in the log "
                    "read", evidence=f"pg_stat_database.deadlocks: {counted}"
            + (f"; {'; '.join(notes)}" if notes else ""),
            fix="the statements are in PostgreSQL's log at the time of each deadlock"))
    else:
        out.append(ok("deadlocks", t.resource, "no deadlocks",
                      "pg_stat_database.deadlocks is 0" + (f"; {'; '.join(notes)}" if notes else "")))
    if node.setting("log_lock_waits") == "off":
        out.append(Finding(check="log_settings", severity="info", resource=t.resource,
                           summary="log_lock_waits is off: lock waits longer than deadlock_timeout "
                                   "are not logged", evidence="log_lock_waits=off",
                           fix=t.set_param("log_lock_waits", "on")))
    return out


def lock_waits(t: Target, node: NodeFacts, logged: list[LockWait], now: float | None = None) -> list[Finding]:
    """Sessions waiting on a lock now (who holds it), and waits the log recorded."""
    now = now or time.time()
    by_pid = {s.pid: s for s in node.sessions}
    waiting = [s for s in clients(node) if s.wait_event_type == "Lock" and s.blocked_by]
    out = []
    if waiting:
        holders = Counter(pid for s in waiting for pid in s.blocked_by)
        pid, n = holders.most_common(1)[0]
        holder = by_pid.get(pid)
        worst = max(waiting, key=lambda s: s.state_age or 0)
        out.append(Finding(
            check="lock_waits", severity="warning" if (worst.state_age or 0) >= 5 else "info",
            resource=t.resource,
            summary=f"{len(waiting)} session(s) wait for a lock; pid {pid} blocks {n}",
            evidence=f"longest: pid {worst.pid} waits {human_duration(worst.state_age)} in "
                     f"`{short(worst.query, 100)}`"
                     + (f"; holder {_describe(holder)}" if holder else ""),
            fix=f"{t.run_sql(f'SELECT pg_terminate_backend({pid})')} ends the holder; "
                "then find why its transaction stays open"))
    recent = [w for w in logged if w.time is None or now - w.time <= DEADLOCK_WINDOW_S]
    if recent:
        common = Counter(short(w.statement, 100) for w in recent if w.statement).most_common(1)
        out.append(Finding(
            check="lock_waits", severity="info", resource=t.resource,
            summary=f"{len(recent)} lock wait(s) longer than deadlock_timeout logged in the last day",
            evidence=f"longest {max(w.waited_ms for w in recent):.0f} ms"
                     + (f"; most often in `{common[0][0]}`" if common else ""),
            fix="shorten the transactions that hold these locks"))
    return out


# -- sessions ---------------------------------------------------------------------------------------

def sessions(t: Target, node: NodeFacts, member: str | None = None) -> list[Finding]:
    """Idle-in-transaction sessions (they hold locks and stop vacuum) and long queries."""
    res = t.on(member)
    mine = [s for s in clients(node) if s.application not in OUR_APPLICATIONS]
    idle = sorted((s for s in mine if s.state.startswith("idle in transaction")
                   and (s.state_age or 0) >= IDLE_IN_TX_WARN_S), key=lambda s: -(s.state_age or 0))
    long = sorted((s for s in mine if s.state == "active" and (s.query_age or 0) >= LONG_QUERY_WARN_S),
                  key=lambda s: -(s.query_age or 0))
    blocking = {pid for s in node.sessions for pid in s.blocked_by}
    address = node.address if member else None
    out = []
    if idle:
        worst = idle[0]
        timeout = node.setting("idle_in_transaction_session_timeout", "0")
        severity = "critical" if (worst.state_age or 0) >= IDLE_IN_TX_CRIT_S or worst.pid in blocking \
            else "warning"
        out.append(Finding(
            check="idle_in_transaction", severity=severity, resource=res,
            summary=f"{len(idle)} session(s) idle in transaction for {human_duration(worst.state_age)} or "
                    "less: they hold their locks and keep vacuum from removing dead rows",
            evidence="; ".join(f"pid {s.pid} ({s.user}, {s.application or 'no application'}, "
                               f"{s.client or 'local'}) idle {human_duration(s.state_age)}"
                               + (", blocks others" if s.pid in blocking else "")
                               + f", last query `{short(s.query, 100)}`" for s in idle[:3])
                     + f"; idle_in_transaction_session_timeout={timeout}",
            fix=t.run_sql(f"SELECT pg_terminate_backend({worst.pid})", member, address)
                + "; to end such sessions automatically: "
                + t.set_param("idle_in_transaction_session_timeout", "5min")
                + "; and make the application commit or roll back"))
    if long:
        worst = long[0]
        out.append(Finding(
            check="long_running", severity="critical" if (worst.query_age or 0) >= LONG_QUERY_CRIT_S
            else "warning", resource=res,
            summary=f"{len(long)} query(ies) running for {human_duration(worst.query_age)} or less",
            evidence="; ".join(f"pid {s.pid} ({s.user}) running {human_duration(s.query_age)}"
                               + (f", waiting on {s.wait_event_type}/{s.wait_event}"
                                  if s.wait_event_type else "")
                               + f": `{short(s.query, 100)}`" for s in long[:3]),
            fix=t.run_sql(f"SELECT pg_cancel_backend({worst.pid})", member, address)
                + " (pg_terminate_backend to end the session); bound queries with "
                + t.set_param("statement_timeout", "5min")))
    if not out:
        out.append(ok("sessions", res, "no long-running or idle-in-transaction sessions",
                      f"{len(mine)} client sessions"))
    return out


# -- statements and tables --------------------------------------------------------------------------

def statements(t: Target, node: NodeFacts, w: Workload) -> list[Finding]:
    """pg_stat_statements' slowest statements; a sequential scan over a big table that a
    selective filter would rather answer from an index becomes a CREATE INDEX."""
    libraries = [x.strip() for x in node.setting("shared_preload_libraries").split(",") if x.strip()]
    create = t.run_sql("CREATE EXTENSION pg_stat_statements")
    if not w.statements_loaded:
        value = ",".join([*libraries, "pg_stat_statements"])
        return [Finding(check="pg_stat_statements", severity="warning", resource=t.resource,
                        summary="pg_stat_statements is not loaded: slow statements and missing indexes "
                                "cannot be found",
                        evidence=f"shared_preload_libraries='{','.join(libraries)}'",
                        fix=f"{t.set_param('shared_preload_libraries', value, restart=True)}, then {create}")]
    if not w.statements_installed:      # one statement away: info, not a warning on every new database
        return [Finding(check="pg_stat_statements", severity="info", resource=t.resource,
                        summary="pg_stat_statements is loaded but the extension is not created in any "
                                "database: slow statements and missing indexes are not checked",
                        evidence="no pg_stat_statements in pg_extension", fix=create)]
    out: list[Finding] = []
    seen = set()
    for st in w.statements:
        for info in st.scans:
            scan = info.scan
            if info.reltuples < INDEX_MIN_ROWS or scan.rows > info.reltuples * INDEX_MAX_SELECTIVITY:
                continue
            cols = filter_columns(scan.filter, scan.alias, info.columns)
            if not cols or cols[0] in info.leading_indexed:
                continue
            key = (st.datname, scan.schema, scan.table, tuple(cols))
            if key in seen:
                continue
            seen.add(key)
            out.append(Finding(
                check="missing_index", severity="warning", resource=t.resource,
                summary=f"a slow statement scans all of {scan.schema}.{scan.table} to keep "
                        f"~{scan.rows:.0f} of {info.reltuples:.0f} rows: an index on "
                        f"{', '.join(cols)} would find them directly",
                evidence=f"database {st.datname}: mean {st.mean_ms:.1f} ms over {st.calls} calls: "
                         f"`{short(st.query, 140)}`; EXPLAIN: Seq Scan on {scan.schema}.{scan.table} "
                         f"Filter: {scan.filter}",
                fix=create_index(scan.schema, scan.table, cols)
                    + (f" (in database {st.datname})" if st.datname != "postgres" else "")))
    if not out:
        slowest = w.statements[0] if w.statements else None
        out.append(ok("missing_index", t.resource, "no slow statement scans a big table for a few rows",
                      f"slowest: mean {slowest.mean_ms:.1f} ms `{short(slowest.query, 100)}`" if slowest
                      else "no statement slower than the threshold"))
    notes = w.notes + [f"`{short(st.query, 60)}`: {st.explain_error}" for st in w.statements
                       if st.explain_error]
    if notes:
        out.append(Finding(check="missing_index", severity="info", resource=t.resource,
                           summary="some statements or databases could not be examined",
                           evidence="; ".join(notes[:5])))
    return out


def tables(t: Target, stats: list[TableStat]) -> list[Finding]:
    """Dead-tuple bloat, and big tables read mostly by sequential scans."""
    out = []
    for s in stats:
        name = f"{s.schema}.{s.table}" + (f" (database {s.datname})" if s.datname != "postgres" else "")
        total = s.live + s.dead
        if s.dead >= BLOAT_MIN_DEAD and total and s.dead / total >= BLOAT_RATIO:
            vacuumed = (f"last vacuum {human_duration(s.vacuum_age)} ago" if s.vacuum_age is not None
                        else "never vacuumed")
            out.append(Finding(
                check="bloat", severity="warning", resource=t.resource,
                summary=f"{name} is {s.dead / total:.0%} dead rows",
                evidence=f"{s.dead} dead, {s.live} live tuples; {vacuumed}"
                         + ("" if s.autovacuum_age is not None else "; autovacuum has not run on it"),
                fix=f"{t.run_sql(f'VACUUM (ANALYZE) {s.schema}.{s.table}')}; if autovacuum falls behind, "
                    f"ALTER TABLE {s.schema}.{s.table} SET (autovacuum_vacuum_scale_factor = 0.05); "
                    "end long transactions that hold cleanup back (see idle_in_transaction)"))
        if (s.live >= SEQ_HEAVY_ROWS and s.seq_scan >= 10 and s.seq_scan > s.idx_scan
                and s.seq_tup_read / s.seq_scan >= SEQ_HEAVY_AVG_READ):
            out.append(Finding(
                check="seq_scans", severity="info", resource=t.resource,
                summary=f"{name} ({s.live} rows) is read mostly by sequential scans",
                evidence=f"{s.seq_scan} sequential scans reading {s.seq_tup_read // s.seq_scan} rows each "
                         f"on average, {s.idx_scan} index scans, {s.indexes} indexes",
                fix="see missing_index for the statements; index the columns they filter on"))
    if not [f for f in out if f.check == "bloat"]:
        out.append(ok("bloat", t.resource, "no table with a large share of dead rows",
                      f"{len(stats)} tables"))
    return out
