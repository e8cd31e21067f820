"""The audit log's pure logic: the hash chain, signatures of head, checkpoints and anchor,
what verification says about each kind of tampering, filters, and the API's result
mapping."""

from __future__ import annotations

import json
import time

import pytest

from dbplane.cli.audit_cmds import parse_when
from dbplane.errors import InvalidInput
from dbplane.httpapi.audit import error_code, result_of
from dbplane.security.audit import Filters, _blessing, check_settings
from dbplane.security.audit_chain import (
    CHECKPOINT_EVERY,
    GENESIS,
    Anchor,
    AuditHead,
    AuditSettings,
    ChainWalk,
    Tampered,
    canonical,
    entry_hash,
    seal,
    sign,
    signed,
    signing_key,
)

pytestmark = pytest.mark.unit

KEY = signing_key(bytes(range(32)))
OTHER_KEY = signing_key(bytes(32))
T0 = 1_790_000_000.0


def event(i: int, **extra) -> dict:
    return {"time": T0 + i, "kind": "api", "principal": "user/admin", "action": f"GET /v1/x/{i}",
            "resource": f"/v1/x/{i}", "source": "127.0.0.1", "result": "allowed", "status": 200,
            "code": "", "detail": "", "host": "h", **extra}


def chain(n: int, batch: int = 10, key: bytes | None = KEY, step: float = 1.0):
    """n entries appended in batches, one batch per `step` seconds: (stored entries by seq,
    checkpoints by seq, head)."""
    head, stored, checkpoints = AuditHead(), {}, {}
    for start in range(0, n, batch):
        events = [event(i) for i in range(start, min(n, start + batch))]
        docs, head, cp = seal(events, head, key, T0 + start * step)
        stored.update({d["seq"]: canonical(d) for d in docs})
        if cp:
            checkpoints[cp.seq] = cp
    return stored, checkpoints, head


def walk(stored: dict, checkpoints: dict, head: AuditHead, anchor: Anchor | None = None,
         key: bytes = KEY) -> ChainWalk:
    w = ChainWalk(key, anchor, dict(checkpoints))
    for seq in sorted(stored):
        if seq <= head.seq:
            w.feed(seq, stored[seq])
    w.finish(head)
    return w


def edit(stored: dict, at: int, **changes) -> None:
    stored[at] = canonical({**json.loads(stored[at]), **changes})


def test_seal_links_every_entry_to_the_one_before():
    stored, _, head = chain(25)
    docs = [json.loads(stored[s]) for s in sorted(stored)]
    assert [d["seq"] for d in docs] == list(range(1, 26))
    assert docs[0]["prev_hash"] == GENESIS
    assert all(b["prev_hash"] == a["hash"] for a, b in zip(docs, docs[1:], strict=False))
    assert all(d["hash"] == entry_hash(d) for d in docs)
    assert head.seq == 25 and head.hash == docs[-1]["hash"] and signed(KEY, head)


def test_canonical_json_does_not_depend_on_key_order():
    a = {"b": 1, "a": "é", "c": [1, 2]}
    assert canonical(a) == canonical(dict(reversed(list(a.items())))) == '{"a":"é","b":1,"c":[1,2]}'.encode()


def test_an_intact_chain_verifies():
    stored, checkpoints, head = chain(250, batch=30)
    w = walk(stored, checkpoints, head)
    assert w.expect == 251 and w.checked == len(checkpoints) + 1


def test_checkpoints_every_hundred_entries_or_sixty_seconds():
    _, by_count, _ = chain(300, batch=10, step=0.01)           # fast: the count decides
    assert sorted(by_count) == [10, 110, 210]                  # the first batch always gets one
    assert all(b - a == CHECKPOINT_EVERY for a, b in zip(sorted(by_count), sorted(by_count)[1:],
                                                         strict=False))
    _, by_time, _ = chain(40, batch=10, step=10.0)             # slow: 100 s between batches
    assert sorted(by_time) == [10, 20, 30, 40]


def test_a_changed_field_names_that_entry():
    stored, checkpoints, head = chain(50)
    edit(stored, 17, principal="user/mallory")
    with pytest.raises(Tampered) as e:
        walk(stored, checkpoints, head)
    assert e.value.seq == 17 and e.value.time == T0 + 16
    assert "hash mismatch" in str(e.value) and str(e.value).startswith("entry 17 (")


def test_a_changed_hash_is_caught_at_the_next_entry():
    stored, checkpoints, head = chain(50)
    doc = json.loads(stored[30])
    doc["principal"] = "user/mallory"
    doc["hash"] = entry_hash(doc)                              # self-consistent, but ...
    stored[30] = canonical(doc)
    with pytest.raises(Tampered) as e:
        walk(stored, checkpoints, head)
    assert e.value.seq == 31 and "prev_hash does not match entry 30" in str(e.value)


def test_a_deleted_entry_names_the_gap():
    stored, checkpoints, head = chain(50)
    del stored[20], stored[21]
    with pytest.raises(Tampered) as e:
        walk(stored, checkpoints, head)
    assert e.value.seq == 20
    assert "entries 20-21 are gone" in str(e.value) and "from entry 19 to entry 22" in str(e.value)


def test_deleting_the_newest_entries_is_caught_by_the_head():
    stored, checkpoints, head = chain(50)
    del stored[50]
    with pytest.raises(Tampered, match="entries 50-50 are gone from the end"):
        walk(stored, checkpoints, head)


def test_a_renumbered_or_unreadable_entry_is_named():
    stored, checkpoints, head = chain(20)
    edit(stored, 5, seq=6)
    with pytest.raises(Tampered, match="entry 5 .*sequence number was changed"):
        walk(stored, checkpoints, head)
    stored, checkpoints, head = chain(20)
    stored[8] = b"{not json"
    with pytest.raises(Tampered, match="entry 8: not a readable entry"):
        walk(stored, checkpoints, head)


def rewrite(stored: dict, from_seq: int, key: bytes | None, **changes):
    """What an attacker with etcd write access can do: change an entry and recompute every
    hash after it, so that the chain itself is consistent again."""
    prev = json.loads(stored[from_seq - 1])["hash"] if from_seq > 1 else GENESIS
    for seq in sorted(s for s in stored if s >= from_seq):
        doc = {**json.loads(stored[seq]), "prev_hash": prev}
        if seq == from_seq:
            doc.update(changes)
        doc["hash"] = prev = entry_hash(doc)
        stored[seq] = canonical(doc)
    return prev


def test_a_consistent_rewrite_fails_the_signed_checkpoint():
    stored, checkpoints, head = chain(250, batch=10, step=0.01)
    rewrite(stored, 150, None, action="GET /nothing-to-see")
    with pytest.raises(Tampered) as e:
        walk(stored, checkpoints, head)
    assert e.value.seq == 111        # after the checkpoint at 110, up to the one at 210
    assert "entries 111-210 do not match the signed checkpoint at entry 210" in str(e.value)


def test_a_rewrite_signed_with_another_key_fails_the_signature():
    stored, checkpoints, head = chain(30)
    last = rewrite(stored, 3, None, result="denied")
    forged = {s: sign(OTHER_KEY, cp.model_copy(update={"hash": json.loads(stored[s])["hash"]}))
              for s, cp in checkpoints.items()}
    forged_head = sign(OTHER_KEY, head.model_copy(update={"hash": last}))
    with pytest.raises(Tampered, match="bad checkpoint signature"):
        walk(stored, forged, forged_head)
    with pytest.raises(Tampered, match="bad head signature"):       # checkpoints deleted
        walk(stored, {}, forged_head)
    with pytest.raises(Tampered, match="bad head signature"):       # signature removed
        walk(stored, {}, forged_head.model_copy(update={"mac": ""}))


def test_entries_written_without_the_key_are_chained_but_fail_the_head_signature():
    stored, checkpoints, head = chain(10, key=None)
    assert checkpoints == {} and head.mac == ""
    with pytest.raises(Tampered, match="bad head signature"):
        walk(stored, checkpoints, head)


def test_signatures_are_bound_to_the_kind_of_record():
    stored, checkpoints, head = chain(10)
    cp = checkpoints[10]
    assert signed(KEY, cp) and not signed(OTHER_KEY, cp)
    as_head = AuditHead(seq=cp.seq, hash=cp.hash, time=cp.time, mac=cp.mac)
    assert not signed(KEY, as_head)


def test_a_trim_anchor_starts_verification_and_must_be_signed():
    stored, checkpoints, head = chain(60)
    anchor = sign(KEY, Anchor(seq=41, prev_hash=json.loads(stored[40])["hash"], time=T0 + 39,
                              trimmed=40))
    kept = {s: v for s, v in stored.items() if s >= 41}
    w = walk(kept, {s: c for s, c in checkpoints.items() if s >= 41}, head, anchor)
    assert w.first == 41 and w.expect == 61
    with pytest.raises(Tampered, match="trim anchor .* bad signature"):
        walk(kept, {}, head, anchor.model_copy(update={"seq": 45}))
    with pytest.raises(Tampered, match="the chain head is behind"):
        walk(kept, {}, sign(KEY, AuditHead(seq=30, hash="x")), anchor)


def test_a_writer_never_signs_over_a_head_it_cannot_vouch_for():
    stored, checkpoints, head = chain(10)
    assert _blessing(KEY, AuditHead()) == KEY                 # the first append
    assert _blessing(KEY, head) == KEY
    assert _blessing(None, head) is None
    forged = head.model_copy(update={"hash": "f" * 64})       # a rewritten chain's head
    assert _blessing(KEY, forged) is None
    assert _blessing(KEY, head.model_copy(update={"mac": ""})) is None


def test_resync_carries_on_past_damage():
    stored, _, head = chain(10)
    edit(stored, 4, principal="user/mallory")
    w = ChainWalk(KEY, None, {})
    for seq in range(1, 4):
        w.feed(seq, stored[seq])
    with pytest.raises(Tampered):
        w.feed(4, stored[4])
    w.resync(4, stored[4])
    for seq in range(5, 11):                 # entry 5 follows the stored hash of entry 4
        w.feed(seq, stored[seq])
    assert w.expect == 11


def test_filters():
    e = event(1, principal="user/admin", action="db:CreateDatabase", resource="db/orders")
    assert Filters().match(e)
    assert Filters(principal="user/admin", action="db:*", resource="db/ord*", result="allowed").match(e)
    assert not Filters(action="kms:*").match(e)
    assert not Filters(since=T0 + 2).match(e) and Filters(until=T0 + 2).match(e)
    assert not Filters(principal="user/admin").match({**e, "principal": None})


def test_results_and_error_codes_of_api_calls():
    assert [result_of(s) for s in (200, 202, 401, 403, 404, 409, 500)] == \
        ["allowed", "allowed", "denied", "denied", "error", "error", "error"]
    assert error_code(b'{"error": {"code": "database_not_found", "message": "x"}}') == "database_not_found"
    assert error_code(b"Internal Server Error") == error_code(b'{"detail": 1}') == ""


def test_settings_bounds():
    assert check_settings(AuditSettings()).max_entries == 200_000
    with pytest.raises(InvalidInput, match="retention_days 0 is out of range"):
        check_settings(AuditSettings(retention_days=0))
    with pytest.raises(InvalidInput, match="max_entries 10 is out of range"):
        check_settings(AuditSettings(max_entries=10))


def test_since_takes_durations_and_iso_times():
    assert abs(parse_when("1h") - (time.time() - 3600)) < 5
    assert abs(parse_when("7d") - (time.time() - 7 * 86400)) < 5
    assert parse_when("2026-11-24T03:50:00Z") == parse_when("2026-11-24T03:50:00")
    with pytest.raises(InvalidInput, match="invalid time 'yesterday'"):
        parse_when("yesterday")
