"""PostgreSQL v3 wire protocol: the few messages the proxy and the WAL archiver build or look inside.

Everything else passes through as bytes. A message is a type byte, an int32 length that
counts itself, and a body; the startup packet has no type byte.
https://www.postgresql.org/docs/current/protocol-message-formats.html
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("!cI")      # type byte, length
INT32 = struct.Struct("!I")
INT16 = struct.Struct("!H")

PROTOCOL_3_0 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

MAX_STARTUP = 10000                 # PostgreSQL's own limit for the startup packet
MAX_MESSAGE = 64 * 1024 * 1024      # larger client messages are refused as malformed

# authentication request codes ('R')
AUTH_OK, AUTH_CLEARTEXT, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = 0, 3, 10, 11, 12


class ProtocolViolation(Exception):
    """The peer sent something that is not the PostgreSQL protocol."""


def message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + INT32.pack(len(body) + 4) + body


def cstr(s: str | bytes) -> bytes:
    return (s.encode() if isinstance(s, str) else s) + b"\0"


def read_cstr(buf: bytes, pos: int) -> tuple[bytes, int]:
    """The NUL-terminated string at pos, and the position after it."""
    end = buf.find(b"\0", pos)
    if end < 0:
        raise ProtocolViolation("unterminated string in message")
    return buf[pos:end], end + 1


# -- startup -------------------------------------------------------------------------

def parse_startup_params(body: bytes) -> dict[str, str]:
    """The key/value pairs after the protocol version of a StartupMessage."""
    params, pos = {}, 0
    while pos < len(body) and body[pos] != 0:
        key, pos = read_cstr(body, pos)
        value, pos = read_cstr(body, pos)
        params[key.decode(errors="replace")] = value.decode(errors="replace")
    return params


def startup_message(params: dict[str, str]) -> bytes:
    body = INT32.pack(PROTOCOL_3_0) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\0"
    return INT32.pack(len(body) + 4) + body


def cancel_request(pid: int, key: bytes) -> bytes:
    return INT32.pack(16) + INT32.pack(CANCEL_REQUEST) + INT32.pack(pid) + key


def parse_options(options: str) -> dict[str, str]:
    """`-c name=value` settings from the startup `options` parameter (as libpq sends
    PGOPTIONS); '\\ ' escapes a space in a value."""
    out: dict[str, str] = {}
    words, word, escaped = [], "", False
    for ch in options:
        if escaped:
            word, escaped = word + ch, False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if word:
                words.append(word)
            word = ""
        else:
            word += ch
    if word:
        words.append(word)
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-c" and i + 1 < len(words):
            w, i = words[i + 1], i + 1
        elif w.startswith("-c"):
            w = w[2:]
        elif w.startswith("--"):
            w = w[2:]
        else:
            raise ValueError(f"unsupported startup option {w!r}: only -c name=value is accepted")
        if "=" not in w:
            raise ValueError(f"startup option {w!r} has no value: use -c name=value")
        name, value = w.split("=", 1)
        out[name.replace("-", "_").lower()] = value
        i += 1
    return out


# -- server -> client messages the proxy makes itself -----------------------------------

def error(sqlstate: str, text: str, severity: str = "ERROR", hint: str = "") -> bytes:
    body = (b"S" + cstr(severity) + b"V" + cstr(severity) + b"C" + cstr(sqlstate)
            + b"M" + cstr(text) + (b"H" + cstr(hint) if hint else b"") + b"\0")
    return message(b"E", body)


def notice(text: str) -> bytes:
    return message(b"N", b"SNOTICE\0VNOTICE\0C00000\0M" + cstr(text) + b"\0")


def parse_error_fields(body: bytes) -> dict[str, str]:
    fields, pos = {}, 0
    while pos < len(body) and body[pos] != 0:
        code = chr(body[pos])
        value, pos = read_cstr(body, pos + 1)
        fields[code] = value.decode(errors="replace")
    return fields


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def backend_key_data(pid: int, key: bytes) -> bytes:
    return message(b"K", INT32.pack(pid) + key)


def auth_request(code: int, data: bytes = b"") -> bytes:
    return message(b"R", INT32.pack(code) + data)


def auth_sasl_mechanisms() -> bytes:
    return auth_request(AUTH_SASL, cstr("SCRAM-SHA-256") + b"\0")


PARSE_COMPLETE = message(b"1")
CLOSE_COMPLETE = message(b"3")


# -- client -> server messages ----------------------------------------------------------

def query(sql: str) -> bytes:
    return message(b"Q", cstr(sql))


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstr(mechanism) + INT32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return message(b"p", data)


def parse_sasl_initial(body: bytes) -> tuple[str, bytes]:
    mechanism, pos = read_cstr(body, 0)
    if len(body) < pos + 4:
        raise ProtocolViolation("truncated SASLInitialResponse")
    (n,) = INT32.unpack_from(body, pos)
    return mechanism.decode(errors="replace"), body[pos + 4:pos + 4 + n]


def close_statement(name: bytes) -> bytes:
    return message(b"C", b"S" + name + b"\0")


TERMINATE = message(b"X")
SYNC = message(b"S")


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def kinds(data: bytes) -> str:
    """The message types in data, for tracing ('+' when a message is cut off)."""
    out, pos = [], 0
    while pos + 5 <= len(data):
        out.append(chr(data[pos]))
        pos += 1 + int.from_bytes(data[pos + 1:pos + 5])
    return "".join(out) + ("+" if pos != len(data) else "")
