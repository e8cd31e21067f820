"""Deadlocks and lock waits as PostgreSQL writes them into its log (pure: text in, records
out). A member's PostgreSQL logs to stderr, which its Patroni log holds, with the default
prefix `%m [%p] `:

    2026-11-24 10:24:52.909 UTC [27001] ERROR:  deadlock detected
    2026-11-24 10:24:52.909 UTC [27001] DETAIL:  Process 27001 waits for ShareLock on transaction 759; \
    blocked by process 27002.
    <TAB>Process 27002 waits for ShareLock on transaction 758; blocked by process 27001.
    <TAB>Process 27001: UPDATE accounts SET balance = balance + 1 WHERE id = 2
    <TAB>Process 27002: UPDATE accounts SET balance = balance + 1 WHERE id = 1
    2026-11-24 10:24:52.909 UTC [27001] CONTEXT:  while updating tuple (0,2) in relation "accounts"
    2026-11-24 10:24:52.909 UTC [27001] STATEMENT:  UPDATE accounts SET balance = balance + 1 WHERE id = 2

With log_lock_waits on, a wait longer than deadlock_timeout is logged too:

    ... [27003] LOG:  process 27003 still waiting for ShareLock on transaction 760 after 1000.123 ms
    ... [27003] DETAIL:  Process holding the lock: 27004. Wait queue: 27003.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

LINE = re.compile(r"^(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?)(?: (?P<tz>[A-Za-z+\-0-9/_]+))? "
                  r"\[(?P<pid>\d+)\] (?P<level>[A-Z]+\d?):  (?P<msg>.*)$")
WAITS = re.compile(r"Process (\d+) waits for (.+?) on (.+?); blocked by process (\d+)\.")
RUNS = re.compile(r"^Process (\d+): (.*)$")
STILL_WAITING = re.compile(r"process (\d+) (?:still waiting|acquired) for (.+?) on (.+?) after ([\d.]+) ms")
HOLDER = re.compile(r"Process(?:es)? holding the lock: ([\d, ]+)\.")


@dataclass
class Record:
    """One log message with its continuation lines."""
    time: float | None
    pid: int
    level: str
    text: str


@dataclass
class Wait:
    pid: int
    lock: str            # "ShareLock"
    on: str              # "transaction 759", "relation 16384 of database 5"
    blocked_by: int


@dataclass
class Deadlock:
    time: float | None
    victim: int                         # the process PostgreSQL cancelled
    waits: list[Wait] = field(default_factory=list)
    statements: dict[int, str] = field(default_factory=dict)   # pid -> the statement it waited in
    context: str = ""

    def cycle(self) -> str:
        """Which statement waited for which, in the order PostgreSQL found the cycle."""
        parts = []
        for w in self.waits:
            stmt = self.statements.get(w.pid, "?")
            parts.append(f"pid {w.pid} in `{short(stmt)}` waited for {w.lock} on {w.on} held by pid "
                         f"{w.blocked_by}")
        return "; ".join(parts)


@dataclass
class LockWait:
    time: float | None
    pid: int
    lock: str
    on: str
    waited_ms: float
    holders: list[int] = field(default_factory=list)
    statement: str = ""


def short(text: str, limit: int = 160) -> str:
    one = " ".join(text.split())
    return one if len(one) <= limit else one[:limit - 3] + "..."


def _time(ts: str, tz: str | None) -> float | None:
    if tz not in (None, "UTC", "GMT", "Etc/UTC", "Z"):
        return None                       # a named zone we do not resolve: age unknown
    try:
        return datetime.fromisoformat(ts).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def records(text: str) -> list[Record]:
    """PostgreSQL's messages in a log; other lines (Patroni's own) end a message."""
    out: list[Record] = []
    current: Record | None = None
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            current = Record(_time(m["ts"], m["tz"]), int(m["pid"]), m["level"], m["msg"])
            out.append(current)
        elif line.startswith("\t") and current is not None:
            current.text += "\n" + line[1:]
        else:
            current = None
    return out


def _following(recs: list[Record], i: int, pid: int, level: str, limit: int = 6) -> Record | None:
    """The next message of the same process at `level`, within a few messages."""
    for r in recs[i + 1:i + 1 + limit]:
        if r.pid == pid and r.level == level:
            return r
    return None


def deadlocks(text: str) -> list[Deadlock]:
    recs = records(text)
    out = []
    for i, r in enumerate(recs):
        if r.level != "ERROR" or not r.text.startswith("deadlock detected"):
            continue
        d = Deadlock(time=r.time, victim=r.pid)
        detail = _following(recs, i, r.pid, "DETAIL")
        if detail is not None:
            for m in WAITS.finditer(detail.text):
                d.waits.append(Wait(int(m[1]), m[2], m[3], int(m[4])))
            for line in detail.text.splitlines():
                rm = RUNS.match(line.strip())
                if rm:
                    d.statements[int(rm[1])] = rm[2]
        context = _following(recs, i, r.pid, "CONTEXT")
        if context is not None:
            d.context = context.text.splitlines()[0]
        statement = _following(recs, i, r.pid, "STATEMENT")
        if statement is not None and r.pid not in d.statements:
            d.statements[r.pid] = statement.text
        out.append(d)
    return out


def lock_waits(text: str) -> list[LockWait]:
    recs = records(text)
    out = []
    for i, r in enumerate(recs):
        m = STILL_WAITING.search(r.text) if r.level == "LOG" else None
        if not m or "still waiting" not in r.text:
            continue
        w = LockWait(time=r.time, pid=int(m[1]), lock=m[2], on=m[3], waited_ms=float(m[4]))
        detail = _following(recs, i, r.pid, "DETAIL")
        if detail is not None:
            h = HOLDER.search(detail.text)
            if h:
                w.holders = [int(x) for x in h[1].replace(" ", "").split(",") if x]
        statement = _following(recs, i, r.pid, "STATEMENT")
        if statement is not None:
            w.statement = statement.text
        out.append(w)
    return out
