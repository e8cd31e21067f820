"""SCRAM-SHA-256 password verifiers (RFC 5802 / 7677), computed here so that a plain
password never travels in SQL text where it could reach logs or pg_stat_statements."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets as _secrets
import stringprep
import unicodedata
from dataclasses import dataclass

ITERATIONS = 4096


def verifier(password: str, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    salt = salt or os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def new_password() -> str:
    """URL- and pgpass-safe: no ':' or '\\'."""
    return _secrets.token_urlsafe(24)


# --- SCRAM-SHA-256 exchange, PostgreSQL flavour (used by the pooling proxy) -------------------------
#
# The proxy checks clients against pg_authid's verifiers and then logs in to the real server as the
# same user with the ClientKey recovered from the client's proof (ClientKey = proof XOR
# HMAC(StoredKey, AuthMessage)), as PgBouncer does; so it never needs the plain password.

NONCE_BYTES = 18
_MOCK_SECRET = os.urandom(32)  # per process: fake salts for unknown users are stable but unguessable


class ScramError(Exception):
    """malformed SCRAM message (protocol violation)"""


class ScramAuthFailed(Exception):
    """wrong password / wrong proof / bad server signature"""


@dataclass(frozen=True)
class Verifier:
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes


def parse_verifier(text: str | None) -> Verifier | None:
    """pg_authid.rolpassword -> Verifier; None for md5, plain text, NULL or anything malformed."""
    m = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$:]+)\$([^$:]+):([^$:]+)", text or "")
    if not m:
        return None
    try:
        salt, stored, server = (base64.b64decode(g, validate=True) for g in m.group(2, 3, 4))
    except binascii.Error:
        return None
    iterations = int(m.group(1))
    if iterations < 1 or not salt or len(stored) != 32 or len(server) != 32:
        return None
    return Verifier(iterations, salt, stored, server)


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str, what: str) -> bytes:
    try:
        return base64.b64decode(s, validate=True)
    except binascii.Error:
        raise ScramError(f"invalid base64 in {what}") from None


def _new_nonce() -> str:
    # base64 is printable and has no ',' (RFC 5802's rule for nonces)
    return _b64(os.urandom(NONCE_BYTES))


def _valid_nonce(n: str) -> bool:
    return bool(n) and all(0x21 <= ord(c) <= 0x7E and c != "," for c in n)


def _decode(msg: bytes) -> str:
    try:
        return msg.decode()
    except UnicodeDecodeError:
        raise ScramError("SCRAM message is not valid UTF-8") from None


def _attr(part: str, name: str) -> str:
    if not part.startswith(name + "="):
        raise ScramError(f"malformed SCRAM message: expected attribute {name!r}")
    return part[2:]


def _check_extensions(attrs: list[str]) -> None:
    # optional extensions are allowed (and ignored) but must still be well-formed attributes
    if not all(re.fullmatch(r"[A-Za-z]=.*", a) for a in attrs):
        raise ScramError("malformed SCRAM message: invalid attribute")


def _saslprep(password: str) -> bytes:
    """pg_saslprep(), which libpq and CREATE ROLE ... PASSWORD apply: ASCII passes unchanged, else
    RFC 4013; a string SASLprep prohibits is used as is, as PostgreSQL does."""
    if password.isascii():
        return password.encode()
    s = "".join(" " if stringprep.in_table_c12(c) else c for c in password if not stringprep.in_table_b1(c))
    s = unicodedata.normalize("NFKC", s)
    prohibited = (stringprep.in_table_a1, stringprep.in_table_c12, stringprep.in_table_c21_c22,
                  stringprep.in_table_c3, stringprep.in_table_c4, stringprep.in_table_c5,
                  stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
                  stringprep.in_table_c9)
    if not s or any(f(c) for c in s for f in prohibited):
        return password.encode()
    if any(stringprep.in_table_d1(c) for c in s):  # bidi: RandAL text must be RandAL at both ends
        if any(stringprep.in_table_d2(c) for c in s) or not (
                stringprep.in_table_d1(s[0]) and stringprep.in_table_d1(s[-1])):
            return password.encode()
    return s.encode()


class ServerExchange:
    """Server side, no channel binding (we only advertise SCRAM-SHA-256). verifier None = unknown user:
    run a fake exchange with a salt derived deterministically from the user name and a per-process
    random secret (so the attacker cannot tell unknown users apart), and always fail in final()."""

    def __init__(self, verifier: Verifier | None, user: str = "", *, _nonce: str | None = None):
        if verifier is None:  # like PostgreSQL's scram_mock_salt()
            salt = hashlib.sha256(_MOCK_SECRET + user.encode()).digest()[:16]
            verifier, self._doomed = Verifier(ITERATIONS, salt, b"\0" * 32, b"\0" * 32), True
        else:
            self._doomed = False
        self._verifier = verifier
        self._server_nonce = _nonce  # tests only: a fixed nonce suffix
        self._state = "first"
        self.client_key: bytes | None = None

    def first(self, client_first: bytes) -> bytes:
        if self._state != "first":
            raise ScramError("unexpected SCRAM client-first-message")
        self._state = "done"  # a malformed message ends the exchange
        msg = _decode(client_first)
        parts = msg.split(",", 2)
        if len(parts) < 3:
            raise ScramError("malformed SCRAM client-first-message")
        cbind, authzid, bare = parts
        if cbind.startswith("p="):
            raise ScramError("channel binding is not supported (server did not offer SCRAM-SHA-256-PLUS)")
        if cbind not in ("n", "y"):
            raise ScramError("malformed SCRAM message: bad gs2 channel binding flag")
        if authzid:  # PostgreSQL refuses "a=": the authorization identity is the startup user
            raise ScramError("client uses authorization identity, which is not supported")
        self._gs2_header = f"{cbind},,"
        attrs = bare.split(",")
        if attrs[0].startswith("m="):
            raise ScramError("client requires an unsupported SCRAM extension")
        _attr(attrs[0], "n")  # the user name is ignored: PostgreSQL uses the startup packet's
        if len(attrs) < 2:
            raise ScramError("malformed SCRAM client-first-message: no nonce")
        client_nonce = _attr(attrs[1], "r")
        if not _valid_nonce(client_nonce):
            raise ScramError("malformed SCRAM message: invalid client nonce")
        _check_extensions(attrs[2:])
        self._nonce = client_nonce + (self._server_nonce or _new_nonce())
        v = self._verifier
        self._server_first = f"r={self._nonce},s={_b64(v.salt)},i={v.iterations}"
        self._client_first_bare = bare
        self._state = "final"
        return self._server_first.encode()

    def final(self, client_final: bytes) -> bytes:
        if self._state != "final":
            raise ScramError("unexpected SCRAM client-final-message")
        self._state = "done"
        msg = _decode(client_final)
        without_proof, sep, proof_part = msg.rpartition(",")
        attrs = without_proof.split(",") if sep else []
        if len(attrs) < 2:
            raise ScramError("malformed SCRAM client-final-message")
        if _unb64(_attr(attrs[0], "c"), "channel binding") != self._gs2_header.encode():
            raise ScramError("SCRAM channel binding check failed")
        if _attr(attrs[1], "r") != self._nonce:
            raise ScramError("SCRAM nonce mismatch")
        _check_extensions(attrs[2:])
        proof = _unb64(_attr(proof_part, "p"), "proof")
        if len(proof) != 32:
            raise ScramError("malformed SCRAM message: invalid proof length")
        v = self._verifier
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        client_key = _xor(proof, _hmac(v.stored_key, auth_message))
        ok = hmac.compare_digest(hashlib.sha256(client_key).digest(), v.stored_key)
        if self._doomed or not ok:
            raise ScramAuthFailed("password authentication failed")
        self.client_key = client_key
        return f"v={_b64(_hmac(v.server_key, auth_message))}".encode()


class ClientExchange:
    """Client side. Either password= (computes SaltedPassword with the server's salt/iterations) or
    client_key= plus server_key= (from the user's verifier, to check the server's signature)."""

    def __init__(self, *, password: str | None = None, client_key: bytes | None = None,
                 server_key: bytes | None = None, _nonce: str | None = None, _user: str = ""):
        if (password is None) == (client_key is None) or (client_key is not None and server_key is None):
            raise ValueError("pass either password= or client_key= with server_key=")
        self._password, self._client_key, self._server_key = password, client_key, server_key
        # tests only: _nonce and _user reproduce RFC 7677's example; libpq sends an empty user name
        user = _user.replace("=", "=3D").replace(",", "=2C")
        self._client_first_bare = f"n={user},r={_nonce or _new_nonce()}"
        self._auth_message: bytes | None = None

    def first(self) -> bytes:
        return f"n,,{self._client_first_bare}".encode()

    def final(self, server_first: bytes) -> bytes:
        msg = _decode(server_first)
        attrs = msg.split(",")
        if len(attrs) < 3 or attrs[0].startswith("m="):
            raise ScramError("malformed SCRAM server-first-message")
        nonce, salt = _attr(attrs[0], "r"), _unb64(_attr(attrs[1], "s"), "salt")
        try:
            iterations = int(_attr(attrs[2], "i"))
        except ValueError:
            raise ScramError("malformed SCRAM message: invalid iteration count") from None
        client_nonce = self._client_first_bare.split(",r=", 1)[1]
        if not nonce.startswith(client_nonce) or len(nonce) == len(client_nonce) or not _valid_nonce(nonce):
            raise ScramError("SCRAM server nonce does not extend the client nonce")
        if iterations < 1 or not salt:
            raise ScramError("malformed SCRAM message: invalid salt or iteration count")
        _check_extensions(attrs[3:])
        if self._password is not None:
            salted = hashlib.pbkdf2_hmac("sha256", _saslprep(self._password), salt, iterations)
            self._client_key = _hmac(salted, b"Client Key")
            self._server_key = _hmac(salted, b"Server Key")
        without_proof = f"c={_b64(b'n,,')},r={nonce}"
        self._auth_message = f"{self._client_first_bare},{msg},{without_proof}".encode()
        stored_key = hashlib.sha256(self._client_key).digest()
        proof = _xor(self._client_key, _hmac(stored_key, self._auth_message))
        return f"{without_proof},p={_b64(proof)}".encode()

    def verify(self, server_final: bytes) -> None:
        if self._auth_message is None:
            raise ScramError("server-final-message before client-final-message")
        msg = _decode(server_final)
        if msg.startswith("e="):
            raise ScramAuthFailed(f"server refused SCRAM authentication: {msg[2:]}")
        signature = _unb64(_attr(msg.split(",")[0], "v"), "server signature")
        if not hmac.compare_digest(signature, _hmac(self._server_key, self._auth_message)):
            raise ScramAuthFailed("SCRAM server signature mismatch: the server does not know the verifier")
