"""What every benchmark reports about the machine it ran on, so that results in
docs/benchmarks.md say where they come from."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def first_line(argv: list[str]) -> str:
    """The first line a command prints (e.g. `postgres --version`), or '?'."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.splitlines()[0].strip()
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


def commit() -> str:
    return first_line(["git", "-C", str(Path(__file__).resolve().parent.parent), "describe", "--always",
                       "--dirty"])


def machine(versions: dict[str, str]) -> dict:
    """CPU, cores, memory, kernel and Python, then `versions`, then the load average."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem_kb = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                      if ln.startswith("MemTotal")))
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(mem_kb / 1024 / 1024, 1),
            "kernel": platform.release(), "python": platform.python_version(), **versions,
            "loadavg_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg())}
