"""The data root and what lives in it. Every command finds the running platform from it.

  <root>/platform.json          ports and URLs of this platform (written by `dbplane up`)
  <root>/etcd/                  etcd's data
  <root>/run/<component>.pid    pidfiles of etcd, controller, api and agents
  <root>/logs/<component>.log
  <root>/hosts/<host>/members/<member>/   one Patroni + PostgreSQL node (service account)
  <root>/secrets/<db>.pgpass    the admin user's password, mode 0600
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel

from .errors import PlatformNotRunning
from .system import is_root


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit).absolute()
    if os.environ.get("DBPLANE_HOME"):
        return Path(os.environ["DBPLANE_HOME"]).absolute()
    if is_root():
        return Path("/var/lib/dbplane")
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "dbplane"


class PlatformInfo(BaseModel):
    """How to reach the platform that runs from a data root."""
    etcd_url: str
    api_url: str
    etcd_client_port: int
    etcd_peer_port: int
    api_port: int
    member_port_start: int
    member_port_end: int
    pg_bin_dir: str = ""               # the PostgreSQL binaries every member of it runs ("" = embedded)


class Layout:
    def __init__(self, root: Path):
        self.root = root

    @property
    def platform_file(self) -> Path:
        return self.root / "platform.json"

    @property
    def etcd_dir(self) -> Path:
        return self.root / "etcd"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def secrets_dir(self) -> Path:
        return self.root / "secrets"

    def pidfile(self, component: str) -> Path:
        return self.run_dir / f"{component}.pid"

    def logfile(self, component: str) -> Path:
        return self.logs_dir / f"{component}.log"

    def host_dir(self, host: str) -> Path:
        return self.root / "hosts" / host

    def pgpass(self, db: str) -> Path:
        return self.secrets_dir / f"{db}.pgpass"

    def read_platform(self) -> PlatformInfo:
        try:
            return PlatformInfo.model_validate_json(self.platform_file.read_text())
        except FileNotFoundError:
            raise PlatformNotRunning(
                f"no dbplane platform in {self.root}",
                "start one with 'dbplane up', or pick another with --data-dir or DBPLANE_HOME"
            ) from None

    def write_platform(self, info: PlatformInfo) -> None:
        write_private(self.platform_file, info.model_dump_json(indent=2), mode=0o644)


def write_private(path: Path, text: str, mode: int = 0o600, owner: tuple[int, int] | None = None
                  ) -> None:
    """Write atomically (temp file, fsync, rename) with mode set before any byte lands."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        if owner:
            os.fchown(fd, *owner)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())
