"""Identify and stop a PostgreSQL postmaster by its data directory (postmaster.pid), for
when Patroni is gone but its postgres is not (Patroni killed, member being deleted)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil

from ..process import wait_gone


def postmaster_pid(data_dir: Path) -> int | None:
    try:
        pid = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
        proc = psutil.Process(pid)
        if "postgres" not in proc.name():
            return None
        return pid
    except (OSError, ValueError, IndexError, psutil.Error):
        return None


def stop_postgres(data_dir: Path, timeout: float = 30.0) -> None:
    """Fast shutdown (SIGINT), then immediate (SIGQUIT), then SIGKILL."""
    pid = postmaster_pid(data_dir)
    if pid is None:
        return
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_gone(pid, wait):
            return
