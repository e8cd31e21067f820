"""Which queries create session state, so that transaction pooling must pin the client to its
server connection (as RDS Proxy does): the next transaction would otherwise run on a connection
without that state, or another client would inherit it.

pin_reason() runs on every query of an unpinned client, so the common case is answered by a
cheap pre-check on the lowered text; only queries that mention a trigger word are tokenised,
with PostgreSQL's lexical rules for comments (nested), '...' / E'...' strings, "..." identifiers
and $tag$...$tag$ quotes, so that words inside those never count."""

from __future__ import annotations

import re

# Words that can appear in a pinning statement. Plain "set" is left out because every UPDATE has it:
# a session-level SET must start a statement, i.e. the text or follow a ';' (comments go the slow way).
_TRIGGERS = re.compile(rb"prepare|listen|temp|advisory|hold|load|set_config|--|/\*")
_SET_FIRST = re.compile(rb"\s*set")
_SET_AFTER_SEMICOLON = re.compile(rb";\s*set")

_TOKEN = re.compile(
    rb"""
      (?P<space>\s+|--[^\n]*)
    | (?P<estring>e'(?:[^'\\]+|\\.|'')*'?)    # before words: at a token start e' opens a string
    | (?P<word>[a-z_\x80-\xff][a-z0-9_$\x80-\xff]*)
    | (?P<string>'(?:[^']+|'')*'?)
    | (?P<ident>"(?:[^"]+|"")*"?)
    | (?P<dollar>\$(?:[a-z_\x80-\xff][a-z0-9_\x80-\xff]*)?\$)
    | (?P<number>[0-9][0-9a-z_.]*)
    | (?P<comment>/\*)
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_COMMENT_BOUNDARY = re.compile(rb"/\*|\*/")

_SESSION_ADVISORY = {"pg_advisory_lock", "pg_advisory_lock_shared",
                     "pg_try_advisory_lock", "pg_try_advisory_lock_shared"}
# what PostgreSQL's boolin() accepts as true (unique prefixes included)
_TRUE = {"true", "t", "tr", "tru", "yes", "y", "ye", "on", "1"}


def pin_reason(sql: bytes) -> str | None:
    """Why this Query / Parse text pins the client to its server connection, or None."""
    low = sql.lower()
    if (_TRIGGERS.search(low) is None and _SET_FIRST.match(low) is None
            and (b";" not in low or _SET_AFTER_SEMICOLON.search(low) is None)):
        return None
    for statement in _statements(low.rstrip(b"\x00")):
        reason = _statement_reason(statement)
        if reason:
            return reason
    return None


def _statements(sql: bytes) -> list[list[str]]:
    """Tokens of each ;-separated statement: words lowercased, string literals as "'" + content,
    quoted identifiers as '"' + content, punctuation as itself; whitespace and comments dropped."""
    statements: list[list[str]] = [[]]
    pos, end = 0, len(sql)
    while pos < end:
        m = _TOKEN.match(sql, pos)
        kind, text, pos = m.lastgroup, m.group(), m.end()
        tokens = statements[-1]
        if kind == "space":
            continue
        if kind == "word":
            tokens.append(text.decode("utf-8", "replace"))
        elif kind in ("string", "estring"):
            text = text[1:] if kind == "estring" else text
            tokens.append("'" + text.strip(b"'").decode("utf-8", "replace").strip())
        elif kind == "ident":
            tokens.append('"' + text.strip(b'"').decode("utf-8", "replace"))
        elif kind == "dollar":  # body up to the same $tag$, or to the end when unterminated
            close = sql.find(text, pos)
            body, pos = (sql[pos:], end) if close < 0 else (sql[pos:close], close + len(text))
            tokens.append("'" + body.decode("utf-8", "replace").strip())
        elif kind == "number":
            tokens.append(text.decode())
        elif kind == "comment":  # block comments nest in PostgreSQL
            depth = 1
            while depth:
                m = _COMMENT_BOUNDARY.search(sql, pos)
                if m is None:
                    pos = end
                    break
                depth += 1 if m.group() == b"/*" else -1
                pos = m.end()
        elif text == b";":
            statements.append([])
        else:
            tokens.append(text.decode("utf-8", "replace"))
    return [s for s in statements if s]


def _statement_reason(t: list[str]) -> str | None:
    if t[0] == "explain":  # EXPLAIN ANALYZE executes its statement
        t = _skip_explain_options(t)
        if not t:
            return None
    first, second = t[0], t[1] if len(t) > 1 else ""
    if first == "set" and second not in ("local", "transaction", "constraints"):
        return "SET"
    if first == "prepare" and not (second == "transaction" and len(t) > 2 and t[2].startswith("'")):
        return "PREPARE"
    if first == "listen":
        return "LISTEN"
    if first == "load":
        return "LOAD"
    if first == "declare" and any(t[i:i + 3] == ["cursor", "with", "hold"] for i in range(len(t))):
        return "WITH HOLD cursor"
    if first == "create":
        rest = t[3:] if t[1:3] == ["or", "replace"] else t[1:]
        if rest and rest[0] in ("global", "local"):
            rest = rest[1:]
        if (rest and rest[0] in ("temp", "temporary")) or _mentions_pg_temp(t):
            return "temporary table"
    if first in ("select", "with", "(") and _into_temp(t):
        return "temporary table"
    for i, tok in enumerate(t[:-1]):
        if t[i + 1] != "(":
            continue
        name = tok.lstrip('"')
        if name in _SESSION_ADVISORY:
            return "advisory lock"
        if name == "set_config" and not _third_argument_is_true(t, i + 1):
            return "set_config"
    return None


def _skip_explain_options(t: list[str]) -> list[str]:
    i = 1
    if i < len(t) and t[i] == "(":
        i = t.index(")", i) + 1 if ")" in t[i:] else len(t)
    while i < len(t) and t[i] in ("analyze", "analyse", "verbose"):
        i += 1
    return t[i:]


def _mentions_pg_temp(t: list[str]) -> bool:
    # CREATE TABLE pg_temp.x creates a temporary table without saying TEMP
    return any(tok in ("pg_temp", '"pg_temp') and t[i + 1:i + 2] == ["."] for i, tok in enumerate(t))


def _into_temp(t: list[str]) -> bool:
    # SELECT ... INTO [GLOBAL|LOCAL] TEMP[ORARY] [TABLE] name
    for i, tok in enumerate(t):
        if tok == "into":
            nxt = t[i + 1:i + 3]
            if nxt[:1] in (["global"], ["local"]):
                nxt = nxt[1:]
            if nxt[:1] in (["temp"], ["temporary"]):
                return True
    return False


def _third_argument_is_true(t: list[str], open_paren: int) -> bool:
    """set_config(name, value, is_local): True only when is_local is visibly a true literal."""
    depth, args, current = 0, [], []
    for tok in t[open_paren + 1:]:
        if tok == "(":
            depth += 1
        elif tok == ")":
            if depth == 0:
                break
            depth -= 1
        elif tok == "," and depth == 0:
            args.append(current)
            current = []
            continue
        current.append(tok)
    args.append(current)
    if len(args) != 3:
        return False
    arg = [tok for tok in args[2] if tok not in ("(", ")")]
    if arg[-3:] in ([":", ":", "bool"], [":", ":", "boolean"]):  # true::boolean, 'on'::bool
        arg = arg[:-3]
    if len(arg) == 2 and arg[0] in ("bool", "boolean"):  # boolean 'true'
        arg = arg[1:]
    return len(arg) == 1 and (arg[0] == "true" or arg[0].startswith("'") and arg[0][1:].strip() in _TRUE)
