"""Host and member process measurements with psutil (CPU, memory, disk space and I/O)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import psutil

from dbplane.metrics.catalog import Sample

# block devices worth a series: not loop devices, RAM disks or device-mapper internals
SKIP_DEVICES = re.compile(r"^(loop|ram|zram|sr|fd)\d*")

DISK_COUNTERS = (("read_bytes", "dbplane_host_disk_read_bytes_total", 1),
                 ("write_bytes", "dbplane_host_disk_written_bytes_total", 1),
                 ("read_count", "dbplane_host_disk_reads_total", 1),
                 ("write_count", "dbplane_host_disk_writes_total", 1),
                 ("busy_time", "dbplane_host_disk_io_seconds_total", 1000))


def host_samples(labels: Mapping[str, str], data_root: Path, now: float) -> list[Sample]:
    """The host's CPU (busy share since the previous call), memory, the data root's file
    system and every block device's I/O counters."""
    out = [Sample("dbplane_host_cpu_usage_ratio", dict(labels), psutil.cpu_percent(interval=None) / 100, now)]
    mem = psutil.virtual_memory()
    out.append(Sample("dbplane_host_memory_total_bytes", dict(labels), float(mem.total), now))
    out.append(Sample("dbplane_host_memory_available_bytes", dict(labels), float(mem.available), now))
    try:
        disk = psutil.disk_usage(str(data_root))
        out.append(Sample("dbplane_host_disk_total_bytes", dict(labels), float(disk.total), now))
        out.append(Sample("dbplane_host_disk_free_bytes", dict(labels), float(disk.free), now))
    except OSError:
        pass
    out += disk_io_samples(labels, psutil.disk_io_counters(perdisk=True) or {}, now)
    return out


def disk_io_samples(labels: Mapping[str, str], counters: Mapping[str, object], now: float) -> list[Sample]:
    out = []
    for device, c in sorted(counters.items()):
        if SKIP_DEVICES.match(device):
            continue
        for attr, metric, divisor in DISK_COUNTERS:
            value = getattr(c, attr, None)
            if value is not None:
                out.append(Sample(metric, {**labels, "device": device}, float(value) / divisor, now))
    return out


def postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def process_samples(data_dir: Path, labels: Mapping[str, str], now: float) -> list[Sample]:
    """CPU seconds and resident memory of the member's PostgreSQL: the postmaster, its reaped
    children (cpu_times' children_*) and its live children. Nothing when it is not running."""
    pid = postmaster_pid(data_dir)
    if pid is None:
        return []
    try:
        pm = psutil.Process(pid)
        with pm.oneshot():
            t = pm.cpu_times()
            cpu = t.user + t.system + t.children_user + t.children_system
            rss = pm.memory_info().rss
        for child in pm.children():
            try:
                with child.oneshot():
                    ct = child.cpu_times()
                    cpu += ct.user + ct.system
                    rss += child.memory_info().rss
            except psutil.Error:
                pass                              # exited meanwhile: its time is in children_*
    except psutil.Error:
        return []
    return [Sample("dbplane_member_cpu_seconds_total", dict(labels), cpu, now),
            Sample("dbplane_member_resident_memory_bytes", dict(labels), float(rss), now)]
