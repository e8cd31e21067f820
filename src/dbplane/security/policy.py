"""IAM-like policy documents: parsing with clear errors, and evaluation.

A document has the grammar of AWS IAM's, so what a platform engineer knows carries over:

    {"Version": "2012-10-17",
     "Statement": [{"Sid": "ReadOrders", "Effect": "Allow",
                    "Action": ["db:Describe*", "db:Connect"],
                    "Resource": ["db/orders", "dbuser/orders/app"],
                    "Condition": {"IpAddress": {"dbplane:SourceIp": "10.0.0.0/8"}}}]}

Evaluation (evaluate()): a matching Deny wins over everything; else a matching Allow
allows; else the request is denied (least privilege by default). Action and Resource
patterns take `*` and `?` wildcards and match case-insensitively for actions (like IAM).
Pure functions: no I/O.
"""

from __future__ import annotations

import datetime
import fnmatch
import ipaddress
import json
import re
from dataclasses import dataclass, field

from ..errors import InvalidInput

VERSION = "2012-10-17"
MAX_DOCUMENT_BYTES = 6144          # IAM's limit for a managed policy

# Every action a policy can name. The API maps each route to one of these
# (httpapi/auth.py); a unit test checks that every route has one.
ACTIONS = {
    "platform": ["DescribeHosts", "DescribeClasses", "RunDoctor"],
    "db": ["DescribeDatabases", "CreateDatabase", "RestoreDatabase", "DeleteDatabase",
           "ModifyDatabase", "Switchover", "Failover", "CreateReplica", "DeleteReplica",
           "PromoteReplica", "DescribeOperations", "DescribeEvents", "DescribeProxy",
           "ModifyProxy", "Connect", "DescribeAllowlist", "AuthorizeIngress", "RevokeIngress",
           "ModifyAllowlist", "RotateCredentials", "DescribeMetrics", "DescribeInsights"],
    "backup": ["CreateSnapshot", "DescribeSnapshots", "DeleteSnapshot", "CopySnapshot",
               "VerifySnapshot", "DescribeBackup", "ModifyBackup", "DescribeDrills",
               "CreateRepository", "DescribeRepositories", "DeleteRepository"],
    "kms": ["ListKeys", "DescribeKey", "CreateKey", "UpdateKey", "RotateKey", "DisableKey",
            "EnableKey", "ScheduleKeyDeletion", "CancelKeyDeletion", "GetKeyPolicy", "PutKeyPolicy",
            "GenerateDataKey", "Decrypt"],
    "iam": ["ListUsers", "GetUser", "CreateUser", "DeleteUser", "ListRoles", "GetRole",
            "CreateRole", "DeleteRole", "ListPolicies", "GetPolicy", "CreatePolicy",
            "DeletePolicy", "AttachPolicy", "DetachPolicy", "ListAccessKeys",
            "CreateAccessKey", "DeleteAccessKey", "UpdateAccessKey", "SimulatePolicy"],
    "audit": ["LookupEvents", "VerifyLog", "GetSettings", "UpdateSettings"],
    "ca": ["GetCertificate"],
    "metrics": ["Scrape"],
    "alarms": ["DescribeAlarms", "PutAlarm", "DeleteAlarm"],
}
ALL_ACTIONS = [f"{service}:{name}" for service, names in ACTIONS.items() for name in names]

# Key policies (security/key_policy.py) add a Principal element: "*", "user/NAME", "role/NAME",
# or ACCOUNT, which stands for every principal as far as its IAM policies allow (AWS's
# account principal: the statement delegates the key to IAM).
ACCOUNT = "account"
KEY_POLICY_MAX_BYTES = 32768        # AWS KMS's limit for a key policy
PRINCIPAL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.@+=,-]{0,63}")     # as iam.NAME_RE

# condition operator -> (context key type, test)
CONDITION_KEYS = {"dbplane:SourceIp": "ip", "dbplane:CurrentTime": "time",
                  "dbplane:SecureTransport": "bool", "dbplane:PrincipalName": "string",
                  "dbplane:DatabaseUser": "string"}
OPERATORS = {"IpAddress": "ip", "NotIpAddress": "ip", "DateGreaterThan": "time",
             "DateLessThan": "time", "Bool": "bool", "StringEquals": "string",
             "StringNotEquals": "string", "StringLike": "string"}


def _bad(message: str, hint: str = "see docs/security.md for the policy grammar") -> InvalidInput:
    return InvalidInput(message, hint, code="malformed_policy")


@dataclass(frozen=True)
class Condition:
    operator: str
    key: str
    values: tuple


@dataclass(frozen=True)
class Statement:
    sid: str
    effect: str                     # "Allow" | "Deny"
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    conditions: tuple[Condition, ...] = ()
    principals: tuple[str, ...] = ()    # key policies only; empty: whoever the policy is attached to


@dataclass(frozen=True)
class Policy:
    name: str
    statements: tuple[Statement, ...]
    title: str = ""                 # how decisions name it; default "policy NAME"


@dataclass
class Request:
    """What is being asked: the context a policy's conditions test."""
    action: str
    resource: str
    source_ip: str = "127.0.0.1"
    secure_transport: bool = False
    principal: str = ""
    database_user: str = ""
    now: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.UTC))


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str                     # "allowed by ..." / "explicitly denied by ..." / "no statement allows"


# -- parsing --------------------------------------------------------------------------------------

def _strings(value, what: str, where: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(x, str) and x for x in items):
        raise _bad(f"{where}: {what} must be a non-empty string or list of strings")
    return tuple(items)


def _action_pattern(pattern: str, where: str) -> str:
    if pattern == "*":
        return pattern
    if ":" not in pattern:
        raise _bad(f"{where}: action {pattern!r} has no service prefix",
                   "write actions as service:Name, e.g. db:CreateDatabase or db:Describe*")
    if not any(fnmatch.fnmatchcase(a.lower(), pattern.lower()) for a in ALL_ACTIONS):
        close = [a for a in ALL_ACTIONS if a.split(":")[0] == pattern.split(":")[0]]
        raise _bad(f"{where}: action {pattern!r} matches no dbplane action",
                   f"known actions of that service: {', '.join(close[:8]) or 'none'}"
                   if close else f"services are {', '.join(ACTIONS)}")
    return pattern


def _condition(operator: str, body, where: str) -> list[Condition]:
    if operator not in OPERATORS:
        raise _bad(f"{where}: unknown condition operator {operator!r}",
                   f"use one of {', '.join(OPERATORS)}")
    if not isinstance(body, dict) or not body:
        raise _bad(f"{where}: condition {operator} must map a key to values")
    out = []
    for key, raw in body.items():
        if key not in CONDITION_KEYS:
            raise _bad(f"{where}: unknown condition key {key!r}", f"use one of {', '.join(CONDITION_KEYS)}")
        kind = OPERATORS[operator]
        if CONDITION_KEYS[key] != kind:
            raise _bad(f"{where}: {operator} cannot test {key} (a {CONDITION_KEYS[key]} key)")
        values = [raw] if not isinstance(raw, list) else raw
        if not values:
            raise _bad(f"{where}: condition {operator} {key} has no values")
        parsed = []
        for v in values:
            try:
                if kind == "ip":
                    parsed.append(ipaddress.ip_network(str(v), strict=False))
                elif kind == "time":
                    parsed.append(_parse_time(str(v)))
                elif kind == "bool":
                    if str(v).lower() not in ("true", "false"):
                        raise ValueError("not true or false")
                    parsed.append(str(v).lower() == "true")
                else:
                    parsed.append(str(v))
            except ValueError as e:
                raise _bad(f"{where}: condition {operator} {key}: {v!r} is not valid ({e})") from None
        out.append(Condition(operator, key, tuple(parsed)))
    return out


def _parse_time(text: str) -> datetime.datetime:
    t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=datetime.UTC)


def _principal(ref: str, where: str) -> str:
    kind, _, name = ref.partition("/")
    if ref in ("*", ACCOUNT) or (kind in ("user", "role") and PRINCIPAL_NAME.fullmatch(name)):
        return ref
    raise _bad(f"{where}: principal {ref!r} is not user/NAME, role/NAME, {ACCOUNT!r} or '*'",
               f'name principals as "user/alice" or "role/orders-app"; "{ACCOUNT}" lets IAM policies decide')


def _key_statement(st: dict, actions: tuple[str, ...], resources: tuple[str, ...],
                   where: str) -> tuple[str, ...]:
    """The principals of a key policy's statement; its actions and resources checked."""
    if "Principal" not in st:
        raise _bad(f"{where} needs a Principal", f'e.g. "Principal": "user/alice", or "{ACCOUNT}" to let '
                   "IAM policies decide")
    if resources != ("*",):
        raise _bad(f'{where}: the Resource of a key policy is "*" (the key itself), not {list(resources)}')
    for a in actions:
        if a != "*" and not any(action_matches(a, k) for k in ALL_ACTIONS if k.startswith("kms:")):
            raise _bad(f"{where}: action {a!r} is no kms: action; a key policy governs its key only",
                       "use kms: actions, e.g. kms:Decrypt, kms:GenerateDataKey, kms:RotateKey or kms:*")
    return tuple(_principal(p, where) for p in _strings(st["Principal"], "Principal", where))


def parse(name: str, document: str | dict, key_policy: bool = False) -> Policy:
    """A policy from its JSON text (or parsed dict), or malformed_policy naming what is wrong.
    `key_policy`: the document is the key policy of KMS key `name`: each statement names its
    Principal, Resource is "*" and actions are kms: ones (security/key_policy.py)."""
    title = f"the key policy of {name}" if key_policy else f"policy {name}"
    limit = KEY_POLICY_MAX_BYTES if key_policy else MAX_DOCUMENT_BYTES
    if isinstance(document, str):
        if len(document.encode()) > limit:
            raise _bad(f"{title} is {len(document.encode())} bytes; the limit is {limit}",
                       "split it into several policies" if not key_policy else "shorten it")
        try:
            document = json.loads(document)
        except json.JSONDecodeError as e:
            raise _bad(f"{title} is not JSON: {e.msg} at line {e.lineno} column {e.colno}",
                       "check the document with a JSON linter (e.g. python3 -m json.tool)") from None
    if not isinstance(document, dict):
        raise _bad(f"{title} must be a JSON object with Version and Statement")
    unknown = set(document) - {"Version", "Statement", "Id"}
    if unknown:
        raise _bad(f"{title}: unknown top-level element {sorted(unknown)[0]!r}")
    if document.get("Version") != VERSION:
        raise _bad(f"{title}: Version must be {VERSION!r}, not {document.get('Version')!r}",
                   f'add "Version": "{VERSION}" (the IAM grammar this follows)')
    raw = document.get("Statement")
    raw = [raw] if isinstance(raw, dict) else raw
    if not isinstance(raw, list) or not raw:
        raise _bad(f"{title} has no Statement")
    statements = []
    elements = {"Sid", "Effect", "Action", "Resource", "Condition"} | ({"Principal"} if key_policy else set())
    for i, st in enumerate(raw):
        where = f"{title} statement {i + 1}"
        if not isinstance(st, dict):
            raise _bad(f"{where} is not an object")
        unknown = set(st) - elements
        if unknown:
            raise _bad(f"{where}: unsupported element {sorted(unknown)[0]!r}",
                       f"use {', '.join(sorted(elements))} (NotAction, NotResource and NotPrincipal are "
                       "not supported" + ("" if key_policy else "; Principal only in key policies") + ")")
        if st.get("Effect") not in ("Allow", "Deny"):
            raise _bad(f"{where}: Effect must be Allow or Deny, not {st.get('Effect')!r}")
        if "Action" not in st or "Resource" not in st:
            raise _bad(f"{where} needs both Action and Resource")
        actions = tuple(_action_pattern(a, where) for a in _strings(st["Action"], "Action", where))
        resources = _strings(st["Resource"], "Resource", where)
        principals = _key_statement(st, actions, resources, where) if key_policy else ()
        conditions: list[Condition] = []
        cond = st.get("Condition", {})
        if not isinstance(cond, dict):
            raise _bad(f"{where}: Condition must be an object")
        for operator, body in cond.items():
            conditions.extend(_condition(operator, body, where))
        statements.append(Statement(str(st.get("Sid", "")), st["Effect"], actions, resources,
                                    tuple(conditions), principals))
    return Policy(name, tuple(statements), title)


# -- evaluation -----------------------------------------------------------------------------------

def _context_value(request: Request, key: str):
    return {"dbplane:SourceIp": request.source_ip, "dbplane:CurrentTime": request.now,
            "dbplane:SecureTransport": request.secure_transport,
            "dbplane:PrincipalName": request.principal,
            "dbplane:DatabaseUser": request.database_user}[key]


def _condition_holds(c: Condition, request: Request) -> bool:
    value = _context_value(request, c.key)
    if c.operator in ("IpAddress", "NotIpAddress"):
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            return False
        inside = any(ip in net for net in c.values)
        return inside if c.operator == "IpAddress" else not inside
    if c.operator == "DateGreaterThan":
        return any(value > t for t in c.values)
    if c.operator == "DateLessThan":
        return any(value < t for t in c.values)
    if c.operator == "Bool":
        return value in c.values
    if c.operator == "StringEquals":
        return value in c.values
    if c.operator == "StringNotEquals":
        return value not in c.values
    return any(fnmatch.fnmatchcase(value, v) for v in c.values)       # StringLike


def action_matches(pattern: str, action: str) -> bool:
    return fnmatch.fnmatchcase(action.lower(), pattern.lower())


def resource_matches(pattern: str, resource: str) -> bool:
    return fnmatch.fnmatchcase(resource, pattern)


def _applies(st: Statement, request: Request) -> bool:
    return ((not st.principals or any(p in ("*", ACCOUNT, request.principal) for p in st.principals))
            and any(action_matches(a, request.action) for a in st.actions)
            and any(resource_matches(r, request.resource) for r in st.resources)
            and all(_condition_holds(c, request) for c in st.conditions))


def _label(policy: Policy, index: int, st: Statement) -> str:
    return f"{policy.title or f'policy {policy.name}'} statement {st.sid or index + 1}"


def evaluate(policies: list[Policy], request: Request) -> Decision:
    """Explicit Deny first, then Allow, else the implicit deny."""
    allow: str | None = None
    for policy in policies:
        for i, st in enumerate(policy.statements):
            if not _applies(st, request):
                continue
            if st.effect == "Deny":
                return Decision(False, f"explicitly denied by {_label(policy, i, st)}")
            allow = allow or _label(policy, i, st)
    if allow:
        return Decision(True, f"allowed by {allow}")
    return Decision(False, "no attached policy allows it")


def is_broad(policy: Policy) -> bool:
    """Allow of every action on every resource with no condition (what the doctor flags)."""
    return any(st.effect == "Allow" and "*" in st.actions and "*" in st.resources and not st.conditions
               for st in policy.statements)


# -- managed policies every platform has ------------------------------------------------------------

BUILTIN = {
    "AdministratorAccess": {"Version": VERSION, "Statement": [
        {"Sid": "Everything", "Effect": "Allow", "Action": "*", "Resource": "*"}]},
    "ReadOnlyAccess": {"Version": VERSION, "Statement": [
        {"Sid": "ReadEverything", "Effect": "Allow",
         "Action": ["platform:Describe*", "db:Describe*", "backup:Describe*", "kms:ListKeys",
                    "kms:DescribeKey", "kms:GetKeyPolicy", "iam:List*", "iam:Get*", "audit:LookupEvents",
                    "audit:VerifyLog", "audit:GetSettings", "ca:GetCertificate",
                    "metrics:Scrape", "alarms:DescribeAlarms"],
         "Resource": "*"}]},
}
