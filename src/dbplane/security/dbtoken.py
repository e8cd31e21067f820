"""Short-lived database tokens (like RDS IAM authentication tokens).

`dbplane db token NAME --user U` signs, on the client and with the caller's access key,
"principal may log in to database NAME as U until T". The proxy accepts the token as the
password of U: it checks the signature with the key's secret, the expiry, that database
and user are the ones the client asks for, and that the principal's policies allow
db:Connect on dbuser/NAME/U. A token is valid for at most LIFETIME seconds; it can be
used for several connections within that time (as RDS's are).

    dbpt1.<base64url JSON {"k": key id, "d": database, "u": user, "i": issued, "e": expires}>.<hex HMAC>
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import NamedTuple

PREFIX = "dbpt1"
LIFETIME = 900
MAX_SKEW = 300             # a token issued this far in the future is still accepted (clocks)


class TokenError(Exception):
    """Why a token is refused, in one line for the client."""


class TokenClaims(NamedTuple):
    key_id: str
    database: str
    user: str
    issued: int
    expires: int


def _mac(secret: str, payload: str) -> str:
    return hmac.new(secret.encode(), f"{PREFIX}\n{payload}".encode(), hashlib.sha256).hexdigest()


def generate(key_id: str, secret: str, database: str, user: str, lifetime: int = LIFETIME,
             now: float | None = None) -> str:
    issued = int(now if now is not None else time.time())
    claims = {"k": key_id, "d": database, "u": user, "i": issued, "e": issued + min(lifetime, LIFETIME)}
    text = json.dumps(claims, separators=(",", ":")).encode()
    payload = base64.urlsafe_b64encode(text).decode().rstrip("=")
    return f"{PREFIX}.{payload}.{_mac(secret, payload)}"


def looks_like_token(password: str) -> bool:
    return password.startswith(PREFIX + ".")


def claims(token: str) -> tuple[TokenClaims, str, str]:
    """The unverified claims, the signed payload and the signature; TokenError if malformed."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX or len(parts[2]) != 64 or len(token) > 2048:
        raise TokenError("the password is not a dbplane token (dbpt1.<claims>.<signature>)")
    try:
        raw = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        c = TokenClaims(str(raw["k"]), str(raw["d"]), str(raw["u"]), int(raw["i"]), int(raw["e"]))
    except (ValueError, KeyError, TypeError):
        raise TokenError("the token's claims do not parse (truncated or altered)") from None
    return c, parts[1], parts[2]


def verify(token: str, secret: str, database: str, user: str, now: float | None = None) -> TokenClaims:
    """The claims of a token that is genuine, current and for this database and user."""
    c, payload, signature = claims(token)
    if not hmac.compare_digest(_mac(secret, payload), signature):
        raise TokenError("the token's signature does not match (forged, altered, or signed with "
                         "another key)")
    now = now if now is not None else time.time()
    if c.expires - c.issued > LIFETIME or c.issued > now + MAX_SKEW:
        raise TokenError("the token claims an impossible validity period")
    if now >= c.expires:
        raise TokenError(f"the token expired {int(now - c.expires)} s ago; generate a new one "
                         "(they last 15 minutes)")
    if c.database != database:
        raise TokenError(f"the token is for database {c.database[:64]}, not {database}")
    if c.user != user:
        raise TokenError(f"the token is for user {c.user[:64]}, not {user}")
    return c
