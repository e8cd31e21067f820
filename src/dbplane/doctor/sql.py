"""Every query the database doctor runs, in one place (src/dbplane/doctor/probe.py runs
them, database.py judges the rows). All of them read catalog and statistics views only;
EXPLAIN runs without ANALYZE inside a READ ONLY transaction, so nothing is executed."""

from __future__ import annotations

# settings the checks need; a row is missing when the server does not have the setting
# (reserved_connections before 16) or hides it from this user (data_directory)
SETTING_NAMES = [
    "max_connections", "superuser_reserved_connections", "reserved_connections",
    "shared_preload_libraries", "log_lock_waits", "deadlock_timeout",
    "idle_in_transaction_session_timeout", "statement_timeout", "max_standby_streaming_delay",
    "hot_standby_feedback", "server_version_num", "data_directory", "log_recovery_conflict_waits",
]
SETTINGS = "SELECT name, setting, coalesce(unit, '') FROM pg_settings WHERE name = ANY(%s)"

IN_RECOVERY = "SELECT pg_is_in_recovery()"

# every session but ours; who blocks whom only for sessions waiting on a lock and for the
# startup process (on a standby: WAL replay waiting for a conflicting query)
ACTIVITY = """
SELECT pid, coalesce(usename, ''), coalesce(datname, ''), coalesce(application_name, ''),
       coalesce(client_addr::text, ''), coalesce(state, ''), coalesce(backend_type, ''),
       extract(epoch FROM now() - xact_start)::float8,
       extract(epoch FROM now() - query_start)::float8,
       extract(epoch FROM now() - state_change)::float8,
       coalesce(wait_event_type, ''), coalesce(wait_event, ''), left(coalesce(query, ''), 1000),
       CASE WHEN wait_event_type = 'Lock' OR backend_type = 'startup'
            THEN pg_blocking_pids(pid) ELSE '{}'::int[] END
FROM pg_stat_activity
WHERE pid <> pg_backend_pid()"""

# on the primary: each standby's distance behind the current WAL position
REPLICATION = """
SELECT coalesce(application_name, ''), coalesce(client_addr::text, ''), coalesce(state, ''),
       coalesce(sync_state, ''),
       pg_wal_lsn_diff(pg_current_wal_lsn(), sent_lsn)::float8,
       pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)::float8,
       pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::float8,
       extract(epoch FROM write_lag)::float8, extract(epoch FROM flush_lag)::float8,
       extract(epoch FROM replay_lag)::float8
FROM pg_stat_replication"""

CURRENT_LSN = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8"

# on a standby: what it received and replayed, replay paused or not, the WAL receiver
STANDBY = """
SELECT pg_wal_lsn_diff(pg_last_wal_receive_lsn(), '0/0')::float8,
       pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::float8,
       extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8,
       pg_get_wal_replay_pause_state(),
       (SELECT status FROM pg_stat_wal_receiver),
       (SELECT extract(epoch FROM now() - last_msg_receipt_time)::float8 FROM pg_stat_wal_receiver),
       (SELECT coalesce(sender_host, '') || ':' || coalesce(sender_port::text, '')
        FROM pg_stat_wal_receiver)"""

# on the standby: locks the startup process (WAL replay) waits for, and who holds them
REPLAY_LOCK_HOLDERS = """
SELECT DISTINCT h.pid
FROM pg_locks w
JOIN pg_locks h ON h.granted AND h.pid <> w.pid AND h.locktype = w.locktype
                AND h.database IS NOT DISTINCT FROM w.database
                AND h.relation IS NOT DISTINCT FROM w.relation
WHERE NOT w.granted AND w.pid = %s"""

DATABASES = """
SELECT d.datname, coalesce(s.deadlocks, 0), coalesce(s.numbackends, 0),
       CASE WHEN has_database_privilege(d.datname, 'CONNECT') THEN pg_database_size(d.datname) END,
       d.datallowconn AND NOT d.datistemplate
FROM pg_database d LEFT JOIN pg_stat_database s ON s.datid = d.oid
ORDER BY d.datname"""

# per database ------------------------------------------------------------------------------------

TABLES = """
SELECT schemaname, relname, n_live_tup, n_dead_tup, seq_scan, seq_tup_read, coalesce(idx_scan, 0),
       extract(epoch FROM now() - greatest(last_autovacuum, last_vacuum))::float8,
       extract(epoch FROM now() - last_autovacuum)::float8,
       (SELECT count(*) FROM pg_index i WHERE i.indrelid = relid)
FROM pg_stat_user_tables
ORDER BY n_live_tup + n_dead_tup DESC
LIMIT 200"""

STATEMENTS_EXTENSION = ("SELECT extnamespace::regnamespace::text FROM pg_extension "
                        "WHERE extname = 'pg_stat_statements'")

# {schema} is the extension's schema (an identifier, quoted by the caller); monitoring
# queries on catalogs are left out, they are not what the application waits for
TOP_STATEMENTS = """
SELECT d.datname, coalesce(r.rolname, ''), s.calls, s.mean_exec_time, s.total_exec_time, s.rows,
       left(s.query, 4000)
FROM {schema}.pg_stat_statements s
JOIN pg_database d ON d.oid = s.dbid
LEFT JOIN pg_roles r ON r.oid = s.userid
WHERE s.calls > 0 AND s.mean_exec_time >= %s
  AND s.query !~* '(pg_catalog|pg_stat|information_schema|pg_locks|pg_settings|pg_class)'
ORDER BY s.mean_exec_time DESC
LIMIT %s"""

# run in a READ ONLY transaction with short timeouts, as the statement's own user (SET LOCAL
# ROLE: planning may evaluate functions): EXPLAIN without ANALYZE plans and executes
# nothing; GENERIC_PLAN (PostgreSQL 16+) plans the $1 placeholders of pg_stat_statements'
# normalised text
EXPLAIN_SETUP = ("SET TRANSACTION READ ONLY", "SET LOCAL statement_timeout = '3s'",
                 "SET LOCAL lock_timeout = '1s'")
EXPLAIN_GENERIC = "EXPLAIN (GENERIC_PLAN, VERBOSE, FORMAT JSON) "
EXPLAIN_PLAIN = "EXPLAIN (VERBOSE, FORMAT JSON) "

# what an index suggestion needs to know about a scanned table
RELATION = """
SELECT c.reltuples::float8,
       array(SELECT a.attname::text FROM pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
       array(SELECT a.attname::text FROM pg_index i
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
             WHERE i.indrelid = c.oid)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s"""

# URL mode: the server's own log, when it writes one to a file this user may read
CURRENT_LOGFILE = "SELECT pg_current_logfile()"
READ_LOG_TAIL = """
SELECT pg_read_file(%s, greatest(0, (pg_stat_file(%s)).size - %s), %s)"""
