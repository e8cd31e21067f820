"""Bearer session tokens, in the spirit of `aws sts get-session-token`: a caller signed with an
access key asks for a token, then sends `Authorization: Bearer <token>` over TLS until it
expires (15 minutes to 12 hours; 1 hour by default). Browsers and scripts that cannot sign
requests use these.

    dbpst1.<base64url JSON {"k": access key id, "p": principal, "e": expiry, "n": nonce}>.<base64url MAC>

The MAC is HMAC-SHA256 over the first two parts under a key derived from the access key's
secret, so any API process can verify a token without shared state, and deactivating or
deleting the access key ends every token issued from it. The token carries the
principal's permissions, no more: its policies are evaluated on each call.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

PREFIX = "dbpst1"
MIN_SECONDS, MAX_SECONDS, DEFAULT_SECONDS = 900, 43200, 3600
_DERIVATION = b"dbplane session token v1"


class TokenError(Exception):
    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SessionClaims:
    key_id: str
    principal: str
    expires: int


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, signed_part: str) -> bytes:
    key = hmac.new(secret.encode(), _DERIVATION, hashlib.sha256).digest()
    return hmac.new(key, signed_part.encode(), hashlib.sha256).digest()


def issue(key_id: str, principal: str, secret: str, duration: int,
          now: float | None = None) -> tuple[str, int]:
    """(token, expiry as Unix time)."""
    expires = int((now or time.time()) + duration)
    claims = {"k": key_id, "p": principal, "e": expires, "n": secrets.token_hex(8)}
    signed_part = f"{PREFIX}.{_b64(json.dumps(claims, separators=(',', ':')).encode())}"
    return f"{signed_part}.{_b64(_mac(secret, signed_part))}", expires


def claims_of(token: str) -> SessionClaims:
    """What the token says, unverified (verify() checks it against the key's secret)."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise TokenError("the bearer token is not a dbplane session token", "malformed_token")
    try:
        body = json.loads(_unb64(parts[1]))
        return SessionClaims(key_id=str(body["k"]), principal=str(body["p"]), expires=int(body["e"]))
    except (ValueError, KeyError, TypeError):
        raise TokenError("the bearer token's claims do not parse", "malformed_token") from None


def verify(token: str, secret: str, now: float | None = None) -> SessionClaims:
    claims = claims_of(token)
    signed_part, _, mac = token.rpartition(".")
    try:
        given = _unb64(mac)
    except ValueError:
        given = b""
    if not hmac.compare_digest(given, _mac(secret, signed_part)):
        raise TokenError("the bearer token's signature does not match (forged or altered)",
                         "invalid_token")
    if (now or time.time()) >= claims.expires:
        raise TokenError(f"the bearer token expired at "
                         f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(claims.expires))}",
                         "expired_token")
    return claims
