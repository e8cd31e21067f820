"""PostgreSQL parameter validation against the server's own GUC catalog
(`postgres --describe-config`: name, context, type, min, max), before anything changes."""

from __future__ import annotations

import functools
import re
import subprocess
from dataclasses import dataclass

from .classes import get_class
from .errors import InvalidInput
from .models import DatabaseSpec
from .system import postgres_bin_dir, postgres_major_version

# Parameters dbplane owns: changing them would break replication, failover or the agent.
MANAGED = {"listen_addresses", "port", "unix_socket_directories", "hba_file", "ident_file",
           "data_directory", "config_file", "primary_conninfo", "primary_slot_name",
           "restore_command", "recovery_target_timeline", "synchronous_standby_names",
           "hot_standby", "wal_level", "wal_log_hints", "cluster_name"}

# dbplane's own database parameters (like RDS's rds.force_ssl): set with --param like the
# others, enforced by dbplane, never passed to PostgreSQL. name -> (type, default)
DBPLANE_PARAMETERS = {"require_tls": ("BOOLEAN", "on")}

_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(B|kB|MB|GB|TB|us|ms|s|min|h|d)?\s*$")
_BOOL = {"on", "off", "true", "false", "yes", "no", "1", "0", "t", "f", "y", "n"}


@dataclass(frozen=True)
class Setting:
    name: str
    context: str
    type: str
    min: str
    max: str

    @property
    def needs_restart(self) -> bool:
        return self.context == "postmaster"


@functools.cache
def catalog() -> dict[str, Setting]:
    out = subprocess.run([f"{postgres_bin_dir()}/postgres", "--describe-config"],
                         capture_output=True, text=True, check=True).stdout
    settings = {}
    for line in out.splitlines():
        f = line.split("\t")
        if len(f) >= 7:
            settings[f[0]] = Setting(name=f[0], context=f[1], type=f[3], min=f[5], max=f[6])
    return settings


def parse_params(pairs: list[str]) -> dict[str, str]:
    """`k=v` strings from the CLI into a dict; errors name the bad pair."""
    params = {}
    for pair in pairs:
        if "=" not in pair or not pair.split("=", 1)[0].strip():
            raise InvalidInput(f"invalid --param {pair!r}", "write it as name=value, "
                               "e.g. --param work_mem=8MB", code="invalid_parameter")
        k, v = pair.split("=", 1)
        params[k.strip()] = v.strip()
    return params


def validate(params: dict[str, str]) -> None:
    """Check every parameter; report all problems at once."""
    problems = []
    cat = catalog()
    for name, value in params.items():
        s = cat.get(name)
        if name in DBPLANE_PARAMETERS:
            if value.lower() not in _BOOL:
                problems.append(f"{name} must be on or off, not {value!r}")
        elif s is None:
            problems.append(f"unknown parameter {name!r}")
        elif name in MANAGED or s.context == "internal":
            problems.append(f"{name} is managed by dbplane and cannot be set")
        elif s.type == "BOOLEAN" and value.lower() not in _BOOL:
            problems.append(f"{name} must be on or off, not {value!r}")
        elif s.type in ("INTEGER", "REAL"):
            m = _NUMBER.match(value)
            if not m:
                problems.append(f"{name} must be a number (with an optional unit), not {value!r}")
            elif m.group(2) is None and s.min and s.max:
                number = float(m.group(1))
                if s.type == "INTEGER" and not m.group(1).lstrip("-").isdigit():
                    problems.append(f"{name} must be an integer, not {value!r}")
                elif not float(s.min) <= number <= float(s.max):
                    problems.append(f"{name}={value} is out of range {s.min}..{s.max}")
    if problems:
        raise InvalidInput("; ".join(problems),
                           "see the names and ranges in PostgreSQL's pg_settings view",
                           code="invalid_parameter")


# -- comparing a wanted value with what a running server reports in pg_settings ----------

_MEMORY = {"B": 1, "kB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_TIME = {"us": 0.001, "ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}
_UNIT = re.compile(r"^(\d*)\s*([A-Za-z]+)$")

# A standby must run with at least the primary's value of these; Patroni keeps the higher
# one on replicas, so a replica above the wanted value is as it should be.
REPLICA_AT_LEAST = {"max_connections", "max_worker_processes", "max_wal_senders",
                    "max_prepared_transactions", "max_locks_per_transaction"}


def _unit_factor(unit: str | None) -> float | None:
    """pg_settings.unit ('8kB', 'ms', 'MB', None) as a multiple of bytes or milliseconds."""
    if not unit:
        return None
    m = _UNIT.match(unit)
    if not m:
        return None
    base = _MEMORY.get(m.group(2)) or _TIME.get(m.group(2))
    return None if base is None else base * int(m.group(1) or 1)


def _number(value: str, unit: str | None) -> float | None:
    m = _NUMBER.match(value)
    if not m:
        return None
    number, suffix = float(m.group(1)), m.group(2)
    factor = (_MEMORY.get(suffix) or _TIME.get(suffix)) if suffix else _unit_factor(unit)
    return number * (factor or 1)


def _as_bool(value: str) -> bool:
    return value.strip().lower() in ("on", "true", "yes", "1", "t", "y")


def same_value(wanted: str, setting: str, unit: str | None, vartype: str) -> bool:
    """Whether a server reporting (setting, unit) in pg_settings runs `wanted`."""
    if vartype == "bool":
        return _as_bool(wanted) == _as_bool(setting)
    if vartype in ("integer", "real"):
        a, b = _number(wanted, unit), _number(setting, unit)
        if a is None or b is None:
            return wanted.strip() == setting.strip()
        return abs(a - b) <= max(_unit_factor(unit) or 0, 1e-9 * max(abs(a), abs(b)))
    return wanted.strip().strip("'").lower() == setting.strip().lower()


def at_least(wanted: str, setting: str, unit: str | None) -> bool:
    a, b = _number(wanted, unit), _number(setting, unit)
    return a is not None and b is not None and b >= a


BASE_PARAMETERS = {
    "wal_level": "replica",
    "hot_standby": "on",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "wal_keep_size": "256MB",
    "wal_log_hints": "on",                  # pg_rewind after failover
    "password_encryption": "scram-sha-256",
    "unix_socket_directories": "",          # TCP only: no socket path length limits
    "shared_preload_libraries": "pg_stat_statements",
    "track_io_timing": "on",
    # the doctor's evidence (docs/doctor.md): lock waits past deadlock_timeout and replay
    # waiting for conflicting standby queries are logged, with the statements
    "log_lock_waits": "on",
    "log_recovery_conflict_waits": "on",
}


def postgres_parameters(spec: DatabaseSpec) -> dict[str, str]:
    """Effective cluster-wide parameters: base, then instance class, then user --param."""
    return {**BASE_PARAMETERS, **engine_parameters(), **get_class(spec.instance_class).settings,
            **{k: v for k, v in spec.params.items() if k not in DBPLANE_PARAMETERS}}


def require_tls(spec: DatabaseSpec) -> bool:
    """Whether the proxy refuses this database's plaintext clients (on unless turned off)."""
    return _as_bool(spec.params.get("require_tls", DBPLANE_PARAMETERS["require_tls"][1]))


@functools.cache
def engine_parameters() -> dict[str, str]:
    """Settings that depend on the PostgreSQL version: WAL summaries (17+) make
    incremental base backups possible."""
    return {"summarize_wal": "on"} if int(postgres_major_version()) >= 17 else {}
