"""The audit log (like AWS CloudTrail): every API call and every security event (login
failure, refused token, allowlist refusal, key use) with who, what, resource, source,
result and time, kept in etcd as a signed hash chain (security/audit_chain.py). See
docs/security-audit.md.

`record()` is cheap and never raises: it queues the entry and returns. One writer per Store
appends the queue in one etcd transaction per batch, FLUSH_DELAY after the first queued
entry, and on `flush()` at shutdown. Writers in many processes on many hosts serialise by
compare-and-swap of the chain head: a writer that loses re-reads the head and re-chains.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import random
import socket
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import DbplaneError, InvalidInput
from ..models import PlatformConfig
from ..store import Store, keys
from . import kms
from .audit_chain import (
    Anchor,
    AuditHead,
    AuditSettings,
    ChainWalk,
    Checkpoint,
    Tampered,
    canonical,
    seal,
    sign,
    signed,
    signing_key,
)

log = logging.getLogger(__name__)

FLUSH_DELAY = 0.5          # seconds an entry may wait for others to share its transaction
MAX_BATCH = 100            # entries per transaction (etcd allows 128 operations in one)
MAX_PENDING = 10_000       # entries queued while etcd is unreachable; the oldest are dropped
MAX_ATTEMPTS = 50          # compare-and-swap retries of one batch against other writers
PAGE = 500                 # entries per etcd read
MAX_SCAN = 20_000          # entries one list request reads before it returns a next_token
CLOCK_SKEW = 300.0         # hosts' clocks and batching: list --since reads this far past
TRIM_INTERVAL = 60.0       # a writer trims at most this often
KEY_RETRY = 60.0           # a writer without the signing key looks for it again this often
RETENTION_DAYS = (1, 3650)
MAX_ENTRIES = (100, 1_000_000)
DAY = 86400.0
LIMITS = {"principal": 256, "action": 256, "resource": 1024, "source": 256, "code": 128,
          "detail": 2048}
HOST = socket.gethostname()


class AuditError(DbplaneError):
    code = "audit_error"
    status = 503


# -- recording ------------------------------------------------------------------------------

async def record(store: Store, *, principal: str | None, action: str, resource: str, source: str,
                 result: str, detail: str = "", code: str = "") -> None:
    """Record one security event (result: allowed, denied or error). Never raises; the
    entry reaches etcd within about FLUSH_DELAY."""
    _submit(store, kind="event", principal=principal, action=action, resource=resource,
            source=source, result=result, status=None, code=code, detail=detail)


async def record_call(store: Store, *, principal: str | None, action: str, resource: str,
                      source: str, result: str, status: int, code: str = "") -> None:
    """Record one API call with its HTTP status (httpapi/audit.py). Never raises."""
    _submit(store, kind="api", principal=principal, action=action, resource=resource,
            source=source, result=result, status=status, code=code, detail="")


async def record_key_use(store: Store, principal: str, source: str) -> None:
    """One entry per KMS key and operation used by this process since the last call, with
    the count (a backup encrypts a data key per object: one entry each would flood)."""
    for (operation, key_id), count in kms.drain_key_use().items():
        await record(store, principal=principal, action=f"kms:{operation}", resource=f"key/{key_id}",
                     source=source, result="allowed", detail=f"{count} time(s)")


async def flush(store: Store) -> None:
    """Write what is queued now (call before closing the store). Never raises."""
    writer = _writers.get(store)
    if writer is not None:
        try:
            await writer.flush()
        except Exception as e:
            log.warning("audit log: %d entries could not be written at shutdown (%s)",
                        len(writer.pending), e)


def _submit(store: Store, **fields: Any) -> None:
    try:
        event = {"time": time.time(), "host": HOST, **fields}
        for name, limit in LIMITS.items():
            if event[name] is not None:
                event[name] = str(event[name])[:limit]
        writer = _writers.get(store)
        if writer is None:
            writer = _writers[store] = _Writer(store)
        writer.add(event)
    except Exception as e:      # the caller's work matters more than its audit entry
        log.warning("audit log: could not queue an entry (%s: %s)", type(e).__name__, e)


class _Writer:
    """The queue of one Store and the task that appends it."""

    def __init__(self, store: Store):
        self.store = store
        self.pending: list[dict[str, Any]] = []
        self.transactions = 0            # appends written, to measure the log's cost
        self.dropped = 0
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._key: bytes | None = None
        self._key_tried = -KEY_RETRY
        self._trimmed_at = -TRIM_INTERVAL

    def add(self, event: dict[str, Any]) -> None:
        if len(self.pending) >= MAX_PENDING:     # drop the newest: a batch in flight is the oldest
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning("audit log: %d entries queued (etcd slow or unreachable, or a burst "
                            "faster than it takes them); %d dropped so far", MAX_PENDING, self.dropped)
            return
        self.pending.append(event)
        if len(self.pending) >= MAX_BATCH:
            self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        delay = FLUSH_DELAY
        while self.pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            try:    # what is queued now; what arrives meanwhile waits for the next batch
                await self.flush(len(self.pending))
                delay = FLUSH_DELAY
            except Exception as e:        # etcd unreachable: keep the entries, retry later
                log.warning("audit log: %d entries not written yet (%s); retrying",
                            len(self.pending), e)
                delay = min(delay * 2, 10.0)

    async def flush(self, count: int | None = None) -> None:
        """Write the oldest `count` queued entries (all by default), MAX_BATCH at a time."""
        async with self._lock:
            left = len(self.pending) if count is None else count
            while left > 0 and self.pending:
                batch = self.pending[:min(MAX_BATCH, left)]
                await append(self.store, batch, await self._signing_key())
                self.transactions += 1
                del self.pending[:len(batch)]
                left -= len(batch)
            if self._key and time.monotonic() - self._trimmed_at >= TRIM_INTERVAL:
                self._trimmed_at = time.monotonic()
                try:
                    await trim(self.store, self._key)
                except (Tampered, DbplaneError) as e:
                    log.warning("audit log: not trimming (%s)", e)

    async def _signing_key(self) -> bytes | None:
        if self._key is None and time.monotonic() - self._key_tried >= KEY_RETRY:
            self._key_tried = time.monotonic()
            try:
                self._key = await load_signing_key(self.store)
            except DbplaneError as e:
                log.warning("audit log: entries are chained but not signed: %s", e)
        return self._key


_writers: weakref.WeakKeyDictionary[Store, _Writer] = weakref.WeakKeyDictionary()


def transactions(store: Store) -> int:
    """etcd transactions this process wrote for the log through `store` (for measuring)."""
    writer = _writers.get(store)
    return writer.transactions if writer else 0


async def load_signing_key(store: Store) -> bytes:
    """The log's HMAC key, from the KMS root key named in the platform config."""
    config = await store.get(keys.config(), PlatformConfig) or PlatformConfig()
    return signing_key(kms.load_root_key(config.kms_root_file))


# -- the chain in etcd ------------------------------------------------------------------------

async def append(store: Store, events: list[dict[str, Any]], key: bytes | None) -> AuditHead:
    """Chain events after the current head and write them, the head (and a checkpoint when
    due) in one transaction that succeeds only if the head is unchanged."""
    for attempt in range(MAX_ATTEMPTS):
        raw = await store.get_raw(keys.audit_head())
        head = AuditHead.model_validate_json(raw) if raw else AuditHead()
        docs, new_head, checkpoint = seal(events, head, _blessing(key, head), time.time())
        items: dict[str, Any] = {keys.audit_entry(d["seq"]): canonical(d) for d in docs}
        if checkpoint is not None:
            items[keys.audit_checkpoint(checkpoint.seq)] = checkpoint
        items[keys.audit_head()] = new_head
        if await store.commit_if(keys.audit_head(), raw, items):
            return new_head
        await asyncio.sleep(random.uniform(0, 0.01 * min(attempt + 1, 20)))   # another writer won
    raise AuditError(f"the audit log head kept changing under {MAX_ATTEMPTS} attempts",
                     "too many writers at once; the entries stay queued and are retried",
                     code="audit_busy")


_warned_unsigned = -TRIM_INTERVAL


def _blessing(key: bytes | None, head: AuditHead) -> bytes | None:
    """The key to sign the new head with: none when the current head is not signed by it.
    Signing over a head nobody vouches for would bless a rewritten chain, so the log goes
    on hash-chained but unsigned, and verify keeps failing, until an operator looks."""
    global _warned_unsigned
    if key is None or head.seq == 0 or signed(key, head):
        return key
    if time.monotonic() - _warned_unsigned >= TRIM_INTERVAL:
        _warned_unsigned = time.monotonic()
        log.warning("audit log: the chain head (entry %d) has no valid signature; appending "
                    "without signing. Run 'dbplane audit verify'", head.seq)
    return None


async def _parsed(store: Store, key: str, model: type[BaseModel], what: str):
    raw = await store.get_raw(key)
    if raw is None:
        return raw, None
    try:
        return raw, model.model_validate_json(raw)
    except ValidationError:
        raise Tampered(0, None, f"the {what} record is not readable (changed in etcd)") from None


async def _pages(store: Store, first: int, last: int, checkpoints: dict[int, Checkpoint] | None = None
                 ) -> AsyncIterator[tuple[int, bytes]]:
    """(seq, stored value) of entries first..last in order, PAGE at a time; with a dict,
    fills it with the checkpoints of each page before yielding the page's entries."""
    for lo in range(first, last + 1, PAGE):
        hi = min(lo + PAGE, last + 1)
        if checkpoints is not None:
            for k, raw in (await store.get_range(keys.audit_checkpoint(lo),
                                                 keys.audit_checkpoint(hi))).items():
                seq = _seq(k)
                try:
                    cp = Checkpoint.model_validate_json(raw)
                except ValidationError:
                    raise Tampered(seq, None, "its checkpoint is not readable (changed in etcd)") from None
                if cp.seq != seq:
                    raise Tampered(seq, None, f"its checkpoint was moved here from entry {cp.seq}")
                checkpoints[seq] = cp
        for k, raw in (await store.get_range(keys.audit_entry(lo), keys.audit_entry(hi))).items():
            yield _seq(k), raw


def _seq(key: str) -> int:
    return int(key.rsplit("/", 1)[1])


def _after_all(key_of) -> str:
    """A range end after every numbered key of a kind ('~' sorts after the digits)."""
    return key_of(0)[:-12] + "~"


def _time(raw: bytes) -> float:
    """An entry's time, 0 if unreadable (verification then says what is wrong)."""
    try:
        t = json.loads(raw).get("time")
        return t if isinstance(t, int | float) else 0.0
    except (ValueError, AttributeError):
        return 0.0


class VerifyReport(BaseModel):
    ok: bool
    message: str
    entries: int = 0
    first_seq: int = 0
    last_seq: int = 0
    head_hash: str = ""
    checkpoints: int = 0             # signed checkpoints checked (the head counts as one)
    trimmed: int = 0                 # entries trimmed by retention before first_seq
    trimmed_until: float | None = None
    seq: int | None = None           # the first tampered entry
    time: float | None = None
    problem: str = ""


async def verify(store: Store, key: bytes | None = None) -> VerifyReport:
    """Walk the chain from the anchor to the head: intact, or the first tampered entry."""
    key = key or await load_signing_key(store)
    anchor_before = await store.get_raw(keys.audit_anchor())
    try:
        return await _verify(store, key)
    except Tampered as e:
        if await store.get_raw(keys.audit_anchor()) != anchor_before:   # trimmed meanwhile
            with contextlib.suppress(Tampered):
                return await _verify(store, key)
        return VerifyReport(ok=False, message=str(e), seq=e.seq or None, time=e.time,
                            problem=e.problem)


async def _verify(store: Store, key: bytes) -> VerifyReport:
    _, anchor = await _parsed(store, keys.audit_anchor(), Anchor, "trim anchor")
    _, head = await _parsed(store, keys.audit_head(), AuditHead, "chain head")
    checkpoints: dict[int, Checkpoint] = {}
    walk = ChainWalk(key, anchor, checkpoints)
    if head is None:
        if anchor is not None or await store.get_range(keys.audit_entry(0), _after_all(keys.audit_entry)):
            raise Tampered(walk.first, None, "the chain head record is missing (deleted in etcd)")
        return VerifyReport(ok=True, message="chain intact: the log is empty")
    async for seq, raw in _pages(store, walk.first, head.seq, checkpoints):
        walk.feed(seq, raw)
    walk.finish(head)
    await _check_tail(store, key, head)
    n = head.seq - walk.first + 1
    message = f"chain intact: {n} entries from seq {walk.first} to {head.seq}" if n else \
        "chain intact: no entries kept"
    if anchor is not None:
        message += f"; {anchor.trimmed} older entries trimmed by retention"
        if anchor.note:
            message += f"; WARNING: trimmed entries had failed verification: {anchor.note}"
    return VerifyReport(ok=True, message=message, entries=n, first_seq=walk.first,
                        last_seq=head.seq, head_hash=head.hash, checkpoints=walk.checked,
                        trimmed=anchor.trimmed if anchor else 0,
                        trimmed_until=anchor.time if anchor else None)


async def _check_tail(store: Store, key: bytes, head: AuditHead) -> None:
    """A signed checkpoint beyond the head means the newest entries were cut off and an
    older signed head put back (appends racing with this check move the head forward)."""
    later = await store.get_range(keys.audit_checkpoint(head.seq + 1), _after_all(keys.audit_checkpoint))
    for raw in later.values():
        with contextlib.suppress(ValidationError):
            cp = Checkpoint.model_validate_json(raw)
            if signed(key, cp):
                _, now = await _parsed(store, keys.audit_head(), AuditHead, "chain head")
                if now is None or now.seq < cp.seq:
                    raise Tampered(head.seq + 1, None, f"missing: the entries after {head.seq} were "
                                   f"cut off (a signed checkpoint names entry {cp.seq}) and an "
                                   "older head put back")


# -- reading ------------------------------------------------------------------------------------

class Filters(BaseModel):
    """Which entries a listing shows; principal, action and resource take * wildcards."""
    since: float | None = None
    until: float | None = None
    principal: str | None = None
    action: str | None = None
    resource: str | None = None
    result: str | None = None

    def match(self, e: dict[str, Any]) -> bool:
        t = e.get("time") or 0
        return ((self.since is None or t >= self.since) and (self.until is None or t <= self.until)
                and all(pattern is None or fnmatch.fnmatchcase(str(e.get(name) or ""), pattern)
                        for name, pattern in (("principal", self.principal), ("action", self.action),
                                              ("resource", self.resource), ("result", self.result))))


async def list_entries(store: Store, filters: Filters, limit: int = 50, before: int | None = None
                       ) -> tuple[list[dict[str, Any]], int | None]:
    """Matching entries, newest first, and the seq to pass as `before` for the next page
    (None when there are no more). Reads at most MAX_SCAN entries per call."""
    try:
        _, anchor = await _parsed(store, keys.audit_anchor(), Anchor, "trim anchor")
        _, head = await _parsed(store, keys.audit_head(), AuditHead, "chain head")
    except Tampered as e:
        raise AuditError(f"the audit log cannot be read: {e}", "run 'dbplane audit verify'",
                         code="audit_tampered", status=409) from None
    first = anchor.seq if anchor else 1
    top = head.seq if head else 0
    if before is not None:
        top = min(top, before - 1)
    found: list[dict[str, Any]] = []
    seq = top
    while seq >= first and top - seq < MAX_SCAN:
        lo = max(first, seq - PAGE + 1)
        page = await store.get_range(keys.audit_entry(lo), keys.audit_entry(seq + 1))
        for k, raw in reversed(page.items()):
            with contextlib.suppress(ValueError, AttributeError):   # unreadable: verify says so
                e = json.loads(raw)
                if filters.since is not None and _time(raw) < filters.since - CLOCK_SKEW:
                    return found, None
                if filters.match(e):
                    found.append(e)
                    if len(found) == limit:
                        return found, _seq(k) if _seq(k) > first else None
        seq = lo - 1
    return found, seq + 1 if seq >= first else None


# -- retention ---------------------------------------------------------------------------------

async def get_settings(store: Store) -> AuditSettings:
    return await store.get(keys.audit_settings(), AuditSettings) or AuditSettings()


def check_settings(settings: AuditSettings) -> AuditSettings:
    for name, value, (low, high) in (("retention_days", settings.retention_days, RETENTION_DAYS),
                                     ("max_entries", settings.max_entries, MAX_ENTRIES)):
        if not low <= value <= high:
            raise InvalidInput(f"audit {name} {value} is out of range", f"use {low}-{high}",
                               code="invalid_audit_settings")
    return settings


async def trim(store: Store, key: bytes | None = None, now: float | None = None) -> int:
    """Drop the entries beyond the retention (days and count, AuditSettings), never the
    newest, and leave a signed anchor where the kept log starts. The dropped entries are
    verified first: the first failure is kept in the anchor's note, so that verify keeps
    reporting it. Returns how many entries were dropped (0 if another writer trimmed first)."""
    key = key or await load_signing_key(store)
    settings = await get_settings(store)
    anchor_raw, anchor = await _parsed(store, keys.audit_anchor(), Anchor, "trim anchor")
    _, head = await _parsed(store, keys.audit_head(), AuditHead, "chain head")
    if head is None:
        return 0
    cutoff = (now or time.time()) - settings.retention_days * DAY
    keep_from = head.seq - settings.max_entries + 1        # by count ...
    checkpoints: dict[int, Checkpoint] = {}
    walk = ChainWalk(key, anchor, checkpoints)
    first, note = walk.first, anchor.note if anchor else ""
    oldest = await store.get_raw(keys.audit_entry(first))
    if first >= keep_from and oldest is not None and _time(oldest) >= cutoff:
        return 0                                            # the usual case: one read a minute
    async for seq, raw in _pages(store, first, head.seq - 1, checkpoints):
        if seq >= keep_from and _time(raw) >= cutoff:        # ... and by age
            break
        try:
            walk.feed(seq, raw)
        except Tampered as e:
            note = note or str(e)
            log.warning("audit log: trimming entries that fail verification: %s", e)
            walk.resync(seq, raw)
    if walk.expect == first:
        return 0
    new = sign(key, Anchor(seq=walk.expect, prev_hash=walk.prev, time=walk.last_time or 0.0,
                           trimmed=(anchor.trimmed if anchor else 0) + walk.expect - first,
                           note=note))
    dropped = [(keys.audit_entry(0), keys.audit_entry(new.seq)),
               (keys.audit_checkpoint(0), keys.audit_checkpoint(new.seq))]
    if not await store.commit_if(keys.audit_anchor(), anchor_raw, {keys.audit_anchor(): new}, dropped):
        return 0
    log.info("audit log: trimmed entries %d-%d by retention", first, new.seq - 1)
    return new.seq - first
