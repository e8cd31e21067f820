"""FastAPI application. Handlers validate, write desired state plus an operation, and
return at once (202); the controller does the work. No business logic lives here."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from .. import __version__, parameters
from ..classes import CLASSES, get_class
from ..console.routes import router as console_router
from ..errors import CapacityError, Conflict, DbplaneError, InvalidInput, NotFound
from ..models import NAME_RE, AllowRule, BackupSettings, DatabaseSpec, DatabaseStatus, Event, Host, Operation
from ..proxy.allowlist import rules_for_create
from ..security import db_secrets
from ..security.iam import Authority
from ..security.key_policy import DECRYPT
from ..security.signing import NonceCache
from ..security.tls import etcd_client_tls
from ..store import Store, keys
from ..system import postgres_major_version
from . import restore_plan
from .alarm_routes import router as alarm_router
from .allowlist_routes import router as allowlist_router
from .audit import install as install_audit
from .audit_routes import router as audit_router
from .auth import authorize, visible
from .backup_routes import router as backup_router
from .backup_routes import snapshot_record
from .doctor_routes import router as doctor_router
from .ha_routes import router as ha_router
from .iam_routes import router as iam_router
from .insights_routes import router as insights_router
from .kms_routes import require_key_use
from .kms_routes import router as kms_router
from .metrics_routes import router as metrics_router
from .proxy_routes import router as proxy_router
from .views import database_snapshot, describe, get_spec, read_spec, save_spec, summary

log = logging.getLogger("dbplane.api")


class CreateDatabase(BaseModel):
    name: str
    instance_class: str = Field("small", alias="class")
    multi_az: bool = False
    replicas: int = Field(0, ge=0, le=5)
    storage_gb: int = Field(10, ge=1, le=65536)
    params: dict[str, str] = Field(default_factory=dict)
    backups: bool = True
    backup_retention_days: int = Field(7, ge=1, le=35)
    allowlist: list[AllowRule] | None = None     # who may connect; None: loopback only
    metrics_interval: int = Field(10, ge=1, le=60)   # seconds between samples (RDS --monitoring-interval)

    model_config = {"populate_by_name": True}


class RestoreDatabase(CreateDatabase):
    snapshot: str | None = None          # restore this snapshot (or automated backup) ...
    source: str | None = None            # ... or this database at a point in time:
    time: float | None = None            # a Unix time, or
    latest: bool = False                 # the latest restorable time
    repository: str | None = None        # restore from this copy (default: where the backup is)


def create_app(etcd_url: str, data_root: Path | None = None) -> FastAPI:
    """`data_root`: where this platform's files are (certificates the doctor checks), if
    the API runs on that machine."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.store = Store(etcd_url, tls=etcd_client_tls(data_root))
        app.state.authority = Authority(app.state.store)
        app.state.nonces = NonceCache()
        try:
            await app.state.store.connect()
        except DbplaneError as e:
            log.warning("%s; requests will retry", e)
        yield
        await app.state.store.close()

    app = FastAPI(title="dbplane", version=__version__, lifespan=lifespan,
                  dependencies=[Depends(authorize)],    # every route: signed and allowed
                  description="Managed PostgreSQL: databases, members, operations, events.")

    install_audit(app)                # every call, refused ones too, into the audit log

    @app.exception_handler(DbplaneError)
    async def _dbplane_error(request: Request, exc: DbplaneError):
        return JSONResponse(status_code=exc.status, content={"error": exc.to_dict()})

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", []) if x != "body")
        err = InvalidInput(f"invalid {where or 'request'}: {first.get('msg')}",
                           "see the API schema at /docs")
        return JSONResponse(status_code=400, content={"error": err.to_dict()})

    def store(request: Request) -> Store:
        return request.app.state.store

    async def live_hosts(s: Store) -> list[Host]:
        return await s.list(keys.hosts(), Host)

    @app.get("/healthz")
    async def healthz(request: Request):
        await store(request).get_raw(keys.config())
        return {"status": "ok", "version": __version__}

    @app.get("/v1/classes")
    async def list_classes():
        return [c.model_dump() for c in CLASSES.values()]

    @app.get("/v1/hosts")
    async def list_hosts(request: Request):
        return [h.model_dump() for h in await live_hosts(store(request))]

    @app.get("/v1/databases")
    async def list_databases(request: Request):
        s = store(request)
        raw = await s.get_prefix(keys.databases())
        specs = [DatabaseSpec.model_validate_json(v) for k, v in raw.items() if k.endswith("/spec")]
        out = []
        for spec in sorted(specs, key=lambda x: x.name):
            if visible(request, f"db/{spec.name}"):
                out.append(summary(spec, await database_snapshot(s, spec.name)))
        return out

    async def check_new_database(s: Store, body: CreateDatabase) -> None:
        if not NAME_RE.fullmatch(body.name):
            raise InvalidInput(f"invalid database name {body.name!r}",
                               "use 2-42 lowercase letters, digits and '-', starting with a letter",
                               code="invalid_name")
        get_class(body.instance_class)
        parameters.validate(body.params)
        hosts = await live_hosts(s)
        zones = {h.zone for h in hosts}
        if not hosts:
            raise CapacityError("no agent is running", "start the platform with 'dbplane up'",
                                code="no_hosts")
        if body.multi_az and len(zones) < 2:
            raise CapacityError(
                f"Multi-AZ needs agents in two zones; only zone {', '.join(sorted(zones))} has one",
                "start an agent in another zone ('dbplane agent --zone b ...') or pass "
                "--no-multi-az", code="not_enough_zones")

    async def create(s: Store, spec: DatabaseSpec, op: Operation, extra: dict | None = None) -> dict:
        """Write the new database's spec, its operation (and secrets, for a restore) at once."""
        items = {keys.database_spec(spec.name): spec, keys.operation(op.id): op, **(extra or {})}
        if not await s.create_all(items):
            existing = await s.get(keys.database_spec(spec.name), DatabaseSpec)
            if existing is not None and existing.deleting:
                raise Conflict(f"database {spec.name!r} is being deleted",
                               "wait for the delete operation to finish, then create it again",
                               code="database_deleting")
            raise Conflict(f"database {spec.name!r} already exists",
                           "choose another name, or delete it first with 'dbplane db delete'",
                           code="database_exists")
        return op.model_dump()

    @app.post("/v1/databases", status_code=202)
    async def create_database(body: CreateDatabase, request: Request):
        s = store(request)
        await check_new_database(s, body)
        spec = DatabaseSpec(name=body.name, instance_class=body.instance_class,
                            multi_az=body.multi_az, replicas=body.replicas,
                            storage_gb=body.storage_gb, params=body.params,
                            version=postgres_major_version(),
                            backup=BackupSettings(enabled=body.backups,
                                                  retention_days=body.backup_retention_days),
                            allowlist=rules_for_create(body.allowlist),
                            metrics_interval=body.metrics_interval)
        op = Operation(kind="create", database=body.name, params=body.model_dump(by_alias=True))
        return await create(s, spec, op)

    @app.post("/v1/databases/restore", status_code=202)
    async def restore_database(body: RestoreDatabase, request: Request):
        """A new database from a snapshot, or from a database's backups and archived WAL at
        a point in time (like RDS's restore-db-instance-* calls)."""
        s = store(request)
        await check_new_database(s, body)
        source, secrets = await restore_plan.plan(
            s, body, lambda refs: require_key_use(request, refs, DECRYPT))   # the key policies
        spec = DatabaseSpec(name=body.name, instance_class=body.instance_class,
                            multi_az=body.multi_az, replicas=body.replicas,
                            storage_gb=body.storage_gb, params=body.params,
                            version=postgres_major_version(), restore=source,
                            backup=BackupSettings(enabled=body.backups,
                                                  retention_days=body.backup_retention_days),
                            allowlist=rules_for_create(body.allowlist),
                            metrics_interval=body.metrics_interval)
        op = Operation(kind="restore", database=body.name, params=body.model_dump(by_alias=True))
        sealed = await db_secrets.sealed_json(s, keys.secrets(body.name), secrets)
        return await create(s, spec, op, {keys.secrets(body.name): sealed})

    @app.get("/v1/databases/{name}")
    async def describe_database(name: str, request: Request):
        s = store(request)
        spec = await get_spec(s, name)
        return describe(spec, await database_snapshot(s, name))

    @app.delete("/v1/databases/{name}", status_code=202)
    async def delete_database(name: str, request: Request, final_snapshot: str | None = None):
        """Delete the database; with final_snapshot, take that snapshot first (kept until
        deleted, like RDS's final DB snapshot)."""
        s = store(request)
        spec, read = await read_spec(s, name)
        op = Operation(kind="delete", database=name, params={"final_snapshot": final_snapshot})
        if spec.deleting:
            await s.put(keys.operation(op.id), op)
            return op.model_dump()
        also, new_keys = {keys.operation(op.id): op}, ()
        if final_snapshot:
            status = await s.get(keys.database_status(name), DatabaseStatus)
            if status is None or not status.ever_available:
                raise Conflict(f"database {name} never became available: there is nothing to snapshot",
                               "delete it without --final-snapshot", code="database_not_available")
            snapshot_key = keys.backup(name, final_snapshot)
            also[snapshot_key] = await snapshot_record(s, spec, final_snapshot)
            new_keys = (snapshot_key,)
        # the snapshot, the operation and the spec marked deleting: all or nothing
        await save_spec(s, name, read, spec.model_copy(update={
            "deleting": True, "generation": spec.generation + 1,
            "final_snapshot": final_snapshot or ""}), also=also, new_keys=new_keys)
        return op.model_dump()

    @app.get("/v1/operations")
    async def list_operations(request: Request, database: str | None = None):
        ops = await store(request).list(keys.operations(), Operation)
        ops = [o for o in ops if database in (None, o.database) and visible(request, f"db/{o.database}")]
        return [o.model_dump() for o in sorted(ops, key=lambda o: o.created_at)]

    @app.get("/v1/operations/{op_id}")
    async def get_operation(op_id: str, request: Request):
        op = await store(request).get(keys.operation(op_id), Operation)
        if op is None:
            raise NotFound(f"operation {op_id!r} not found", "list operations with 'dbplane ops list'",
                           code="operation_not_found")
        return op.model_dump()

    @app.get("/v1/events")
    async def list_events(request: Request, database: str | None = None, limit: int = 100):
        prefix = keys.events(database) if database else keys.events()
        events = [e for e in await store(request).list(prefix, Event) if visible(request, f"db/{e.database}")]
        events.sort(key=lambda e: e.id)
        return [e.model_dump() for e in events[-limit:]]

    app.include_router(ha_router)     # switchover, failover, replicas, modify
    app.include_router(proxy_router)  # proxy settings and statistics
    app.include_router(kms_router)    # KMS keys: create, rotate, disable, delete
    app.include_router(backup_router)  # snapshots, backup settings, repositories
    app.include_router(audit_router)   # audit log: list, verify, retention
    app.include_router(allowlist_router)  # network allowlists
    app.include_router(iam_router)     # users, roles, policies, access keys
    app.include_router(doctor_router)  # diagnoses with evidence and fix
    app.include_router(metrics_router)  # Prometheus scrape, metric history
    app.include_router(alarm_router)    # alarms: definitions and states
    app.include_router(insights_router)  # performance insights: load, top SQL, sessions
    app.include_router(console_router)  # the web console's static files (public)
    app.state.data_root = data_root
    return app
