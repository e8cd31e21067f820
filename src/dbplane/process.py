"""One supervisor for every process dbplane starts: start detached with a pidfile,
identify by pid + start time (a recycled pid is not ours), stop with escalation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class RunAs:
    """Drop to this uid/gid in the child (used when dbplane runs as root)."""
    uid: int
    gid: int


def start(argv: list[str], pidfile: Path, logfile: Path, *, env: dict | None = None,
          cwd: str | None = None, run_as: RunAs | None = None) -> int:
    """Start argv detached (own session, survives its parent) and record it in pidfile."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    # user/group/extra_groups switch identity in the forked child without running Python
    # there (preexec_fn is unsafe in a process with threads, such as gRPC's)
    ids = {"user": run_as.uid, "group": run_as.gid, "extra_groups": []} if run_as else {}
    with open(logfile, "ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, cwd=cwd, start_new_session=True, **ids)
    record = {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(),
              "argv": argv}
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    tmp = pidfile.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, pidfile)
    return proc.pid


def running_pid(pidfile: Path) -> int | None:
    """The pid recorded in pidfile if that very process is still alive, else None."""
    try:
        record = json.loads(pidfile.read_text())
        p = psutil.Process(record["pid"])
        if abs(p.create_time() - record["create_time"]) > 0.05 or p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p.pid
    except (OSError, ValueError, KeyError, psutil.Error):
        return None


def reap_children() -> None:
    """Collect exited children so they do not linger as zombies."""
    try:
        while True:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
    except ChildProcessError:
        return


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap_children()
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


def stop(pidfile: Path, timeout: float = 30.0, sig: int = signal.SIGTERM) -> bool:
    """Stop the process in pidfile: sig, then SIGKILL after timeout. True if it was running."""
    pid = running_pid(pidfile)
    if pid is None:
        pidfile.unlink(missing_ok=True)
        return False
    try:
        os.kill(pid, sig)
        if not wait_gone(pid, timeout):
            os.kill(pid, signal.SIGKILL)
            wait_gone(pid, 5)
    except ProcessLookupError:
        pass
    pidfile.unlink(missing_ok=True)
    return True
