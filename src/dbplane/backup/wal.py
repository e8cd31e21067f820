"""WAL positions, segment file names and timeline history files: PostgreSQL's own naming,
so that what dbplane archives is what restore_command is asked for."""

from __future__ import annotations

import re
from dataclasses import dataclass

SEGMENT_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
HISTORY_RE = re.compile(r"^([0-9A-F]{8})\.history$")


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> integer position."""
    hi, _, lo = text.partition("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def segment_start(lsn: int, seg_size: int) -> int:
    return lsn - lsn % seg_size


def segment_name(tli: int, lsn: int, seg_size: int) -> str:
    """Name of the segment file holding `lsn` on timeline `tli`."""
    segno = lsn // seg_size
    per_id = 0x100000000 // seg_size
    return f"{tli:08X}{segno // per_id:08X}{segno % per_id:08X}"


def parse_segment_name(name: str, seg_size: int) -> tuple[int, int]:
    """'000000020000000000000003' -> (timeline, start lsn of the segment)."""
    m = SEGMENT_RE.match(name)
    if not m:
        raise ValueError(f"not a WAL segment name: {name!r}")
    per_id = 0x100000000 // seg_size
    segno = int(m.group(2), 16) * per_id + int(m.group(3), 16)
    return int(m.group(1), 16), segno * seg_size


def history_name(tli: int) -> str:
    return f"{tli:08X}.history"


@dataclass(frozen=True)
class Switch:
    """Timeline `tli` ended at `end` (the next timeline starts there)."""
    tli: int
    end: int


def parse_history(text: str) -> list[Switch]:
    """A timeline history file: one line per ended timeline, 'tli<TAB>lsn<TAB>reason'."""
    switches = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        switches.append(Switch(int(fields[0]), parse_lsn(fields[1])))
    return switches


def timeline_of(lsn: int, history: list[Switch], current: int) -> int:
    """Which timeline of a history (ending in `current`) holds WAL position `lsn`."""
    for switch in history:
        if lsn < switch.end:
            return switch.tli
    return current


def segment_timeline(seg_start: int, seg_size: int, history: list[Switch], current: int) -> int:
    """The timeline whose file recovery reads for a segment: where a timeline switch falls
    inside a segment, the new timeline's file holds both parts (PostgreSQL copies it at
    promotion, and the archiver streams it)."""
    return timeline_of(seg_start + seg_size - 1, history, current)


def needed_segments(start: int, end: int, seg_size: int, history: list[Switch],
                    current: int) -> list[str]:
    """Names of the segment files a recovery from `start` to `end` replays, in order."""
    names, seg = [], segment_start(start, seg_size)
    while seg <= end:
        names.append(segment_name(segment_timeline(seg, seg_size, history, current), seg, seg_size))
        seg += seg_size
    return names


def missing_segments(needed: list[str], archived: set[str]) -> list[str]:
    """Which of `needed` the archive lacks. The last one may be a .partial (the segment
    being filled when it was uploaded)."""
    missing = [n for n in needed[:-1] if n not in archived]
    if needed and needed[-1] not in archived and needed[-1] + ".partial" not in archived:
        missing.append(needed[-1])
    return missing
