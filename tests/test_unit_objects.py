"""The stored-object format: compression + AES-256-GCM frames, and every way it can be damaged."""

import hashlib
import io
import os
import struct

import pytest

from dbplane.backup.objects import (
    FRAME_SIZE,
    MAGIC,
    TAG,
    CorruptObject,
    decode,
    encode,
    read_header,
    reencode,
)

pytestmark = pytest.mark.unit

KEY = bytes(range(32))
WRAPPED = b"wrapped:" + KEY[:8]
MARKER = b"pgbench_accounts-secret-marker-4711"


class WrongKey(Exception):
    """What a KMS raises when it cannot unwrap a data key."""


def unwrap(wrapped: bytes) -> bytes:
    if wrapped != WRAPPED:
        raise WrongKey("cannot unwrap")
    return KEY


def seal(data: bytes | list[bytes], **kw) -> bytes:
    enc = encode(data if isinstance(data, list) else [data], data_key=KEY, wrapped_key=WRAPPED,
                 key_id="alias/test", key_version=3, **kw)
    return b"".join(enc)


def opened(stored: bytes, fn=unwrap) -> bytes:
    return b"".join(decode(io.BytesIO(stored), fn))


def compressible(n: int) -> bytes:
    line = b"%8d|%8d|%12d|" + b" " * 84 + b"\n"
    rows = [line % (i, i % 10, 0) for i in range(n // len(line % (0, 0, 0)) + 1)]
    return b"".join(rows)[:n]


def frames(stored: bytes) -> tuple[bytes, list[bytes]]:
    """(everything before the first frame, [length+ciphertext of each frame])."""
    size = read_header(io.BytesIO(stored)).size
    head, pos, out = stored[:size], size, []
    while pos < len(stored):
        (n,) = struct.unpack(">I", stored[pos:pos + 4])
        out.append(stored[pos:pos + 4 + n])
        pos += 4 + n
    return head, out


@pytest.fixture(scope="module")
def large() -> bytes:
    return os.urandom(20 << 20) + compressible(20 << 20)


@pytest.fixture(scope="module")
def large_stored(large) -> bytes:
    return seal([large[i:i + (1 << 20)] for i in range(0, len(large), 1 << 20)])


@pytest.mark.parametrize("data", [b"", b"x", MARKER * 3], ids=["empty", "one-byte", "small"])
def test_round_trip_small(data):
    assert opened(seal(data)) == data


def test_round_trip_empty_chunks():
    assert opened(seal([b"", b"ab", b"", b"c", b""])) == b"abc"


def test_round_trip_large(large, large_stored):
    got = bytearray()
    for chunk in decode(io.BytesIO(large_stored), unwrap):
        assert len(chunk) <= 1 << 20            # decoded output is bounded, never one blob
        got += chunk
    assert got == large
    assert len(frames(large_stored)[1]) > 20    # many frames


def test_round_trip_highly_compressible_multiple_frames():
    data = compressible(64 << 20)
    stored = seal(data, level=1, threads=2)
    assert len(stored) < len(data) // 8
    assert opened(stored) == data


def test_counters_and_digest():
    data = os.urandom(3 << 20) + MARKER
    enc = encode([data[:100], data[100:]], data_key=KEY, wrapped_key=WRAPPED, key_id="k",
                 key_version=1)
    with pytest.raises(RuntimeError):
        _ = enc.sha256                          # not consumed yet
    stored = b"".join(enc)
    assert enc.complete
    assert enc.plain_bytes == len(data)
    assert enc.stored_bytes == len(stored)
    assert enc.sha256 == hashlib.sha256(data).hexdigest()
    with pytest.raises(RuntimeError):
        iter(enc)                               # one pass only


def test_no_plaintext_in_stored_bytes():
    data = MARKER * 1000 + os.urandom(1000) + MARKER
    stored = seal(data, level=-5)               # barely compressed: the marker survives zstd
    assert MARKER not in stored
    assert MARKER[:16] not in stored
    assert b"alias/test" in stored              # the header is readable, the data is not


def test_header_readable_without_key():
    stored = seal(b"abc")
    h = read_header(io.BytesIO(stored))
    assert (h.key_id, h.key_version, h.wrapped_key) == ("alias/test", 3, WRAPPED)
    assert (h.alg, h.compression, h.frame_size) == ("aes-256-gcm", "zstd", FRAME_SIZE)


def test_wrong_key_propagates_kms_error():
    stored = seal(b"abc")
    with pytest.raises(WrongKey):
        decode(io.BytesIO(stored), lambda w: (_ for _ in ()).throw(WrongKey("denied")))


def test_wrong_data_key_detected_at_header():
    stored = seal(b"abc")
    with pytest.raises(CorruptObject, match="header failed authentication"):
        opened(stored, lambda w: bytes(32))


def corrupt(stored: bytes, fn=unwrap) -> CorruptObject:
    with pytest.raises(CorruptObject) as e:
        opened(stored, fn)
    assert e.value.code == "backup_corrupt"
    return e.value


def flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1:]


def test_bad_magic():
    stored = seal(b"abc")
    assert "bad magic" in corrupt(flip(stored, 2)).message
    assert "bad magic" in corrupt(b"PK\x03\x04 a zip file").message


def test_header_tampering():
    stored = seal(b"abc")
    pos = stored.index(b"alias/test")
    assert "header failed authentication" in corrupt(flip(stored, pos)).message   # a value
    pos = stored.index(b'"key_version":3') + 14
    assert "header failed authentication" in corrupt(stored[:pos] + b"4" + stored[pos + 1:]).message
    pos = stored.index(b"{")
    assert "bad header" in corrupt(flip(stored, pos)).message                      # the JSON
    assert "bad header" in corrupt(stored[:8] + b"\xff\xff\xff\xff" + stored[12:]).message


def test_frame_tampering(large_stored):
    head, fr = frames(large_stored)
    bad = flip(fr[5], 4 + 1000)
    msg = corrupt(head + b"".join(fr[:5]) + bad + b"".join(fr[6:])).message
    assert msg == "frame 5 failed authentication"
    bad_len = struct.pack(">I", FRAME_SIZE + TAG + 1) + fr[2][4:]
    assert "frame 2 has a bad length" in corrupt(head + b"".join(fr[:2]) + bad_len).message


def test_swapped_frames(large_stored):
    head, fr = frames(large_stored)
    fr[3], fr[4] = fr[4], fr[3]
    assert corrupt(head + b"".join(fr)).message == "frame 3 failed authentication"


def test_dropped_last_frame(large_stored):
    head, fr = frames(large_stored)
    msg = corrupt(head + b"".join(fr[:-1])).message
    assert msg == f"truncated: the object ends after frame {len(fr) - 2} without its final frame"


def test_final_frame_moved_earlier(large_stored):
    head, fr = frames(large_stored)
    assert "failed authentication" in corrupt(head + b"".join(fr[:3]) + fr[-1]).message


def test_truncated(large_stored):
    head, fr = frames(large_stored)
    assert "truncated: the object ends inside frame 7" in corrupt(
        large_stored[:len(head) + sum(map(len, fr[:7])) + 100]).message
    assert "ends inside its header" in corrupt(large_stored[:20]).message
    assert "before its first frame" in corrupt(head).message
    assert "ends inside frame 0" in corrupt(head + b"\x00\x00").message
    assert "the object is empty" in corrupt(b"").message


def test_trailing_data():
    stored = seal(b"abc")
    assert "trailing data after the final frame" in corrupt(stored + b"\x00").message
    assert "trailing data after the final frame" in corrupt(stored + stored).message


def test_reencode_under_another_key():
    data = compressible(3 << 20) + MARKER
    stored = seal(data)
    key2, wrapped2 = os.urandom(32), b"other-wrapped"
    enc = reencode(io.BytesIO(stored), unwrap, data_key=key2, wrapped_key=wrapped2,
                   key_id="alias/copy", key_version=7, level=1)
    copy = b"".join(enc)
    assert enc.sha256 == hashlib.sha256(data).hexdigest()
    assert read_header(io.BytesIO(copy)).key_id == "alias/copy"
    assert b"".join(decode(io.BytesIO(copy), {wrapped2: key2}.__getitem__)) == data
    with pytest.raises(WrongKey):
        opened(copy)


def test_reencode_of_corrupt_object_raises_while_iterating(large_stored):
    head, fr = frames(large_stored)
    enc = reencode(io.BytesIO(head + b"".join(fr[:-1])), unwrap, data_key=os.urandom(32),
                   wrapped_key=b"w", key_id="k", key_version=1)
    with pytest.raises(CorruptObject, match="truncated"):
        for _ in enc:
            pass
    assert not enc.complete


def test_magic_is_the_prefix():
    assert seal(b"").startswith(MAGIC)
    assert CorruptObject("x").at("wal/1 in repository local").message == "wal/1 in repository local: x"
