"""PostgreSQL parameter validation against the server's own GUC catalog
(`postgres --describe-config`: name, context, type, min, max), before anything changes."""

from __future__ import annotations

import functools
import re
import subprocess
from dataclasses import dataclass

from .errors import InvalidInput
from .system import postgres_bin_dir

# Parameters dbplane owns: changing them would break replication, failover or the agent.
MANAGED = {"listen_addresses", "port", "unix_socket_directories", "hba_file", "ident_file",
           "data_directory", "config_file", "primary_conninfo", "primary_slot_name",
           "restore_command", "recovery_target_timeline", "synchronous_standby_names",
           "hot_standby", "wal_level", "wal_log_hints", "cluster_name"}

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
        if s is None:
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
