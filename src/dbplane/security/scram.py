"""SCRAM-SHA-256 password verifiers (RFC 5802 / 7677), computed here so that a plain
password never travels in SQL text where it could reach logs or pg_stat_statements."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets as _secrets

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
