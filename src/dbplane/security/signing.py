"""Signed API requests with access keys (in the spirit of AWS Signature Version 4).

The client sends

    Authorization: DBPLANE1-HMAC-SHA256 Credential=<access key id>, Signature=<hex>
    X-Dbplane-Date: 20261124T063500Z
    X-Dbplane-Nonce: <32 hex digits, fresh per request>
    X-Dbplane-Content-SHA256: <hex SHA-256 of the body>

and the signature is HMAC-SHA256(secret, string to sign) over the method, the path (as sent,
percent-encoded), the
sorted query, the host, the date, the nonce and the body's hash. The server refuses a
date more than MAX_SKEW seconds away (so a captured request is useless later) and a
nonce it has seen within that window (so it cannot be replayed sooner). The secret never
travels. SigningAuth plugs the signing into an httpx client.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import secrets
from urllib.parse import parse_qsl, quote

import httpx

ALGORITHM = "DBPLANE1-HMAC-SHA256"
DATE_HEADER = "x-dbplane-date"
NONCE_HEADER = "x-dbplane-nonce"
BODY_HEADER = "x-dbplane-content-sha256"
MAX_SKEW = 300.0
DATE_FORMAT = "%Y%m%dT%H%M%SZ"
KEY_ID_PREFIX = "DPAK"


def new_access_key() -> tuple[str, str]:
    """(access key id, secret access key): an id like AWS's (20 upper-case characters)
    and a 40-character secret."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    key_id = KEY_ID_PREFIX + "".join(secrets.choice(alphabet) for _ in range(16))
    return key_id, secrets.token_urlsafe(30)


def body_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def canonical_query(query: str) -> str:
    pairs = sorted(parse_qsl(query, keep_blank_values=True))
    return "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in pairs)


def string_to_sign(method: str, path: str, query: str, host: str, date: str, nonce: str,
                   content_sha256: str) -> str:
    canonical = "\n".join([method.upper(), path, canonical_query(query),
                           host.lower(), date, nonce, content_sha256])
    return "\n".join([ALGORITHM, date, hashlib.sha256(canonical.encode()).hexdigest()])


def signature(secret: str, text: str) -> str:
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


def sign(key_id: str, secret: str, method: str, path: str, query: str, host: str, body: bytes,
         now: datetime.datetime | None = None) -> dict[str, str]:
    """The headers that authenticate one request."""
    date = (now or datetime.datetime.now(datetime.UTC)).strftime(DATE_FORMAT)
    nonce = secrets.token_hex(16)
    content = body_hash(body)
    sig = signature(secret, string_to_sign(method, path, query, host, date, nonce, content))
    return {"Authorization": f"{ALGORITHM} Credential={key_id}, Signature={sig}",
            DATE_HEADER: date, NONCE_HEADER: nonce, BODY_HEADER: content}


class SignatureError(Exception):
    """Why a request's signature is refused; `code` is the API's error code."""

    def __init__(self, message: str, code: str = "invalid_signature"):
        super().__init__(message)
        self.code = code


def parse_authorization(value: str) -> tuple[str, str]:
    """(access key id, signature) of an Authorization header, or SignatureError."""
    scheme, _, rest = value.partition(" ")
    if scheme != ALGORITHM:
        raise SignatureError(f"unsupported authorization scheme {scheme[:40]!r}; expected {ALGORITHM}")
    fields = {}
    for part in rest.split(","):
        name, _, val = part.strip().partition("=")
        fields[name] = val
    key_id, sig = fields.get("Credential", ""), fields.get("Signature", "")
    if not key_id or len(sig) != 64:
        raise SignatureError("the Authorization header lacks Credential or a 64-digit Signature")
    return key_id, sig


def check_date(date: str, now: datetime.datetime | None = None) -> datetime.datetime:
    try:
        when = datetime.datetime.strptime(date, DATE_FORMAT).replace(tzinfo=datetime.UTC)
    except ValueError:
        raise SignatureError(f"{DATE_HEADER} {date[:40]!r} is not a UTC time like 20261124T063500Z") from None
    skew = abs(((now or datetime.datetime.now(datetime.UTC)) - when).total_seconds())
    if skew > MAX_SKEW:
        raise SignatureError(f"the request was signed {skew:.0f} s away from the server's clock "
                             f"(at most {MAX_SKEW:.0f} s is accepted)", code="request_expired")
    return when


def verify(secret: str, sig: str, method: str, path: str, query: str, host: str, date: str,
           nonce: str, content_sha256: str, body: bytes) -> None:
    """SignatureError unless the signature is the secret's over exactly this request."""
    if len(nonce) < 16:
        raise SignatureError(f"{NONCE_HEADER} is missing or shorter than 16 characters")
    if not hmac.compare_digest(content_sha256, body_hash(body)):
        raise SignatureError("the body does not match its signed SHA-256 (changed in transit?)")
    expected = signature(secret, string_to_sign(method, path, query, host, date, nonce, content_sha256))
    if not hmac.compare_digest(expected, sig):
        raise SignatureError("the signature does not match: wrong secret access key, or the "
                             "request was changed after signing")


class NonceCache:
    """Nonces seen within the skew window: a replayed request is refused."""

    def __init__(self, window: float = 2 * MAX_SKEW, limit: int = 200_000):
        self.window = window
        self.limit = limit
        self._seen: dict[str, float] = {}

    def check_and_add(self, key_id: str, nonce: str, now: float) -> bool:
        """False if this (key, nonce) was seen already."""
        token = f"{key_id}:{nonce}"
        if token in self._seen:
            return False
        if len(self._seen) >= self.limit:
            self._seen = {k: t for k, t in self._seen.items() if now - t < self.window}
            if len(self._seen) >= self.limit:            # a flood: forget the oldest half
                self._seen = dict(list(self._seen.items())[self.limit // 2:])
        self._seen[token] = now
        return True


class SigningAuth(httpx.Auth):
    """httpx authentication that signs every request (httpx.Client(auth=SigningAuth(...)))."""

    requires_request_body = True
    requires_response_body = False

    def __init__(self, key_id: str, secret: str):
        self.key_id = key_id
        self._secret = secret

    def __repr__(self) -> str:
        return f"SigningAuth(key_id={self.key_id!r})"

    def auth_flow(self, request):
        raw_path = request.url.raw_path.decode("ascii").split("?", 1)[0]     # as sent
        request.headers.update(sign(self.key_id, self._secret, request.method, raw_path,
                                    request.url.query.decode(), request.url.netloc.decode(),
                                    request.content))
        yield request
