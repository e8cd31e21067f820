"""The database's admin user (like RDS's master user), created on the primary once it is
up, with a SCRAM verifier so the password never appears in SQL text; and the
pg_stat_statements extension in the postgres database."""

from __future__ import annotations

import psycopg
from psycopg import sql

from ..models import DatabaseSecrets, MemberSpec
from ..paths import write_private
from ..security.scram import verifier


async def ensure_admin_user(primary: MemberSpec, user: str, secrets: DatabaseSecrets) -> None:
    async with await psycopg.AsyncConnection.connect(
            host=primary.address, port=primary.pg_port, user="postgres",
            password=secrets.superuser, dbname="postgres", connect_timeout=5,
            autocommit=True) as conn:
        exists = await (await conn.execute(
            "SELECT 1 FROM pg_roles WHERE rolname = %s", (user,))).fetchone()
        verb = "ALTER" if exists else "CREATE"
        await conn.execute(sql.SQL(
            "{} ROLE {} LOGIN CREATEDB CREATEROLE PASSWORD {}").format(
                sql.SQL(verb), sql.Identifier(user), sql.Literal(verifier(secrets.admin))))
        # like RDS's rds_superuser: broad powers without being a PostgreSQL superuser
        roles = ["pg_monitor", "pg_signal_backend", "pg_read_all_data", "pg_write_all_data",
                 "pg_checkpoint"]
        if conn.info.server_version >= 160000:
            roles.append("pg_create_subscription")
        if conn.info.server_version >= 170000:
            roles.append("pg_maintain")
        await conn.execute(sql.SQL("GRANT {} TO {}").format(
            sql.SQL(", ").join(map(sql.Identifier, roles)), sql.Identifier(user)))
        # members of dbplane_iam log in through the proxy with IAM tokens only (like rds_iam)
        if not await (await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'dbplane_iam'")).fetchone():
            await conn.execute("CREATE ROLE dbplane_iam NOLOGIN")
        await conn.execute(sql.SQL("GRANT dbplane_iam TO {} WITH ADMIN OPTION").format(sql.Identifier(user)))
        # top SQL for the doctor and performance insights (the library is preloaded by default)
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        # owning the postgres database gives CREATE on its public schema (PostgreSQL 15+)
        await conn.execute(sql.SQL("ALTER DATABASE postgres OWNER TO {}").format(
            sql.Identifier(user)))


def write_pgpass(path, user: str, password: str) -> None:
    """A libpq password file for the admin user, any host and port (endpoints move)."""
    write_private(path, f"*:*:*:{user}:{password}\n")
