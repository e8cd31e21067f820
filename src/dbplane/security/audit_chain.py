"""The audit log's hash chain: pure logic, no I/O (security/audit.py stores it in etcd).

Each entry holds `prev_hash`, the hash of the entry before it, and
`hash = SHA-256(prev_hash + canonical JSON of the entry without "hash")`: changing,
inserting or removing one entry breaks every link after it. An attacker who can write etcd
could recompute the whole chain, so the chain's state is also signed with an HMAC key
derived from the KMS root key, which etcd never holds:

- the **head** (newest sequence number and hash) is signed on every append;
- a **checkpoint** (sequence number, hash) is kept every CHECKPOINT_EVERY entries or
  CHECKPOINT_SECONDS, so a rewrite is caught, and located, even below the head;
- the **anchor** records where trimming stopped (first kept entry and the hash before
  it), so that verify starts there and reports older entries as trimmed, not missing.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel

GENESIS = "0" * 64                  # prev_hash of entry 1
CHECKPOINT_EVERY = 100              # entries between signed checkpoints ...
CHECKPOINT_SECONDS = 60.0           # ... or seconds, whichever comes first
RESULTS = ("allowed", "denied", "error")
KEY_INFO = b"dbplane/v1/audit-log-signing"


class AuditHead(BaseModel):
    """The newest entry of the chain, signed; appends compare-and-swap this record."""
    seq: int = 0
    hash: str = GENESIS
    time: float = 0.0
    checkpoint_seq: int = 0          # the newest stored checkpoint, to know when one is due
    checkpoint_time: float = 0.0
    mac: str = ""


class Checkpoint(BaseModel):
    seq: int
    hash: str
    time: float
    mac: str = ""


class Anchor(BaseModel):
    """Where the kept chain starts after trimming: entry `seq` follows `prev_hash`."""
    seq: int
    prev_hash: str
    time: float                      # time of the newest trimmed entry
    trimmed: int                     # entries trimmed so far, in total
    note: str = ""                   # the first verification failure among trimmed entries
    mac: str = ""


class AuditSettings(BaseModel):
    """How much of the log etcd keeps (etcd's quota is 2 GiB for everything)."""
    retention_days: int = 30
    max_entries: int = 200_000


class Tampered(Exception):
    """The first place where the chain is not what was written."""

    def __init__(self, seq: int, time: float | None, problem: str):
        self.seq, self.time, self.problem = seq, time, problem
        at = f" ({_when(time)})" if time else ""
        super().__init__(f"entry {seq}{at}: {problem}" if seq else problem)


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- hashing and signing ----------------------------------------------------------------

def canonical(doc: dict[str, Any]) -> bytes:
    """One byte string per document: sorted keys, no spaces, UTF-8."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(doc: dict[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != "hash"}
    return hashlib.sha256(str(body.get("prev_hash", "")).encode() + canonical(body)).hexdigest()


def signing_key(root_key: bytes) -> bytes:
    """The log's HMAC key: derived from the KMS root key (never stored), so that only a
    holder of the root key can sign a head, checkpoint or anchor."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=KEY_INFO).derive(root_key)


def _signed_fields(record: BaseModel) -> bytes:
    """What a MAC covers: every field but the MAC, prefixed by the kind of record, so that
    a signed checkpoint cannot pass for an anchor."""
    return type(record).__name__.encode() + b":" + canonical(record.model_dump(exclude={"mac"}))


def sign(key: bytes, record: AuditHead | Checkpoint | Anchor):
    return record.model_copy(update={"mac": hmac.new(key, _signed_fields(record),
                                                     hashlib.sha256).hexdigest()})


def signed(key: bytes, record: AuditHead | Checkpoint | Anchor) -> bool:
    return bool(record.mac) and hmac.compare_digest(record.mac, sign(key, record).mac)


# -- appending ----------------------------------------------------------------------------

def seal(events: list[dict[str, Any]], head: AuditHead, key: bytes | None, now: float
         ) -> tuple[list[dict[str, Any]], AuditHead, Checkpoint | None]:
    """Chain events after head: the entries to store, the new head, and the checkpoint to
    store with them when one is due (signed only if there is a key)."""
    docs, prev, seq = [], head.hash, head.seq
    for event in events:
        seq += 1
        doc = {**event, "seq": seq, "prev_hash": prev}
        doc["hash"] = prev = entry_hash(doc)
        docs.append(doc)
    new = head.model_copy(update={"seq": seq, "hash": prev, "time": now, "mac": ""})
    checkpoint = None
    if key is not None:
        due = (seq - head.checkpoint_seq >= CHECKPOINT_EVERY
               or now - head.checkpoint_time >= CHECKPOINT_SECONDS)
        if due:
            checkpoint = sign(key, Checkpoint(seq=seq, hash=prev, time=now))
            new = new.model_copy(update={"checkpoint_seq": seq, "checkpoint_time": now})
        new = sign(key, new)
    return docs, new, checkpoint


# -- verifying ----------------------------------------------------------------------------

class ChainWalk:
    """Feed entries in sequence order (from the anchor, or 1); raises Tampered at the first
    entry that is not as written. `finish` checks the end against the signed head."""

    def __init__(self, key: bytes, anchor: Anchor | None, checkpoints: dict[int, Checkpoint]):
        if anchor is not None and not signed(key, anchor):
            raise Tampered(anchor.seq, None, "the trim anchor (where the kept log starts) has a "
                           "bad signature: it was forged or moved")
        self.key = key
        self.first = anchor.seq if anchor else 1
        self.expect = self.first
        self.prev = anchor.prev_hash if anchor else GENESIS
        self.checkpoints = checkpoints
        self.verified_to = self.first - 1       # the newest entry a signature vouches for
        self.checked = 0                        # checkpoints checked
        self.last_time: float | None = None

    def feed(self, seq: int, raw: bytes) -> None:
        """One stored entry: `seq` from its key, `raw` its stored value."""
        try:
            doc = json.loads(raw)
            assert isinstance(doc, dict)
            time = doc.get("time") if isinstance(doc.get("time"), int | float) else None
        except (ValueError, AssertionError):
            doc, time = None, None
        if seq > self.expect:
            span = f"entry {self.expect} is" if seq == self.expect + 1 else \
                f"entries {self.expect}-{seq - 1} are"
            after = f", written at {_when(time)}" if time else ""
            before = f"entry {self.expect - 1}" if self.expect > self.first else "its start"
            raise Tampered(self.expect, None, f"missing: {span} gone (the log jumps from {before} "
                           f"to entry {seq}{after})")
        if doc is None:
            raise Tampered(seq, None, "not a readable entry (changed after it was written)")
        if doc.get("seq") != seq:
            raise Tampered(seq, time, f"its sequence number was changed (it says {doc.get('seq')!r})")
        if doc.get("prev_hash") != self.prev:
            raise Tampered(seq, time, f"prev_hash does not match entry {seq - 1}: an entry was "
                           "removed, inserted or replaced before it")
        if doc.get("hash") != entry_hash(doc):
            raise Tampered(seq, time, "hash mismatch: the entry was changed after it was written")
        self.prev, self.last_time, self.expect = doc["hash"], time, seq + 1
        if seq in self.checkpoints:
            self._check(self.checkpoints[seq], "checkpoint")

    def resync(self, seq: int, raw: bytes) -> None:
        """Carry on after a failure at entry `seq` as if it were intact (trimming keeps
        going past damage it has noted, so that the log stays bounded)."""
        try:
            doc = json.loads(raw)
            self.prev, self.last_time = str(doc.get("hash", "")), doc.get("time")
        except (ValueError, AttributeError):
            self.prev = ""
        self.expect = seq + 1

    def finish(self, head: AuditHead) -> None:
        """After the last entry up to head.seq."""
        if head.seq < self.first - 1:
            raise Tampered(head.seq, None, f"the chain head is behind where the kept log starts "
                           f"(entry {self.first}): it was replaced by an older head")
        if self.expect <= head.seq:
            raise Tampered(self.expect, None, f"missing: entries {self.expect}-{head.seq} are gone "
                           f"from the end of the log (the head is at entry {head.seq})")
        if head.seq:
            self._check(head, "head")

    def _check(self, record: AuditHead | Checkpoint, what: str) -> None:
        seq = record.seq
        if not signed(self.key, record):
            raise Tampered(seq, self.last_time, f"bad {what} signature: the chain up to here was "
                           "rewritten or the signature forged (signatures need the KMS root key)")
        if record.hash != self.prev:
            span = f"entries {self.verified_to + 1}-{seq}" if seq > self.verified_to + 1 else f"entry {seq}"
            raise Tampered(self.verified_to + 1, None, f"{span} do not match the signed {what} at "
                           f"entry {seq}: the chain was rewritten there")
        self.verified_to = seq
        self.checked += 1
