"""Take over the data directory of a stopped member on this host (`replica promote`):
the new member of the promoted database starts Patroni on the replica's data."""

from __future__ import annotations

import os
from pathlib import Path

from .. import process
from .postgres import postmaster_pid


def take_over(source_dir: Path, member_dir: Path) -> str | None:
    """Move source_dir/data to member_dir/data, once. Returns what it is waiting for, or
    None when the data is in place."""
    target = member_dir / "data"
    if target.exists():
        return None
    source = source_dir / "data"
    if not source.exists():
        raise FileNotFoundError(f"no data directory to take over in {source_dir}")
    if process.running_pid(source_dir / "patroni.pid") or postmaster_pid(source):
        return f"waiting for {source_dir.name} to stop"
    os.rename(source, target)                 # same file system: atomic, keeps ownership
    for name in ("standby.signal", "recovery.signal"):
        (target / name).unlink(missing_ok=True)   # it leaves recovery as a new primary
    return None
