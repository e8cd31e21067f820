"""Session-state detection for transaction pooling (dbplane.proxy.pinning)."""

import timeit

import pytest

from dbplane.proxy.pinning import pin_reason

pytestmark = pytest.mark.unit

CASES = [
    # plain traffic: never pins
    (b"SELECT abalance FROM pgbench_accounts WHERE aid = 42;", None),
    (b"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 42;", None),
    (b"INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 2, 3, 4, now())", None),
    (b"DELETE FROM t WHERE id = $1", None),
    (b"BEGIN", None), (b"COMMIT;", None), (b"ROLLBACK", None), (b"", None), (b"\x00", None), (b";;", None),
    (b"BEGIN; UPDATE t SET settled = true; COMMIT;", None),
    (b"SELECT offset_x, asset FROM holdings OFFSET 5", None),
    # SET
    (b"SET search_path = app, public", "SET"),
    (b"set search_path to app", "SET"),
    (b"  \n\tSeT TimeZone = 'UTC'", "SET"),
    (b"SET TIME ZONE 'UTC'\x00", "SET"),
    (b"SET SESSION statement_timeout = 0", "SET"),
    (b"SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE", "SET"),
    (b"SET SESSION AUTHORIZATION alice", "SET"),
    (b"SET ROLE reporting", "SET"),
    (b"SET \"local\".x = 1", "SET"),
    (b"SELECT 1; SET work_mem = '64MB'", "SET"),
    (b"BEGIN; SET search_path = x; COMMIT", "SET"),
    (b"SELECT 1;SET x.y = 1", "SET"),
    (b"-- leading comment\nSET x.y = 1", "SET"),
    (b"/* hint */ SET x.y = 1", "SET"),
    (b"/* nested /* comment */ still comment */ SET x.y = 1", "SET"),
    (b"SET LOCAL search_path = x", None),
    (b"set local statement_timeout = 5", None),
    (b"SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", None),
    (b"SET TRANSACTION SNAPSHOT '00000003-0000001B-1'", None),
    (b"SET CONSTRAINTS ALL DEFERRED", None),
    (b"RESET search_path", None), (b"RESET ALL", None),
    (b"ALTER ROLE alice SET search_path = x", None),
    (b"ALTER SYSTEM SET work_mem = '8MB'", None),
    (b"CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = x AS $$ SELECT 1 $$", None),
    (b"SELECT 'x; SET a = 1'", None),
    (b"SELECT E'it\\'s; SET a = 1'", None),
    (b"SELECT 'it''s; SET a = 1'", None),
    (b"SELECT \"x; SET a = 1\" FROM t", None),
    (b"SELECT 1 -- ; SET a = 1", None),
    (b"SELECT 1 /* ; SET a = 1 */", None),
    (b"SELECT 1 /* /* */ ; SET a = 1 */", None),
    (b"DO $$ BEGIN SET search_path = x; END $$", None),
    (b"DO $body$ BEGIN PERFORM 1; $$ SET x = 1 $$; END $body$", None),
    # set_config
    (b"SELECT set_config('search_path', 'x', false)", "set_config"),
    (b"select SET_CONFIG('app.user', $1, FALSE)", "set_config"),
    (b"SELECT pg_catalog.set_config('a.b', 'c', 'off')", "set_config"),
    (b"SELECT set_config('a.b', 'c', $3)", "set_config"),
    (b"SELECT set_config('a.b', 'c', true)", None),
    (b"SELECT set_config('a.b', lower('C'), TRUE)", None),
    (b"SELECT set_config('a.b', 'c', 'on'::boolean)", None),
    (b"SELECT set_config('a.b', 'c', 't')", None),
    (b"SELECT current_setting('a.b')", None),
    (b"SELECT 'set_config(''a'', ''b'', false)'", None),
    # PREPARE / LISTEN / LOAD
    (b"PREPARE q(int) AS SELECT $1", "PREPARE"),
    (b"prepare q as select 1", "PREPARE"),
    (b"PREPARE TRANSACTION 'gid-1'", None),
    (b"COMMIT PREPARED 'gid-1'", None),
    (b"EXECUTE q(1)", None), (b"DEALLOCATE q", None),
    (b"LISTEN jobs", "LISTEN"), (b"listen \"Jobs\";", "LISTEN"),
    (b"NOTIFY jobs", None), (b"UNLISTEN *", None),
    (b"SELECT 'listen', 'prepare', 'load'", None),
    (b"LOAD 'auto_explain'", "LOAD"),
    (b"SELECT download, payload FROM t", None),
    # temporary tables
    (b"CREATE TEMP TABLE t (a int)", "temporary table"),
    (b"CREATE TEMPORARY TABLE t AS SELECT 1", "temporary table"),
    (b"create temporary unlogged table t (a int)", "temporary table"),
    (b"CREATE LOCAL TEMP TABLE t (a int)", "temporary table"),
    (b"CREATE GLOBAL TEMPORARY TABLE t (a int)", "temporary table"),
    (b"CREATE TEMP VIEW v AS SELECT 1", "temporary table"),
    (b"CREATE OR REPLACE TEMP VIEW v AS SELECT 1", "temporary table"),
    (b"CREATE TEMP SEQUENCE s", "temporary table"),
    (b"CREATE TABLE pg_temp.t (a int)", "temporary table"),
    (b"SELECT * INTO TEMP t FROM x", "temporary table"),
    (b"SELECT a, b INTO TEMPORARY TABLE t FROM x", "temporary table"),
    (b"WITH c AS (SELECT 1) SELECT * INTO LOCAL TEMP t FROM c", "temporary table"),
    (b"EXPLAIN ANALYZE CREATE TEMP TABLE t AS SELECT 1", "temporary table"),
    (b"CREATE TABLE t (temp int)", None),
    (b"CREATE TABLE templates (a int)", None),
    (b"INSERT INTO temp VALUES (1)", None),
    (b"SELECT temp FROM readings", None),
    (b"SELECT * INTO archive FROM x", None),
    # advisory locks
    (b"SELECT pg_advisory_lock(42)", "advisory lock"),
    (b"SELECT pg_advisory_lock_shared(1, 2)", "advisory lock"),
    (b"SELECT pg_try_advisory_lock(hashtext('job'))", "advisory lock"),
    (b"select PG_TRY_ADVISORY_LOCK_SHARED (7)", "advisory lock"),
    (b"SELECT pg_catalog.pg_advisory_lock(1)", "advisory lock"),
    (b"SELECT 1; SELECT pg_advisory_lock(1);", "advisory lock"),
    (b"SELECT pg_advisory_xact_lock(42)", None),
    (b"SELECT pg_try_advisory_xact_lock_shared(42)", None),
    (b"SELECT pg_advisory_unlock(42)", None),
    (b"SELECT 'pg_advisory_lock(1)'", None),
    (b"SELECT $$pg_advisory_lock(1)$$", None),
    (b"SELECT * FROM pg_locks WHERE locktype = 'advisory'", None),
    # cursors
    (b"DECLARE c CURSOR WITH HOLD FOR SELECT 1", "WITH HOLD cursor"),
    (b"declare c no scroll cursor with hold for select * from t", "WITH HOLD cursor"),
    (b"DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", None),
    (b"DECLARE c CURSOR FOR SELECT 1", None),
    (b"SELECT 1 FROM holdings WHERE hold", None),
    # several statements: the first pinning one wins
    (b"LISTEN a; SET x.y = 1", "LISTEN"),
    (b"SELECT 1; /* c */ PREPARE p AS SELECT 1;", "PREPARE"),
    (b"SELECT 1;\n-- comment\nDECLARE c CURSOR WITH HOLD FOR SELECT 1\x00", "WITH HOLD cursor"),
    # unterminated quotes and comments do not crash
    (b"SELECT 'unterminated; SET x = 1", None),
    (b"SELECT $q$ never closed; SET x = 1", None),
    (b"SELECT 1 /* never closed; SET x = 1", None),
    (b"SELECT \"open; SET x = 1", None),
    (b"SELECT '\xc3\xa9t\xc3\xa9'; SET x = '\xff'", "SET"),
]


@pytest.mark.parametrize("sql,reason", CASES, ids=[c[0].decode("utf-8", "replace")[:60] for c in CASES])
def test_pin_reason(sql, reason):
    assert pin_reason(sql) == reason
    assert pin_reason(sql + b"\x00") == reason  # Query and Parse strings arrive NUL-terminated


def test_hot_path_timing():
    """Not asserted (machines differ); printed so that regressions are visible with pytest -s."""
    for sql in (b"SELECT abalance FROM pgbench_accounts WHERE aid = 42;",
                b"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 42;",
                b"SET search_path = app, public"):
        n = 20000
        per_call = min(timeit.repeat(lambda s=sql: pin_reason(s), number=n, repeat=3)) / n
        print(f"pin_reason {per_call * 1e6:.2f} us/call: {sql.decode()}")
