"""Key layout in etcd. Everything dbplane writes lives under ROOT; Patroni's
clusters live under PATRONI_NAMESPACE, one scope per database.

  /dbplane/v1/hosts/<host>                 Host          agent, under a lease
  /dbplane/v1/databases/<db>/spec          DatabaseSpec  API
  /dbplane/v1/databases/<db>/status        DatabaseStatus controller
  /dbplane/v1/members/<db>/<member>        MemberSpec    controller (placement)
  /dbplane/v1/member-status/<db>/<member>  MemberStatus  agent
  /dbplane/v1/secrets/<db>                 DatabaseSecrets controller (sealed under a KMS key:
                                           security/db_secrets.py reads and writes them)
  /dbplane/v1/secrets-next/<db>            DatabaseSecrets controller, during a credential rotation (sealed)
  /dbplane/v1/ports/<address>/<port>       member name   controller (allocation)
  /dbplane/v1/operations/<id>              Operation     API creates, controller drives
  /dbplane/v1/events/<db>/<id>             Event         controller
  /dbplane/v1/config                      PlatformConfig `dbplane up`
  /dbplane/v1/paused-by-down/<db>         marker        `dbplane down` (Patroni paused)
  /dbplane/v1/controller/leader            host name     controller, under a lease
  /dbplane/v1/proxy/ports/<db>             ProxyPorts    controller (stable endpoints)
  /dbplane/v1/proxy/limits/<db>            ProxyLimits   controller (connection budget)
  /dbplane/v1/proxy/instances/<id>         ProxyInstance proxy, under a lease
  /dbplane/v1/proxy/drain/<db>             ProxyDrain    controller, during a switchover
  /dbplane/v1/proxy/drained/<db>/<id>      operation id  proxy: no writer transaction runs
  /dbplane/v1/metrics/collectors/<host>    CollectorInstance metrics collector of a host, under a lease
  /dbplane/v1/repositories/<name>          RepositorySpec API (`dbplane up` writes `local`)
  /dbplane/v1/backups/<db>/<id>            BackupRecord  backup worker, controller (expiry)
  /dbplane/v1/archive/<db>                 ArchiveStatus backup worker
  /dbplane/v1/archive-lock/<db>            host name     backup worker streaming WAL, under a lease
  /dbplane/v1/backup-housekeeper           host name     backup worker removing deleted/expired backups
  /dbplane/v1/archive-removal/<archive-id> repositories  controller (database deleted), backup worker
  /dbplane/v1/drills/<db>/<id>             DrillRecord   controller, backup worker (checks)
  /dbplane/v1/restore-failed/<db>          message       restore bootstrap command that failed
  /dbplane/v1/kms/keys/<key-id>            KmsKey        API, controller (rotation, deletion)
  /dbplane/v1/iam/{users,roles}/<name>     Principal     API (`dbplane up` writes user admin)
  /dbplane/v1/iam/policies/<name>          ManagedPolicy API (`dbplane up` writes the built-in ones)
  /dbplane/v1/iam/access-keys/<key-id>     AccessKey     API (secret sealed under a KMS key)
  /dbplane/v1/iam/db-passwords/<db>/<user> SealedSecret  proxy: the password of a dbplane_iam user
  /dbplane/v1/audit/head                   AuditHead     any audit writer (signed chain head)
  /dbplane/v1/audit/entries/<seq>          audit entry   any audit writer (hash chain)
  /dbplane/v1/audit/checkpoints/<seq>      Checkpoint    any audit writer (signed, every 100 / 60 s)
  /dbplane/v1/audit/anchor                 Anchor        any audit writer (signed, after trimming)
  /dbplane/v1/audit/settings               AuditSettings API (retention)
  /dbplane/v1/alarms/<name>                AlarmSpec     API (the controller writes a database's defaults)
  /dbplane/v1/alarm-state/<name>           AlarmState    controller (the alarm evaluator): state and history
  /dbplane/v1/alarm-deleted/<name>         DeletedDefault API: a default alarm the user deleted, not remade
  /dbplane-patroni/<db>/...                Patroni's own keys (leader, sync, members, ...)
"""

ROOT = "/dbplane/v1/"
PATRONI_NAMESPACE = "/dbplane-patroni"


def hosts() -> str:
    return ROOT + "hosts/"


def host(name: str) -> str:
    return f"{ROOT}hosts/{name}"


def databases() -> str:
    return ROOT + "databases/"


def database_spec(db: str) -> str:
    return f"{ROOT}databases/{db}/spec"


def database_status(db: str) -> str:
    return f"{ROOT}databases/{db}/status"


def members(db: str = "") -> str:
    return f"{ROOT}members/{db}/" if db else ROOT + "members/"


def member(db: str, name: str) -> str:
    return f"{ROOT}members/{db}/{name}"


def member_statuses(db: str = "") -> str:
    return f"{ROOT}member-status/{db}/" if db else ROOT + "member-status/"


def member_status(db: str, name: str) -> str:
    return f"{ROOT}member-status/{db}/{name}"


def secrets(db: str) -> str:
    return f"{ROOT}secrets/{db}"


def secrets_next(db: str) -> str:
    return f"{ROOT}secrets-next/{db}"


def ports(address: str = "") -> str:
    return f"{ROOT}ports/{address}/" if address else ROOT + "ports/"


def port(address: str, number: int) -> str:
    return f"{ROOT}ports/{address}/{number}"


def operations() -> str:
    return ROOT + "operations/"


def operation(op_id: str) -> str:
    return f"{ROOT}operations/{op_id}"


def events(db: str = "") -> str:
    return f"{ROOT}events/{db}/" if db else ROOT + "events/"


def event(db: str, event_id: str) -> str:
    return f"{ROOT}events/{db}/{event_id}"


def paused_by_down(db: str = "") -> str:
    return f"{ROOT}paused-by-down/{db}"


def config() -> str:
    return ROOT + "config"


def controller_leader() -> str:
    return ROOT + "controller/leader"


def patroni_scope(db: str) -> str:
    return f"{PATRONI_NAMESPACE}/{db}/"


def proxy_root() -> str:
    return ROOT + "proxy/"


def proxy_ports(db: str = "") -> str:
    return f"{ROOT}proxy/ports/{db}"


def proxy_limits(db: str = "") -> str:
    return f"{ROOT}proxy/limits/{db}"


def proxy_instances() -> str:
    return ROOT + "proxy/instances/"


def proxy_instance(proxy_id: str) -> str:
    return f"{ROOT}proxy/instances/{proxy_id}"


def proxy_drain(db: str = "") -> str:
    return f"{ROOT}proxy/drain/{db}"


def proxy_drained(db: str, proxy_id: str = "") -> str:
    return f"{ROOT}proxy/drained/{db}/{proxy_id}"


def metrics_collectors() -> str:
    return ROOT + "metrics/collectors/"


def metrics_collector(host: str) -> str:
    return f"{ROOT}metrics/collectors/{host}"


def repositories() -> str:
    return ROOT + "repositories/"


def repository(name: str) -> str:
    return f"{ROOT}repositories/{name}"


def backups(db: str = "") -> str:
    return f"{ROOT}backups/{db}/" if db else ROOT + "backups/"


def backup(db: str, backup_id: str) -> str:
    return f"{ROOT}backups/{db}/{backup_id}"


def archive_status(db: str = "") -> str:
    return f"{ROOT}archive/{db}"


def archive_lock(db: str) -> str:
    return f"{ROOT}archive-lock/{db}"


def kms_keys() -> str:
    return ROOT + "kms/keys/"


def kms_key(key_id: str) -> str:
    return f"{ROOT}kms/keys/{key_id}"


def backup_housekeeper() -> str:
    return ROOT + "backup-housekeeper"


def restore_failed(db: str) -> str:
    return f"{ROOT}restore-failed/{db}"


def drills(db: str = "") -> str:
    return f"{ROOT}drills/{db}/" if db else ROOT + "drills/"


def drill(db: str, drill_id: str) -> str:
    return f"{ROOT}drills/{db}/{drill_id}"


def archive_removals() -> str:
    return ROOT + "archive-removal/"


def archive_removal(archive_id: str) -> str:
    return f"{ROOT}archive-removal/{archive_id}"


# identity and access (security/iam.py)

def iam_principals(kind: str) -> str:
    return f"{ROOT}iam/{kind}s/"


def iam_principal(kind: str, name: str) -> str:
    return f"{ROOT}iam/{kind}s/{name}"


def iam_policies() -> str:
    return ROOT + "iam/policies/"


def iam_policy(name: str) -> str:
    return f"{ROOT}iam/policies/{name}"


def iam_access_keys() -> str:
    return ROOT + "iam/access-keys/"


def iam_access_key(key_id: str) -> str:
    return f"{ROOT}iam/access-keys/{key_id}"


# audit log

def audit_head() -> str:
    return ROOT + "audit/head"


def audit_anchor() -> str:
    return ROOT + "audit/anchor"


def audit_settings() -> str:
    return ROOT + "audit/settings"


def audit_entry(seq: int) -> str:
    """Zero-padded so that key order is sequence order."""
    return f"{ROOT}audit/entries/{seq:012d}"


def audit_checkpoint(seq: int) -> str:
    return f"{ROOT}audit/checkpoints/{seq:012d}"


def iam_db_passwords(db: str) -> str:
    return f"{ROOT}iam/db-passwords/{db}/"


def iam_db_password(db: str, user: str) -> str:
    return f"{ROOT}iam/db-passwords/{db}/{user}"


def alarms() -> str:
    return ROOT + "alarms/"


def alarm(name: str) -> str:
    return f"{ROOT}alarms/{name}"


def alarm_states() -> str:
    return ROOT + "alarm-state/"


def alarm_state(name: str) -> str:
    return f"{ROOT}alarm-state/{name}"


def alarm_deleted_defaults() -> str:
    return ROOT + "alarm-deleted/"


def alarm_deleted_default(name: str) -> str:
    return f"{ROOT}alarm-deleted/{name}"
