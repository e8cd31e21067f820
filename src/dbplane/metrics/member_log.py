"""A member's log tail and disk space, read on the member's own host for the collector's
`GET /log?member=NAME[&bytes=N]` (server.py); the API's doctor and performance insights ask
for them through remote.member_logs.

PostgreSQL writes to stderr, which the member's Patroni log holds:
`<root>/hosts/<host>/members/<member>/patroni.log`. Only members under this host's own
members directory are served, by a name of the shape dbplane gives members (`orders-1`), so
that no parameter can reach another file.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from urllib.parse import parse_qsl

from dbplane.models import NAME_RE
from dbplane.paths import Layout

DEFAULT_TAIL_BYTES = 4 * 2**20       # the doctor's tail: deadlocks in the last 4 MiB
MAX_TAIL_BYTES = 4 * 2**20
# <database name>-<index>: a database name as models.NAME_RE allows it, then the member index
MEMBER_RE = re.compile(NAME_RE.pattern.removeprefix("^").removesuffix("$") + r"-[0-9]{1,9}")


class UnknownMember(LookupError):
    pass


def read_tail(path: Path, max_bytes: int) -> str:
    """The last `max_bytes` of a file as text ("" when it cannot be read)."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def parse_log_query(query: str) -> tuple[str, int]:
    """/log's parameters: member (required, a member's name), bytes (1 or more; at most
    MAX_TAIL_BYTES are returned)."""
    params = dict(parse_qsl(query, keep_blank_values=True))
    member = params.get("member", "")
    if not member:
        raise ValueError("member is required")
    if not MEMBER_RE.fullmatch(member):
        raise ValueError("member must be a member's name, such as orders-1")
    raw = params.get("bytes", "") or str(DEFAULT_TAIL_BYTES)
    if not re.fullmatch(r"[0-9]{1,15}", raw) or int(raw) < 1:
        raise ValueError("bytes must be a positive integer")
    return member, min(int(raw), MAX_TAIL_BYTES)


def member_dir(root: Path, host: str, member: str) -> Path:
    """The member's directory under this host's members directory; UnknownMember when the
    name is not a member's or no such directory is there."""
    members = Layout(root).host_dir(host) / "members"
    path = members / member
    if not MEMBER_RE.fullmatch(member) or path.is_symlink() or not path.is_dir() \
            or path.resolve().parent != members.resolve():
        raise UnknownMember(f"no member {member} on host {host}")
    return path


def read(root: Path, host: str, member: str, max_bytes: int) -> dict:
    """{"host", "member", "text": the log's last max_bytes, "disk": {"path", "total", "free"}
    of the member's data directory, or None when its file system cannot be read}."""
    mdir = member_dir(root, host, member)
    try:
        usage = shutil.disk_usage(mdir)
        disk = {"path": str(mdir / "data"), "total": usage.total, "free": usage.free}
    except OSError:
        disk = None
    return {"host": host, "member": member, "text": read_tail(mdir / "patroni.log", max_bytes), "disk": disk}
