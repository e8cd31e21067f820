"""The stored-object format: zstd-compressed, then AES-256-GCM-encrypted, in frames.

Every WAL segment and backup file dbplane writes into a repository has this layout::

    magic        8 bytes   b"DBPLANE\\x01"
    header_len   u32 BE
    header       JSON: format, alg, compression, key_id, key_version,
                 wrapped_key (base64), nonce_prefix (base64), frame_size
    header_tag   16 bytes  GCM tag over nothing, AAD = header digest (checks key and header)
    frames       repeated: u32 BE length + ciphertext||tag

The plaintext is compressed as one zstd stream; the compressed bytes are cut into frames of
`frame_size` bytes (the last one shorter, possibly empty) and each frame is sealed with the
object's data key. The nonce is the object's random 8-byte prefix plus the frame counter;
the AAD is the SHA-256 of magic+header, the counter and a final-frame flag, so a changed
header, reordered, dropped, truncated or altered frames and data after the final frame are
all detected. Envelope encryption: the data key comes from the KMS, which also gives the
wrapped (encrypted) copy stored in the header; decoding asks a callback to unwrap it.

Decoding is streaming: plaintext is yielded as it is authenticated, so a consumer must read
to the end and treat an exception as the whole object being bad.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dbplane.errors import DbplaneError

MAGIC = b"DBPLANE\x01"
FORMAT_VERSION = 1
ALG = "aes-256-gcm"
COMPRESSION = "zstd"
FRAME_SIZE = 1 << 20            # compressed bytes sealed per frame
OUT_CHUNK = 1 << 20             # plaintext bytes per decoded chunk
TAG = 16
NONCE_PREFIX = 8
MAX_HEADER = 64 * 1024
MAX_FRAMES = (1 << 32) - 1      # counter 0xffffffff is the header tag's nonce
PARALLEL_HASH = 256 * 1024      # chunks this big are hashed on a helper thread

_U32 = struct.Struct(">I")
_AAD = struct.Struct(">IB")

Unwrap = Callable[[bytes], bytes]


class CorruptObject(DbplaneError):
    """A stored object is damaged: the caller says which object in which repository."""
    code = "backup_corrupt"
    status = 500

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message, hint or "the stored copy is damaged or incomplete; "
                         "use another backup or a copy in another repository")

    def at(self, where: str) -> CorruptObject:
        """The same error naming the object, e.g. `e.at("wal/000...01 in repository local")`."""
        err = CorruptObject(f"{where}: {self.message}", self.hint)
        err.__cause__ = self.__cause__
        return err


@dataclass(frozen=True)
class ObjectHeader:
    format: int
    alg: str
    compression: str
    key_id: str
    key_version: int
    wrapped_key: bytes
    nonce_prefix: bytes
    frame_size: int
    digest: bytes                # SHA-256 of magic + length + header JSON: AAD of every frame
    size: int                    # bytes before the first frame (magic .. header tag)
    header_tag: bytes


def _nonce(prefix: bytes, counter: int) -> bytes:
    return prefix + _U32.pack(counter)


def _aad(digest: bytes, counter: int, final: bool) -> bytes:
    return digest + _AAD.pack(counter, 1 if final else 0)


# ------------------------------------------------------------------------------ encode


class Encoded:
    """The stored bytes of one object, produced as it is iterated (once).

    `plain_bytes` and `stored_bytes` count as the chunks go; `sha256` (hex, of the
    plaintext) is available once the iteration has finished.
    """

    def __init__(self, chunks: Iterable[bytes], *, data_key: bytes, wrapped_key: bytes,
                 key_id: str, key_version: int, level: int, threads: int,
                 frame_size: int = FRAME_SIZE):
        if len(data_key) != 32:
            raise ValueError(f"an AES-256 data key has 32 bytes, not {len(data_key)}")
        self.key_id = key_id
        self.key_version = key_version
        self.plain_bytes = 0
        self.stored_bytes = 0
        self.complete = False
        self._chunks = chunks
        self._aead = AESGCM(data_key)
        self._cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=False)
        self._frame_size = frame_size
        self._prefix = os.urandom(NONCE_PREFIX)
        header = json.dumps({
            "format": FORMAT_VERSION, "alg": ALG, "compression": COMPRESSION,
            "key_id": key_id, "key_version": key_version,
            "wrapped_key": base64.b64encode(wrapped_key).decode(),
            "nonce_prefix": base64.b64encode(self._prefix).decode(),
            "frame_size": frame_size,
        }, sort_keys=True, separators=(",", ":")).encode()
        self._head = MAGIC + _U32.pack(len(header)) + header
        self._digest = hashlib.sha256(self._head).digest()
        self._sha = hashlib.sha256()
        self._started = False

    @property
    def sha256(self) -> str:
        if not self.complete:
            raise RuntimeError("sha256 is known once the encoded object has been consumed")
        return self._sha.hexdigest()

    def __iter__(self) -> Iterator[bytes]:
        if self._started:
            raise RuntimeError("an Encoded object can be iterated only once")
        self._started = True
        return self._generate()

    def _generate(self) -> Iterator[bytes]:
        tag = self._aead.encrypt(_nonce(self._prefix, MAX_FRAMES), b"", self._digest)
        yield self._emit(self._head + tag)
        comp = self._cctx.compressobj()
        buf = bytearray()
        counter = 0
        fs = self._frame_size
        hasher: ThreadPoolExecutor | None = None
        try:
            for chunk in self._chunks:
                if not chunk:
                    continue
                self.plain_bytes += len(chunk)
                if len(chunk) >= PARALLEL_HASH:
                    # SHA-256 costs about as much as zstd -1: hash on another core while
                    # compressing, and finish before asking for the next chunk (whose
                    # buffer the source may reuse).
                    hasher = hasher or ThreadPoolExecutor(1, thread_name_prefix="dbplane-sha256")
                    hashing = hasher.submit(self._sha.update, chunk)
                    buf += comp.compress(chunk)
                    hashing.result()
                else:
                    self._sha.update(chunk)
                    buf += comp.compress(chunk)
                while len(buf) >= fs:
                    yield from self._frame(bytes(buf[:fs]), counter, final=False)
                    del buf[:fs]
                    counter += 1
        finally:
            if hasher:
                hasher.shutdown(wait=True)
        buf += comp.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)
        while len(buf) > fs:
            yield from self._frame(bytes(buf[:fs]), counter, final=False)
            del buf[:fs]
            counter += 1
        yield from self._frame(bytes(buf), counter, final=True)
        self.complete = True

    def _frame(self, data: bytes, counter: int, *, final: bool) -> Iterator[bytes]:
        if counter >= MAX_FRAMES:
            raise ValueError("object too large for one frame counter")
        ct = self._aead.encrypt(_nonce(self._prefix, counter), data,
                                _aad(self._digest, counter, final))
        yield self._emit(_U32.pack(len(ct)))
        yield self._emit(ct)

    def _emit(self, data: bytes) -> bytes:
        self.stored_bytes += len(data)
        return data


def encode(chunks: Iterable[bytes], *, data_key: bytes, wrapped_key: bytes, key_id: str,
           key_version: int, level: int = 3, threads: int = 0) -> Encoded:
    """Compress and encrypt `chunks` lazily; iterate the result to get the stored bytes.

    `threads` > 0 lets zstd compress on that many worker threads (-1: one per CPU).
    """
    return Encoded(chunks, data_key=data_key, wrapped_key=wrapped_key, key_id=key_id,
                   key_version=key_version, level=level, threads=threads)


def reencode(stream: BinaryIO, unwrap: Unwrap, *, data_key: bytes, wrapped_key: bytes,
             key_id: str, key_version: int, level: int = 3, threads: int = 0) -> Encoded:
    """Decrypt an object and encrypt it again under another data key, streaming (for copies
    to another repository). Corruption surfaces while the result is iterated."""
    return encode(decode(stream, unwrap), data_key=data_key, wrapped_key=wrapped_key,
                  key_id=key_id, key_version=key_version, level=level, threads=threads)


# ------------------------------------------------------------------------------ decode


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if data is None:
        data = b""
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


def read_header(stream: BinaryIO) -> ObjectHeader:
    """Read and check the header (no key needed); the stream is left at the first frame."""
    magic = _read_exact(stream, len(MAGIC))
    if magic != MAGIC:
        if not magic:
            raise CorruptObject("truncated: the object is empty")
        if len(magic) < len(MAGIC) and MAGIC.startswith(magic):
            raise CorruptObject("truncated: the object ends inside its header")
        raise CorruptObject("bad magic: not a dbplane backup object")
    raw_len = _read_exact(stream, 4)
    if len(raw_len) < 4:
        raise CorruptObject("truncated: the object ends inside its header")
    (n,) = _U32.unpack(raw_len)
    if n == 0 or n > MAX_HEADER:
        raise CorruptObject(f"bad header: length {n}")
    raw = _read_exact(stream, n)
    tag = _read_exact(stream, TAG)
    if len(raw) < n or len(tag) < TAG:
        raise CorruptObject("truncated: the object ends inside its header")
    try:
        h = json.loads(raw)
        fields = _header_fields(h)
    except (ValueError, TypeError, KeyError, binascii.Error) as e:
        raise CorruptObject(f"bad header: {e}") from e
    return ObjectHeader(**fields, digest=hashlib.sha256(MAGIC + raw_len + raw).digest(),
                        size=len(MAGIC) + 4 + n + TAG, header_tag=tag)


def _header_fields(h: dict) -> dict:
    if not isinstance(h, dict):
        raise ValueError("not a JSON object")
    if h["format"] != FORMAT_VERSION:
        raise ValueError(f"unsupported format {h['format']!r} (this dbplane reads {FORMAT_VERSION})")
    if h["alg"] != ALG or h["compression"] != COMPRESSION:
        raise ValueError(f"unsupported alg {h['alg']!r} or compression {h['compression']!r}")
    for name, kind in (("key_id", str), ("key_version", int), ("frame_size", int)):
        if not isinstance(h[name], kind) or isinstance(h[name], bool):
            raise ValueError(f"{name} is not a {kind.__name__}")
    prefix = base64.b64decode(h["nonce_prefix"], validate=True)
    if len(prefix) != NONCE_PREFIX:
        raise ValueError("nonce_prefix has the wrong length")
    if not 0 < h["frame_size"] <= 64 * FRAME_SIZE:
        raise ValueError(f"frame_size {h['frame_size']} out of range")
    return {"format": h["format"], "alg": h["alg"], "compression": h["compression"],
            "key_id": h["key_id"], "key_version": h["key_version"],
            "wrapped_key": base64.b64decode(h["wrapped_key"], validate=True),
            "nonce_prefix": prefix, "frame_size": h["frame_size"]}


def decode(stream: BinaryIO, unwrap: Unwrap) -> Iterator[bytes]:
    """The plaintext of an object, in chunks of up to 1 MiB.

    The header is read and the data key unwrapped right away (a KMS error propagates
    unchanged); frames are checked as they are read and a damaged object raises
    CorruptObject, possibly after some chunks have been yielded.
    """
    header = read_header(stream)
    key = unwrap(header.wrapped_key)
    if len(key) != 32:
        raise CorruptObject(f"the unwrapped data key has {len(key)} bytes, not 32")
    aead = AESGCM(key)
    try:
        aead.decrypt(_nonce(header.nonce_prefix, MAX_FRAMES), header.header_tag, header.digest)
    except InvalidTag:
        raise CorruptObject("header failed authentication (damaged header or wrong data key)") from None
    return _plaintext(_frames(stream, header, aead))


def _frames(stream: BinaryIO, header: ObjectHeader, aead: AESGCM) -> Iterator[bytes]:
    """Authenticated compressed bytes, frame by frame, ending with the final frame."""
    full = header.frame_size + TAG
    counter = 0
    while True:
        raw_len = _read_exact(stream, 4)
        if not raw_len:
            after = f"after frame {counter - 1}" if counter else "before its first frame"
            raise CorruptObject(f"truncated: the object ends {after} without its final frame")
        if len(raw_len) < 4:
            raise CorruptObject(f"truncated: the object ends inside frame {counter}")
        (n,) = _U32.unpack(raw_len)
        if n < TAG or n > full:
            raise CorruptObject(f"frame {counter} has a bad length ({n} bytes)")
        ct = _read_exact(stream, n)
        if len(ct) < n:
            raise CorruptObject(f"truncated: the object ends inside frame {counter}")
        nonce = _nonce(header.nonce_prefix, counter)
        for final in ((False, True) if n == full else (True, False)):
            try:
                data = aead.decrypt(nonce, ct, _aad(header.digest, counter, final))
                break
            except InvalidTag:
                continue
        else:
            raise CorruptObject(f"frame {counter} failed authentication")
        if final:
            if stream.read(1):
                raise CorruptObject(f"trailing data after the final frame ({counter})")
            yield data
            return
        yield data
        counter += 1
        if counter >= MAX_FRAMES:
            raise CorruptObject("too many frames")


class _FrameReader:
    """A read()-able view of the frames for zstd's stream reader (bounded output)."""

    def __init__(self, frames: Iterator[bytes]):
        self._frames = frames
        self._buf = memoryview(b"")

    def read(self, size: int = -1) -> bytes:
        while not self._buf:
            try:
                self._buf = memoryview(next(self._frames))
            except StopIteration:
                return b""
        if size < 0 or size >= len(self._buf):
            out, self._buf = self._buf, memoryview(b"")
        else:
            out, self._buf = self._buf[:size], self._buf[size:]
        return out.tobytes()


def _plaintext(frames: Iterator[bytes]) -> Iterator[bytes]:
    source = _FrameReader(frames)
    reader = zstandard.ZstdDecompressor().stream_reader(source, read_size=FRAME_SIZE,
                                                        read_across_frames=True)
    try:
        while True:
            chunk = reader.read(OUT_CHUNK)
            if not chunk:
                break
            yield chunk
    except zstandard.ZstdError as e:
        raise CorruptObject(f"decompression failed: {e}") from e
    if source.read(1) or next(frames, None) is not None:
        raise CorruptObject("data after the end of the compressed stream")
