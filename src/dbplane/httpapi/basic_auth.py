"""HTTP Basic authentication for GET /metrics only: what Prometheus' `basic_auth` sends, since
Prometheus cannot sign requests. The user is an access key id, the password its secret;
accepted over TLS only, and the secret is compared in constant time and never logged."""

from __future__ import annotations

import base64
import binascii
import hmac

from fastapi import Request

from ..security import iam

PATHS = {"/metrics"}


def applies(request: Request) -> bool:
    return request.method == "GET" and request.url.path in PATHS


def _refuse(message: str, code: str) -> iam.Unauthenticated:
    return iam.Unauthenticated(message, "use an access key id as the user and its secret as the password, "
                               "over https (docs/observability.md#scraping-with-prometheus)", code=code)


async def identity(request: Request, credentials: str) -> iam.Identity:
    if request.url.scheme != "https":
        raise _refuse("basic authentication is accepted over TLS only (this request came over http)",
                      "insecure_transport")
    try:
        key_id, sep, secret = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise _refuse("malformed basic authentication credentials", "invalid_credentials") from None
    if not sep or not key_id or not secret:
        raise _refuse("basic authentication needs an access key id and its secret", "invalid_credentials")
    found = await request.app.state.authority.identity(key_id)
    request.state.principal = found.principal
    if not hmac.compare_digest(secret.encode(), found.secret.encode()):
        raise _refuse(f"wrong secret for access key {key_id}", "invalid_credentials")
    return found
